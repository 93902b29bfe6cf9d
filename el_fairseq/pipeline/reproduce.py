"""CE vs EL over seeds: train, average the last epoch checkpoints, evaluate, report.

    python -m el_fairseq.pipeline.reproduce TARGET [--seeds 1-5] [--data DIR] [--out DIR] [--only train]
                                   [--dry-run] [--cpu] [--precision fp16] [FAIRSEQ FLAGS...]

TARGET: a recipe with its language pair (iwslt14-de-en, iwslt17-fr-en, multi30k-de-en,
multi30k-fr-en, multi30k-cpu-de-en, multi30k-cpu-fr-en, demo) or the short names de-en, fr-en.
Every test subset of the data folder (DATA/testsets.json) is evaluated and named.

Resumable: a run with SAVE_DIR/DONE is not trained again (an unfinished one resumes from its
checkpoint_last.pt), an existing average or result.json is kept. --dry-run prints every command.
Layout: OUT/{ce,el}_seed{N}/ (checkpoints, train.log, avg_last{K}.pt, eval_{avg,best}[_SUBSET]/),
then OUT/RESULTS.md, OUT/results.json and OUT/*.png from el_fairseq.pipeline.report.
"""
import argparse
import os
import sys

from . import children, testsets
from ..cli import user_dir
from .evaluate import fairseq_tool
from .recipes import RECIPES, quote, train_command
from .train import DONE, precision_note, visible_gpus

# target -> (recipe, default data folder made by data-prep/)
TASKS = {
    "iwslt14-de-en": ("iwslt14-de-en", "data/data-bin/iwslt14.tokenized.de-en"),
    "iwslt17-fr-en": ("iwslt17-fr-en", "data/data-bin/iwslt17.fr-en"),
    "multi30k-de-en": ("multi30k", "data/data-bin/multi30k.de-en"),
    "multi30k-fr-en": ("multi30k", "data/data-bin/multi30k.fr-en"),
    "multi30k-cpu-de-en": ("multi30k-cpu", "data/data-bin/multi30k.de-en"),
    "multi30k-cpu-fr-en": ("multi30k-cpu", "data/data-bin/multi30k.fr-en"),
    "demo": ("demo", "results/demo/data-bin"),
}
ALIASES = {"de-en": "iwslt14-de-en", "fr-en": "iwslt17-fr-en", "multi30k": "multi30k-de-en"}
LOSSES = ("ce", "el")


def parse_seeds(text):
    """'1-5' -> [1..5]; '1,3,7' -> [1, 3, 7]."""
    seeds = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a range like 1-5 or a list like 1,3,7") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seed")
    return seeds


def plan(task, seeds, data, out, cpu=False, precision=None, avg_last=None, extra=(), only=None):
    """[(description, done_marker_or_None, command[, shown command])] for the whole reproduction
    (only the training steps with only='train')."""
    recipe = RECIPES[TASKS[task][0]]
    avg_last = avg_last or recipe.avg_last
    py = sys.executable
    steps = []
    for loss in LOSSES:
        for seed in seeds:
            run = os.path.join(out, f"{loss}_seed{seed}")
            # Only the last avg_last epoch checkpoints are used: keep no more (each is ~450 MiB for
            # transformer_iwslt_de_en with its Adam state). Training itself is unaffected.
            keep = ["--keep-last-epochs", str(avg_last)]
            train = [py, "-m", "el_fairseq.pipeline.train", "--recipe", recipe.name, "--loss", loss, "--seed", str(seed),
                     "--data", data, "--save-dir", run, *(["--precision", precision] if precision else []),
                     *(["--cpu"] if cpu else []),
                     *keep, *extra]
            # --dry-run shows the fairseq-train command itself; running goes through the wrapper (log, DONE).
            shown = fairseq_tool("fairseq-train") + train_command(
                recipe.name, loss, seed, data, run, visible_gpus(cpu), precision or "fp16", [*keep, *extra],
                user_dir=user_dir())
            steps.append((f"train {loss} seed {seed}", os.path.join(run, DONE), train, shown))
            if only == "train":
                continue
            avg = os.path.join(run, f"avg_last{avg_last}.pt")
            steps.append((f"average {loss} seed {seed}", avg,
                          [py, "-m", "el_fairseq.pipeline.checkpoints", "--inputs", run, "--num-epoch-checkpoints",
                           str(avg_last), "--output", avg]))
            for kind, ckpt in (("avg", avg), ("best", os.path.join(run, "checkpoint_best.pt"))):
                for subset in testsets.subsets(data):
                    ev = os.path.join(run, f"eval_{kind}_{subset}")
                    steps.append((f"evaluate {loss} seed {seed} {kind} {subset}", os.path.join(ev, "result.json"),
                                  [py, "-m", "el_fairseq.pipeline.evaluate", ckpt, data, "--subset", subset,
                                   "--remove-bpe", recipe.remove_bpe, "--detok", recipe.detok, "--out", ev,
                                   *(["--cpu"] if cpu else [])]))
    if only != "train":
        steps.append(("report", None, [py, "-m", "el_fairseq.pipeline.report", out, "--task", task, "--data", data,
                                       *(["--cpu"] if cpu else [])]))
    return steps


def execute(steps, dry_run=False):
    for i, (what, marker, cmd, *shown) in enumerate(steps, 1):
        if dry_run:
            print(quote(shown[0] if shown else cmd))
            continue
        if marker and os.path.exists(marker):
            print(f"[{i}/{len(steps)}] {what}: done already, skipped", flush=True)
            continue
        print(f"[{i}/{len(steps)}] {what}", flush=True)
        try:
            rc = children.run(cmd)
        except children.Stopped as stopped:
            children.exit_stopped(stopped, f"reproduce: stopped by {stopped} during '{what}'; its process has "
                                           "ended; rerunning resumes (finished steps are skipped)")
        if rc != 0:
            raise SystemExit(f"reproduce: step '{what}' failed with exit code {rc}: {quote(cmd)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", metavar="TARGET", help=", ".join([*TASKS, *ALIASES]))
    parser.add_argument("--seeds", default="1-5")
    parser.add_argument("--data", help="data-bin folder (default: where data-prep puts it)")
    parser.add_argument("--out", help="results folder (default: results/<target>)")
    parser.add_argument("--avg-last", type=int, help="epoch checkpoints to average (default: the recipe's; paper: 10)")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="on GPUs (default fp16)")
    parser.add_argument("--only", choices=["train"], help="run the training steps only")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    args, extra = parser.parse_known_args(argv)
    task = ALIASES.get(args.task, args.task)
    if task not in TASKS:
        parser.error(f"target {args.task!r} is not known: allowed {', '.join([*TASKS, *ALIASES])}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        parser.error(str(err))
    if args.avg_last is not None and args.avg_last < 1:
        parser.error(f"--avg-last {args.avg_last} is out of range: allowed >= 1")
    data = args.data or TASKS[task][1]
    out = args.out or os.path.join("results", args.task)
    if not args.dry_run and not os.path.isdir(data):
        parser.error(f"--data: no such folder {data} (prepare it with data-prep/, see README)")
    if args.dry_run:  # a real run's training steps say it themselves
        note = precision_note(visible_gpus(args.cpu), args.cpu, args.precision, "these are the CPU commands",
                              "they would")
        if note:
            print(f"reproduce: {note}", file=sys.stderr)
    execute(plan(task, seeds, data, out, args.cpu, args.precision, args.avg_last, extra, args.only), args.dry_run)


if __name__ == "__main__":
    main()

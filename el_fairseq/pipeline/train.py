"""Training wrapper: fairseq-train with a paper recipe, CE or EL, on all visible GPUs.

    python -m el_fairseq.pipeline.train --recipe iwslt14-de-en --loss el --seed 1 --data DATA_BIN --save-dir DIR
                               [--precision fp16|bf16|fp32] [--cpu] [--dry-run] [--diagnostics] [FAIRSEQ FLAGS...]

GPUs: fp16 by default; fairseq's own distributed training uses every visible GPU, and the
update frequency is divided by the GPU count so the effective batch stays the recipe's.
Unknown flags go to fairseq-train unchanged (and override the recipe's: argparse keeps the last).
The log is appended to SAVE_DIR/train.log; SAVE_DIR/provenance.json records the command, versions
and machine; SAVE_DIR/DONE (holding the command) marks a finished run. Re-running an
unfinished run resumes from SAVE_DIR/checkpoint_last.pt (fairseq's default --restore-file).
SIGINT (Ctrl-C), SIGTERM or SIGHUP stop fairseq-train and its workers, wait for them and end this
wrapper by the same signal, without DONE (el_fairseq.pipeline.children). Without a GPU (or with
--cpu) the command is fairseq's --cpu one, in fp32: a line on stderr says so.
"""
import argparse
import os
import sys
import time

from . import children, provenance
from ..cli import user_dir
from .evaluate import fairseq_tool
from .recipes import LOSS_FLAGS, RECIPES, quote, train_command

DONE = "DONE"


def visible_gpus(force_cpu=False):
    if force_cpu:
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, choices=sorted(RECIPES))
    parser.add_argument("--loss", required=True, choices=sorted(LOSS_FLAGS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", required=True, help="fairseq data-bin folder")
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="on GPUs (default fp16)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if GPUs are visible")
    parser.add_argument("--diagnostics", action="store_true",
                        help="CE baseline through label_smoothed_cross_entropy_with_diagnostics (same loss, "
                             "logs margin/energy like the EL criterion)")
    parser.add_argument("--dry-run", action="store_true", help="print the fairseq-train command only")
    return parser


def precision_note(n_gpus, force_cpu, precision, what="this is the CPU command", would="it would"):
    """The line that says why a CPU command has no --fp16/--bf16 (None when there is nothing to say):
    without a GPU the command is the CPU one, and fairseq's --cpu trains in fp32."""
    if n_gpus:
        return None
    if not force_cpu:
        shown = precision or "fp16"
        return f"no GPU visible: {what} (--cpu, fp32); on GPUs {would} train in {shown} (--{shown})"
    if precision in ("fp16", "bf16"):
        return f"--precision {precision} applies on GPUs only: --cpu trains in fp32"
    return None


def command(args, extra):
    n_gpus = visible_gpus(args.cpu)
    note = precision_note(n_gpus, args.cpu, args.precision,
                          "this is the CPU command" if args.dry_run else "training on the CPU")
    if note:
        print(f"train: {note}", file=sys.stderr)
    return fairseq_tool("fairseq-train") + train_command(
        args.recipe, args.loss, args.seed, args.data, args.save_dir, n_gpus, args.precision or "fp16", extra,
        user_dir=user_dir(), diagnostics=args.diagnostics)


def run_logged(cmd, log_path):
    """Run cmd, streaming its output to the terminal and appending it to log_path."""
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: the log follows the run
        log.write("# " + quote(cmd) + "\n")

        def show(line):
            sys.stdout.write(line)
            log.write(line)

        # fairseq logs to stdout, which a pipe would buffer in 8 KiB blocks: unbuffered, the log and
        # the terminal show each line (and the progress) as it happens. SIGINT/SIGTERM end the child
        # (children.Stopped), which is waited for: no fairseq-train keeps writing into SAVE_DIR.
        return children.run(cmd, on_line=show, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def train(args, extra):
    cmd = command(args, extra)
    if args.dry_run:
        print(quote(cmd))
        return 0
    if not os.path.isdir(args.data):
        raise SystemExit(f"train: error: --data: no such folder {args.data}")
    if os.path.exists(os.path.join(args.save_dir, DONE)):
        print(f"{args.save_dir}: finished already ({DONE} present), nothing to do")
        return 0
    os.makedirs(args.save_dir, exist_ok=True)
    prov = os.path.join(args.save_dir, "provenance.json")
    earlier = provenance.read(prov)
    provenance.write(prov, command=quote(cmd), started=(earlier or {}).get("started", time.time()),
                     resumed=bool(earlier))
    try:
        rc = run_logged(cmd, os.path.join(args.save_dir, "train.log"))
    except children.Stopped as stopped:
        children.exit_stopped(stopped, f"train: stopped by {stopped}; fairseq-train has ended (not {DONE}); "
                                       f"rerunning resumes from {os.path.join(args.save_dir, 'checkpoint_last.pt')}")
    if rc == 0:
        with open(os.path.join(args.save_dir, DONE), "w") as f:
            f.write(quote(cmd) + "\n")
    return rc


def main(argv=None):
    args, extra = build_parser().parse_known_args(argv)
    sys.exit(train(args, extra))


if __name__ == "__main__":
    main()

"""The reproduction report: OUT/RESULTS.md, OUT/results.json, OUT/bleu_per_seed.png, OUT/valid_curves.png,
and the margin/energy comparison of the averaged CE and EL checkpoints of the first seed.

    python -m el_fairseq.report OUT --task de-en [--data DATA_BIN] [--no-margins]

Reads OUT/{ce,el}_seed{N}/eval_{avg,best}/result.json and OUT/{ce,el}_seed{N}/train.log.
Mean +- sample standard deviation over seeds; delta = EL - CE; paired bootstrap resampling
(sacrebleu, 1000 samples) of EL vs CE hypotheses per seed.
"""
import argparse
import datetime
import glob
import json
import os
import re
import statistics

RUN_DIR = re.compile(r"(ce|el)_seed(\d+)$")
PAPER = {"de-en": {"ce": 35.09, "el": 35.50}, "fr-en": {"ce": 37.10, "el": 37.73}}


def collect(out):
    """{loss: {seed: {kind: result}}} from the run folders."""
    runs = {}
    for run in sorted(glob.glob(os.path.join(out, "*_seed*"))):
        match = RUN_DIR.search(run)
        if not match or not os.path.isdir(run):
            continue
        loss, seed = match.group(1), int(match.group(2))
        for kind in ("avg", "best"):
            path = os.path.join(run, f"eval_{kind}", "result.json")
            if os.path.exists(path):
                with open(path) as f:
                    runs.setdefault(loss, {}).setdefault(seed, {})[kind] = json.load(f)
    return runs


def mean_std(values):
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs):
    """Per checkpoint kind and metric: per-seed values, mean, std for CE and EL, and the delta."""
    table = {}
    for kind in ("avg", "best"):
        for metric in ("tokenized_bleu", "sacrebleu"):
            entry = {}
            for loss in ("ce", "el"):
                per_seed = {seed: (r[kind]["sacrebleu"]["score"] if metric == "sacrebleu" else r[kind][metric])
                            for seed, r in sorted(runs.get(loss, {}).items()) if kind in r}
                mean, std = mean_std(per_seed.values())
                entry[loss] = {"per_seed": per_seed, "mean": mean, "std": std, "n": len(per_seed)}
            if entry["ce"]["mean"] is not None and entry["el"]["mean"] is not None:
                entry["delta"] = entry["el"]["mean"] - entry["ce"]["mean"]
            table[f"{kind}/{metric}"] = entry
    return table


def paired_bootstrap(runs, kind="avg", samples=1000):
    """Per seed present for both losses: sacrebleu's paired bootstrap p-value of EL vs CE."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    out = {}
    for seed in sorted(set(runs.get("ce", {})) & set(runs.get("el", {}))):
        ce, el = runs["ce"][seed].get(kind), runs["el"][seed].get(kind)
        if not ce or not el:
            continue
        folder = lambda r: os.path.join(os.path.dirname(r["checkpoint"]), f"eval_{kind}")  # noqa: E731
        read = lambda p: open(p, encoding="utf-8").read().splitlines()  # noqa: E731
        try:
            ref = read(os.path.join(folder(ce), "ref.detok.txt"))
            systems = [("CE", read(os.path.join(folder(ce), "hyp.detok.txt"))),
                       ("EL", read(os.path.join(folder(el), "hyp.detok.txt")))]
        except OSError:
            continue
        test = PairedTest(systems, {"BLEU": BLEU()}, [ref], test_type="bs", n_samples=samples)
        _, scores = test()
        el_score = scores["BLEU"][1]
        out[seed] = {"p_value": el_score.p_value, "ce": scores["BLEU"][0].score, "el": el_score.score}
    return out


def valid_curves(out):
    """{run: [(epoch, valid_loss, valid_bleu or None)]} from the fairseq json logs."""
    curves = {}
    for log in sorted(glob.glob(os.path.join(out, "*_seed*", "train.log"))):
        run = os.path.basename(os.path.dirname(log))
        points = {}
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if "| valid | " not in line:
                    continue
                try:
                    rec = json.loads(line.split("| valid | ", 1)[1])
                except ValueError:
                    continue
                points[int(rec["epoch"])] = (float(rec["valid_loss"]), float(rec["valid_bleu"]) if "valid_bleu" in rec else None)
        curves[run] = [(e, *points[e]) for e in sorted(points)]
    return curves


def plot(table, curves, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    entry = table["avg/tokenized_bleu"]
    if entry["ce"]["n"] or entry["el"]["n"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for offset, loss in ((-0.2, "ce"), (0.2, "el")):
            seeds = list(entry[loss]["per_seed"])
            ax.bar([s + offset for s in seeds], list(entry[loss]["per_seed"].values()), width=0.4, label=loss.upper())
        ax.set_xlabel("seed")
        ax.set_ylabel("tokenized BLEU (averaged checkpoint)")
        ax.legend()
        values = [v for loss in ("ce", "el") for v in entry[loss]["per_seed"].values()]
        ax.set_ylim(max(0.0, min(values) - 2), max(values) + 1)
        written.append(_save(fig, os.path.join(out, "bleu_per_seed.png")))
    if curves:
        has_bleu = any(p[2] is not None for pts in curves.values() for p in pts)
        fig, axes = plt.subplots(1, 2 if has_bleu else 1, figsize=(11 if has_bleu else 6, 4), squeeze=False)
        for run, pts in curves.items():
            style = "-" if run.startswith("el") else "--"
            axes[0][0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=run)
            if has_bleu:
                axes[0][1].plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None],
                                style, label=run)
        axes[0][0].set_xlabel("epoch")
        axes[0][0].set_ylabel("validation loss (base 2)")
        axes[0][0].legend(fontsize=7)
        if has_bleu:
            axes[0][1].set_xlabel("epoch")
            axes[0][1].set_ylabel("validation BLEU")
        written.append(_save(fig, os.path.join(out, "valid_curves.png")))
    return written


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return path


def _fmt(stat):
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} (n={stat['n']})"


def render_markdown(task, table, bootstrap, margins, signature, pngs):
    lines = [f"# CE vs EL: {task}", "",
             f"Generated by `python -m el_fairseq.report` on {datetime.date.today().isoformat()}. "
             "Mean ± sample standard deviation over seeds; Δ = EL − CE.", "",
             "| checkpoint | metric | CE | EL | Δ |", "|---|---|---|---|---|"]
    for key, entry in table.items():
        kind, metric = key.split("/")
        delta = f"{entry['delta']:+.2f}" if "delta" in entry else "-"
        name = "tokenized BLEU (fairseq)" if metric == "tokenized_bleu" else "sacreBLEU"
        label = "average of last epochs" if kind == "avg" else "checkpoint_best"
        lines.append(f"| {label} | {name} | {_fmt(entry['ce'])} | {_fmt(entry['el'])} | {delta} |")
    if signature:
        lines += ["", f"sacreBLEU signature: `{signature}`"]
    if task in PAPER:
        p = PAPER[task]
        lines += ["", f"The paper (Zhao et al., arXiv 2110.06537, 5 seeds, tokenized BLEU): CE {p['ce']:.2f}, "
                  f"EL {p['el']:.2f}, Δ {p['el'] - p['ce']:+.2f}."]
    lines += ["", "## BLEU per seed (tokenized, averaged checkpoint)", "", "| seed | CE | EL |", "|---|---|---|"]
    entry = table["avg/tokenized_bleu"]
    for seed in sorted(set(entry["ce"]["per_seed"]) | set(entry["el"]["per_seed"])):
        ce, el = entry["ce"]["per_seed"].get(seed), entry["el"]["per_seed"].get(seed)
        lines.append(f"| {seed} | {'-' if ce is None else f'{ce:.2f}'} | {'-' if el is None else f'{el:.2f}'} |")
    if bootstrap:
        lines += ["", "## Paired bootstrap (sacreBLEU, 1000 resamples, EL vs CE of the same seed)", "",
                  "| seed | CE | EL | p-value |", "|---|---|---|---|"]
        for seed, b in bootstrap.items():
            lines.append(f"| {seed} | {b['ce']:.2f} | {b['el']:.2f} | {b['p_value']:.4f} |")
    if margins:
        lines += ["", "## Margins and energy (teacher-forced, test set, averaged checkpoints of the first seed)", "",
                  "| model | tokens | mean margin | median margin | mean energy | mean p_y | p_y > 0.5 |",
                  "|---|---|---|---|---|---|---|"]
        for label, s in margins["checkpoints"].items():
            lines.append(f"| {label} | {s['tokens']} | {s['margin']['mean']:.2f} | {s['margin']['q50']:.2f} | "
                         f"{s['energy']['mean']:.2f} | {s['p_y']['mean']:.3f} | {s['well_classified_pct']:.1f}% |")
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
    return "\n".join(lines) + "\n"


def report(out, task, data=None, margins=True, cpu=False):
    runs = collect(out)
    if not runs:
        raise FileNotFoundError(f"{out}: no evaluated runs ({{ce,el}}_seed*/eval_*/result.json)")
    table = aggregate(runs)
    bootstrap = paired_bootstrap(runs)
    curves = valid_curves(out)
    pngs = plot(table, curves, out)
    margin_result = None
    seeds = sorted(set(runs.get("ce", {})) & set(runs.get("el", {})))
    if margins and data and seeds:
        from .analysis import analyze

        ckpts = [(runs[loss][seeds[0]]["avg"]["checkpoint"], loss.upper()) for loss in ("ce", "el")
                 if "avg" in runs[loss][seeds[0]]]
        margin_result, margin_pngs = analyze(ckpts, data, "test", out, cpu=cpu)
        pngs += margin_pngs
    signature = next((r[k]["sacrebleu"]["signature"] for loss in runs.values() for r in loss.values() for k in r), None)
    results = {"task": task, "table": table, "paired_bootstrap": bootstrap, "paper": PAPER.get(task),
               "sacrebleu_signature": signature, "valid_curves": curves, "margins": margin_result}
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"),
                       ("RESULTS.md", render_markdown(task, table, bootstrap, margin_result, signature, pngs))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--task", default="custom")
    parser.add_argument("--data", help="data-bin, for the margin/energy comparison")
    parser.add_argument("--no-margins", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = report(args.out, args.task, args.data, not args.no_margins, args.cpu)
    except FileNotFoundError as err:
        parser.error(str(err))
    avg = results["table"]["avg/tokenized_bleu"]
    print(f"CE {_fmt(avg['ce'])}  EL {_fmt(avg['el'])}  delta {avg.get('delta', float('nan')):+.2f}  "
          f"-> {os.path.join(args.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()

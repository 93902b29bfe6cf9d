"""The reproduction report: OUT/RESULTS.md, OUT/results.json, OUT/bleu_per_seed.png, OUT/valid_curves.png,
and the margin/energy comparison of the averaged CE and EL checkpoints of the first seed.

    python -m el_fairseq.pipeline.report OUT --task TARGET [--data DATA_BIN] [--no-margins]

Reads OUT/{ce,el}_seed{N}/eval_{avg,best}_{SUBSET}/result.json (and the older eval_{avg,best}/ as
subset test), train.log, provenance.json and DONE. Per test subset: mean ± sample standard
deviation over seeds; Δ = EL − CE; sacreBLEU's paired bootstrap (1,000 resamples) and approximate
randomisation of EL vs CE of the same seed, with the 95% interval of Δ per seed and pooled over
seeds. Validation curves compare NLL (and BLEU where logged), never the criteria's own losses
(EL's includes its negative bonus).
"""
import argparse
import datetime
import glob
import json
import os
import re
import statistics

from . import provenance
from .recipes import LOSS_FLAGS, RECIPES, quote

RUN_DIR = re.compile(r"(ce|el)_seed(\d+)$")
EVAL_DIR = re.compile(r"eval_(avg|best)(?:_(\w+))?$")
KINDS = ("avg", "best")
METRICS = ("tokenized_bleu", "sacrebleu")
BOOTSTRAP_SAMPLES = 1000
AR_TRIALS = 10000


def paper_bleu(task):
    """The paper's numbers for TARGET's recipe (recipes.Recipe.paper_bleu), or None."""
    from .reproduce import ALIASES, TASKS

    target = ALIASES.get(task, task)
    return RECIPES[TASKS[target][0]].paper_bleu if target in TASKS else None


def collect(out):
    """{loss: {seed: {(kind, subset): result}}} from the run folders."""
    runs = {}
    for run in sorted(glob.glob(os.path.join(out, "*_seed*"))):
        match = RUN_DIR.search(run)
        if not match or not os.path.isdir(run):
            continue
        loss, seed = match.group(1), int(match.group(2))
        for folder in sorted(glob.glob(os.path.join(run, "eval_*"))):
            em = EVAL_DIR.search(folder)
            path = os.path.join(folder, "result.json")
            if em and os.path.exists(path):
                with open(path) as f:
                    result = json.load(f)
                result["_dir"] = folder
                runs.setdefault(loss, {}).setdefault(seed, {})[(em.group(1), em.group(2) or "test")] = result
    return runs


def subsets_of(runs):
    """{subset: official test-set name} over every result, 'test' first."""
    names = {}
    for per_seed in runs.values():
        for results in per_seed.values():
            for (_, subset), r in results.items():
                names.setdefault(subset, r.get("test_set", subset))
    return dict(sorted(names.items(), key=lambda kv: (kv[0] != "test", kv[0])))


def mean_std(values):
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs):
    """{subset/kind/metric: {ce, el: {per_seed, mean, std, n}, delta}}."""
    table = {}
    for subset in subsets_of(runs) or {"test": "test"}:
        for kind in KINDS:
            for metric in METRICS:
                entry = {}
                for loss in ("ce", "el"):
                    per_seed = {}
                    for seed, results in sorted(runs.get(loss, {}).items()):
                        r = results.get((kind, subset))
                        if r is not None:
                            per_seed[seed] = r["sacrebleu"]["score"] if metric == "sacrebleu" else r[metric]
                    mean, std = mean_std(per_seed.values())
                    entry[loss] = {"per_seed": per_seed, "mean": mean, "std": std, "n": len(per_seed)}
                if entry["ce"]["mean"] is not None and entry["el"]["mean"] is not None:
                    entry["delta"] = entry["el"]["mean"] - entry["ce"]["mean"]
                table[f"{subset}/{kind}/{metric}"] = entry
    return table


def _lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _interval(values):
    import numpy as np

    lo, hi = np.percentile(np.asarray(values), [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_significance(runs, kind="avg", samples=BOOTSTRAP_SAMPLES, trials=AR_TRIALS):
    """Per subset: EL vs CE of the same seed with sacreBLEU's paired tests, and pooled over seeds.

    sacreBLEU's paired bootstrap gives each system's mean and 95% interval over resampled test sets
    and the p-value; its resampling is seeded (SACREBLEU_SEED, 12345), so CE and EL are resampled
    with the same sentence indices, and their per-resample differences give the 95% interval of
    Δ = EL − CE. Pooled: the mean over seeds of those per-resample differences. Approximate
    randomisation adds its p-value."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest, _bootstrap_resample

    out = {}
    for subset in subsets_of(runs):
        per_seed, deltas_by_seed = {}, []
        for seed in sorted(set(runs.get("ce", {})) & set(runs.get("el", {}))):
            ce, el = runs["ce"][seed].get((kind, subset)), runs["el"][seed].get((kind, subset))
            if not ce or not el:
                continue
            try:
                ref = _lines(os.path.join(ce["_dir"], "ref.txt"))
                hyp = {"CE": _lines(os.path.join(ce["_dir"], "hyp.detok.txt")),
                       "EL": _lines(os.path.join(el["_dir"], "hyp.detok.txt"))}
            except OSError:
                continue
            lowercase = "case:lc" in ce["sacrebleu"]["signature"]
            bleu = BLEU(lowercase=lowercase)
            bs = PairedTest(list(hyp.items()), {"BLEU": bleu}, [ref], test_type="bs", n_samples=samples)()[1]["BLEU"]
            ar = PairedTest(list(hyp.items()), {"BLEU": BLEU(lowercase=lowercase)}, [ref], test_type="ar",
                            n_samples=trials)()[1]["BLEU"]
            resampled = {}
            for name in ("CE", "EL"):
                stats = bleu._extract_corpus_statistics(hyp[name], [ref])
                resampled[name] = [s.score for s in _bootstrap_resample(stats, bleu, samples)[1]]
            deltas = [e - c for c, e in zip(resampled["CE"], resampled["EL"])]
            deltas_by_seed.append(deltas)
            per_seed[seed] = {
                "ce": {"score": bs[0].score, "mean": bs[0].mean, "ci": bs[0].ci},
                "el": {"score": bs[1].score, "mean": bs[1].mean, "ci": bs[1].ci},
                "delta": bs[1].score - bs[0].score, "delta_ci95": _interval(deltas),
                "p_value_bootstrap": bs[1].p_value, "p_value_ar": ar[1].p_value}
        if not per_seed:
            continue
        pooled = [statistics.fmean(d[i] for d in deltas_by_seed) for i in range(samples)]
        out[subset] = {"per_seed": per_seed, "pooled": {
            "seeds": len(per_seed), "delta": statistics.fmean(p["delta"] for p in per_seed.values()),
            "delta_ci95": _interval(pooled)}, "samples": samples, "trials": trials,
            "signature": next(iter(runs["ce"].values()))[(kind, subset)]["sacrebleu"]["signature"]}
    return out


def valid_curves(out):
    """{run: [(epoch, valid_nll_loss (base 2), valid_bleu or None)]} from the fairseq json logs."""
    curves = {}
    for log in sorted(glob.glob(os.path.join(out, "*_seed*", "train.log"))):
        if not os.path.exists(os.path.join(os.path.dirname(log), "DONE")):
            continue  # a run still training (or interrupted) is not part of the report
        records = provenance.epoch_records(log, "valid")
        curves[os.path.basename(os.path.dirname(log))] = [
            (e, float(records[e]["valid_nll_loss"]),
             float(records[e]["valid_bleu"]) if "valid_bleu" in records[e] else None)
            for e in sorted(records) if "valid_nll_loss" in records[e]]
    return curves


def run_provenance(out):
    """{run: {command, versions, machine, epochs, wall_s, tokens_per_s}} of every run folder."""
    runs = {}
    for run in sorted(glob.glob(os.path.join(out, "*_seed*"))):
        if not RUN_DIR.search(run) or not os.path.isdir(run):
            continue
        done = os.path.join(run, "DONE")
        if not os.path.exists(done):
            continue  # still training, or interrupted: not part of the report
        record = provenance.read(os.path.join(run, "provenance.json")) or {}
        with open(done, encoding="utf-8") as f:  # the command that finished the run
            record["command"] = f.read().strip()
        record.update(provenance.training_speed(os.path.join(run, "train.log")) or {})
        runs[os.path.basename(run)] = record
    return runs


def plot(table, curves, out, subset="test"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    entry = table.get(f"{subset}/avg/tokenized_bleu")
    if entry and (entry["ce"]["n"] or entry["el"]["n"]):
        fig, ax = plt.subplots(figsize=(6, 4))
        for offset, loss in ((-0.2, "ce"), (0.2, "el")):
            seeds = list(entry[loss]["per_seed"])
            ax.bar([s + offset for s in seeds], list(entry[loss]["per_seed"].values()), width=0.4, label=loss.upper())
        ax.set_xlabel("seed")
        ax.set_ylabel(f"tokenized BLEU, {subset} (averaged checkpoint)")
        ax.legend()
        values = [v for loss in ("ce", "el") for v in entry[loss]["per_seed"].values()]
        ax.set_ylim(max(0.0, min(values) - 2), max(values) + 1)
        written.append(_save(fig, os.path.join(out, "bleu_per_seed.png")))
    if any(curves.values()):
        has_bleu = any(p[2] is not None for pts in curves.values() for p in pts)
        fig, axes = plt.subplots(1, 2 if has_bleu else 1, figsize=(11 if has_bleu else 6, 4), squeeze=False)
        for run, pts in curves.items():
            style = "-" if run.startswith("el") else "--"
            axes[0][0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=run)
            if has_bleu:
                axes[0][1].plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None],
                                style, label=run)
        axes[0][0].set_xlabel("epoch")
        axes[0][0].set_ylabel("validation NLL (base 2; the same for CE and EL)")
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


def _machine_line(prov):
    rec = next((r for r in prov.values() if r.get("machine")), None)
    if not rec:
        return None
    m, v = rec["machine"], rec.get("versions", {})
    where = ", ".join(m["gpus"]) if m.get("gpus") else f"{m.get('cpu')} ({m.get('cpu_cores')} cores, CPU only)"
    return (f"Machine: {where}; torch {v.get('torch')}, fairseq {v.get('fairseq')}, sacrebleu {v.get('sacrebleu')}, "
            f"el-fairseq {v.get('el-fairseq')} (git {v.get('el-fairseq_git')}).")


def render_markdown(task, table, significance, margins, subsets, prov, pngs):
    lines = [f"# CE vs EL: {task}", "",
             f"Generated by `python -m el_fairseq.pipeline.report` on {datetime.date.today().isoformat()}. "
             "Mean ± sample standard deviation over seeds; Δ = EL − CE. A Δ smaller than the seeds' standard "
             "deviations is not a result.", ""]
    machine = _machine_line(prov)
    if machine:
        lines += [machine, ""]
    lines += ["Criterion flags: CE `" + " ".join(LOSS_FLAGS["ce"]) + "`; EL `" + " ".join(LOSS_FLAGS["el"]) + "`.",
              "Full fairseq-train commands per run: results.json (`runs`).", ""]
    for subset, name in subsets.items():
        lines += [f"## {subset}: {name}", "", "| checkpoint | metric | CE | EL | Δ |", "|---|---|---|---|---|"]
        signature = None
        for kind in KINDS:
            for metric in METRICS:
                entry = table.get(f"{subset}/{kind}/{metric}")
                if not entry:
                    continue
                delta = f"{entry['delta']:+.2f}" if "delta" in entry else "-"
                label = "average of last epochs" if kind == "avg" else "checkpoint_best"
                metric_name = "tokenized BLEU (fairseq)" if metric == "tokenized_bleu" else "sacreBLEU"
                lines.append(f"| {label} | {metric_name} | {_fmt(entry['ce'])} | {_fmt(entry['el'])} | {delta} |")
        sig = significance.get(subset)
        if sig:
            signature = sig["signature"]
            lines += ["", f"Paired tests, averaged checkpoints, sacreBLEU (`{signature}`): bootstrap with "
                      f"{sig['samples']} resamples (each system's mean ± 95% interval, Δ with its 95% interval, "
                      f"p-value) and approximate randomisation ({sig['trials']} trials, p-value).", "",
                      "| seed | CE | EL | Δ [95% CI] | p (bootstrap) | p (AR) |", "|---|---|---|---|---|---|"]
            for seed, b in sig["per_seed"].items():
                lines.append(f"| {seed} | {b['ce']['mean']:.2f} ± {b['ce']['ci']:.2f} | "
                             f"{b['el']['mean']:.2f} ± {b['el']['ci']:.2f} | {b['delta']:+.2f} "
                             f"[{b['delta_ci95'][0]:+.2f}, {b['delta_ci95'][1]:+.2f}] | {b['p_value_bootstrap']:.4f} | "
                             f"{b['p_value_ar']:.4f} |")
            p = sig["pooled"]
            lines.append(f"| pooled ({p['seeds']} seed{'s' if p['seeds'] > 1 else ''}) | | | {p['delta']:+.2f} "
                         f"[{p['delta_ci95'][0]:+.2f}, {p['delta_ci95'][1]:+.2f}] | | |")
        lines.append("")
    paper = paper_bleu(task)
    if paper:
        lines += [f"The paper (Zhao et al., arXiv 2110.06537, 5 seeds, tokenized BLEU): CE {paper['ce']:.2f}, "
                  f"EL {paper['el']:.2f}, Δ {paper['el'] - paper['ce']:+.2f}.", ""]
    first = next(iter(subsets), "test")
    entry = table.get(f"{first}/avg/tokenized_bleu")
    if entry:
        lines += [f"## BLEU per seed (tokenized, averaged checkpoint, {first})", "", "| seed | CE | EL |", "|---|---|---|"]
        for seed in sorted(set(entry["ce"]["per_seed"]) | set(entry["el"]["per_seed"])):
            ce, el = entry["ce"]["per_seed"].get(seed), entry["el"]["per_seed"].get(seed)
            lines.append(f"| {seed} | {'-' if ce is None else f'{ce:.2f}'} | {'-' if el is None else f'{el:.2f}'} |")
        lines.append("")
    timed = {run: r for run, r in prov.items() if r.get("wall_s")}
    if timed:
        lines += ["## Time per run", "", "| run | epochs | wall time | training tokens/s |", "|---|---|---|---|"]
        for run, r in timed.items():
            tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
            lines.append(f"| {run} | {r.get('epochs')} | {r['wall_s'] / 60:.1f} min | {tps} |")
        speed = {loss: [r["tokens_per_s"] for run, r in timed.items() if run.startswith(loss) and r.get("tokens_per_s")]
                 for loss in ("ce", "el")}
        if speed["ce"] and speed["el"]:
            lines += ["", f"Training throughput EL / CE: {statistics.fmean(speed['el']) / statistics.fmean(speed['ce']):.3f} "
                      f"(mean tokens/s over runs: CE {statistics.fmean(speed['ce']):,.0f}, "
                      f"EL {statistics.fmean(speed['el']):,.0f})."]
        lines.append("")
    if margins:
        lines += [f"## Margins and energy (teacher-forced, {margins['subset']}, averaged checkpoints of the first seed)",
                  "", "| model | tokens | mean margin | median margin | mean energy | mean p_y | p_y > 0.5 |",
                  "|---|---|---|---|---|---|---|"]
        for label, s in margins["checkpoints"].items():
            lines.append(f"| {label} | {s['tokens']} | {s['margin']['mean']:.2f} | {s['margin']['q50']:.2f} | "
                         f"{s['energy']['mean']:.2f} | {s['p_y']['mean']:.3f} | {s['well_classified_pct']:.1f}% |")
        lines.append("")
    if pngs:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
    return "\n".join(lines) + "\n"


def report(out, task, data=None, margins=True, cpu=False):
    runs = collect(out)
    if not runs:
        raise FileNotFoundError(f"{out}: no evaluated runs ({{ce,el}}_seed*/eval_*/result.json)")
    subsets = subsets_of(runs)
    table = aggregate(runs)
    significance = paired_significance(runs)
    curves = valid_curves(out)
    prov = run_provenance(out)
    pngs = plot(table, curves, out, next(iter(subsets)))
    margin_result = None
    seeds = sorted(set(runs.get("ce", {})) & set(runs.get("el", {})))
    first = next(iter(subsets))
    if margins and data and seeds:
        from .analysis import analyze

        ckpts = [(runs[loss][seeds[0]][("avg", first)]["checkpoint"], loss.upper()) for loss in ("ce", "el")
                 if ("avg", first) in runs[loss][seeds[0]]]
        margin_result, margin_pngs = analyze(ckpts, data, first, out, cpu=cpu)
        pngs += margin_pngs
    results = {"task": task, "subsets": subsets, "table": table, "paired_significance": significance,
               "paper": paper_bleu(task), "criterion_flags": {k: quote(v) for k, v in LOSS_FLAGS.items()},
               "runs": prov, "valid_curves": curves, "margins": margin_result}
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"),
                       ("RESULTS.md", render_markdown(task, table, significance, margin_result, subsets, prov, pngs))):
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
    for subset, name in results["subsets"].items():
        avg = results["table"][f"{subset}/avg/tokenized_bleu"]
        print(f"{subset} ({name}): CE {_fmt(avg['ce'])}  EL {_fmt(avg['el'])}  "
              f"delta {avg.get('delta', float('nan')):+.2f}")
    print(f"-> {os.path.join(args.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()

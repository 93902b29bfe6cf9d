"""The reproduction report: OUT/RESULTS.md, OUT/results.json, OUT/bleu_per_seed.png, OUT/valid_curves.png,
OUT/hypotheses/, and the margin/energy comparison of the averaged CE and EL checkpoints of the first seed.

    python -m el_fairseq.pipeline.report OUT --task TARGET [--data DATA_BIN] [--no-margins] [--cpu]
    python -m el_fairseq.pipeline.report OUT --task TARGET --data DATA_BIN --from-hypotheses DIR

From the runs: reads OUT/{ce,el}_seed{N}/eval_{avg,best}_{SUBSET}/ (result.json, hyp.detok.txt,
ref.txt; the older eval_{avg,best}/ count as subset test), train.log, provenance.json and DONE, and
copies the detokenised hypotheses that sacreBLEU scored to OUT/hypotheses/{ce,el}_seed{N}_{avg,best}_
{SUBSET}.txt (line i = sentence i of SUBSET, i.e. fairseq's S-/H- id i, and line i of
DATA_BIN/{SUBSET}.raw.{tgt}), with OUT/hypotheses/evaluations.json holding each evaluation's
result.json (fairseq's tokenized BLEU, the sacreBLEU signature, the fairseq-generate command).

From hypotheses (--from-hypotheses DIR, or by itself when OUT has no evaluated run folders but has
OUT/hypotheses/evaluations.json): no checkpoint is needed. Every sacreBLEU figure, interval and
p-value is recomputed from DIR's hypotheses against DATA_BIN's raw references (a hypothesis file
whose score differs from its evaluations.json entry is refused); fairseq's tokenized BLEU, which
needs fairseq's tokenised output, is read from evaluations.json. Training times, validation curves
and margins, which need the runs, are carried over from an earlier OUT/results.json when there is one.
Any file can also be rescored by hand: sacrebleu DATA_BIN/test.raw.en -i OUT/hypotheses/el_seed1_avg_test.txt
(add -lc where the signature says case:lc).

Per test subset: mean ± sample standard deviation over seeds; Δ = EL − CE over the seeds evaluated for
both. Paired tests (el_fairseq.pipeline.significance, sacreBLEU's corpus BLEU from per-sentence
statistics, own generator independent of SACREBLEU_SEED, two-sided p-values): per seed, a paired
bootstrap and approximate randomisation, conditional on the trained models; over seeds, a two-level
(hierarchical) paired bootstrap. The same again with the sentences of all test subsets pooled, one
line per checkpoint kind. "Significant" follows the 95% interval. Throughput EL / CE per seed pair,
saying which pairs trained side by side. Validation curves compare NLL (and BLEU where logged), never
the criteria's own losses (EL's includes its negative bonus).
"""
import argparse
import datetime
import json
import logging
import os
import statistics
import sys

from . import hypotheses, significance
from .comparison import (ALL, KINDS, METRICS, aggregate, collect, language_pair, paired_significance, run_provenance,
                         subsets_of, throughput_pairs, valid_curves)
from .hypotheses import HYPOTHESES, MANIFEST
from .recipes import LOSS_FLAGS, RECIPES, quote

KIND_LABELS = {"avg": "average of last epochs", "best": "checkpoint_best"}
FEW_SEEDS = 5


def paper_bleu(task):
    """The paper's numbers for TARGET's recipe (recipes.Recipe.paper_bleu), or None."""
    from .reproduce import ALIASES, TASKS

    target = ALIASES.get(task, task)
    return RECIPES[TASKS[target][0]].paper_bleu if target in TASKS else None


def per_seed_figure(table, sig, subset, subsets, label):
    """Grouped bars of sacreBLEU per seed (averaged checkpoints, SUBSET), with each bar's 95% bootstrap
    interval (conditional on the trained model) as error bars, y from 0; None without results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = table.get(f"{subset}/avg/sacrebleu")
    if not entry or not (entry["ce"]["n"] or entry["el"]["n"]):
        return None
    seeds = sorted(set(entry["ce"]["per_seed"]) | set(entry["el"]["per_seed"]))
    tested = (sig.get("avg") or {}).get(subset, {}).get("per_seed", {})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    top = 0.0
    for offset, loss in ((-0.2, "ce"), (0.2, "el")):
        xs, heights, low, high = [], [], [], []
        for i, seed in enumerate(seeds):
            if seed not in entry[loss]["per_seed"]:
                continue
            xs.append(i + offset)
            # the unrounded score its interval belongs to (result.json rounds to 2 decimals)
            heights.append(tested[seed][loss]["score"] if seed in tested else entry[loss]["per_seed"][seed])
            ci = tested[seed][loss]["ci95"] if seed in tested else None
            # a percentile interval need not contain the full-set score: clip, never a negative bar
            low.append(max(0.0, heights[-1] - ci[0]) if ci else 0.0)
            high.append(max(0.0, ci[1] - heights[-1]) if ci else 0.0)
        ax.bar(xs, heights, width=0.4, label=loss.upper(), yerr=[low, high], capsize=4)
        top = max([top] + [h + e for h, e in zip(heights, high)])
    ax.set_xticks(range(len(seeds)))
    ax.set_xticklabels([str(s) for s in seeds])
    ax.set_xlabel("seed")
    ax.set_ylabel("sacreBLEU (averaged checkpoint)")
    ax.set_ylim(0, top * 1.2 or 1.0)  # from 0, with room above the bars for the legend
    ax.set_title(f"{label}: sacreBLEU per seed on {subset} ({subsets.get(subset, subset)})\n"
                 "error bars: 95% paired-bootstrap interval, given the trained model", fontsize=9)
    ax.legend(loc="upper right", ncol=2)
    return fig


def plot(table, sig, curves, out, subset, subsets, label):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig = per_seed_figure(table, sig, subset, subsets, label)
    if fig is not None:
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
        fig.suptitle(f"{label}: validation curves", fontsize=9)
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
    if stat["n"] == 1:
        return f"{stat['mean']:.2f} (1 seed)"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f} (n={stat['n']})"


def _seeds(seeds):
    seeds = list(seeds)
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"


def _delta_cell(entry):
    if "delta" not in entry:
        return "-"
    every = sorted(set(entry["ce"]["per_seed"]) | set(entry["el"]["per_seed"]))
    cell = f"{entry['delta']:+.2f}"
    return cell if entry["delta_seeds"] == every else f"{cell} ({_seeds(entry['delta_seeds'])} only)"


def _ci(ci, sign="+"):
    return f"[{ci[0]:{sign}.2f}, {ci[1]:{sign}.2f}]"


def _verdict(test):
    return "yes" if test["significant"] else "no"


def _machine_line(prov):
    rec = next((r for r in prov.values() if r.get("machine")), None)
    if not rec:
        return None
    m, v = rec["machine"], rec.get("versions", {})
    where = ", ".join(m["gpus"]) if m.get("gpus") else f"{m.get('cpu')} ({m.get('cpu_cores')} cores, CPU only)"
    return (f"Machine: {where}; torch {v.get('torch')}, fairseq {v.get('fairseq')}, sacrebleu {v.get('sacrebleu')}, "
            f"el-fairseq {v.get('el-fairseq')} (git {v.get('el-fairseq_git')}).")


def _scope_name(scope, sig, subsets):
    if scope == ALL:
        return f"all test sets together ({' + '.join(sig['subsets'])}, {sig['sentences']} sentences)"
    return f"{scope} ({subsets.get(scope, scope)}, {sig['sentences']} sentences)"


def _conclusion(over):
    if not over["significant"]:
        return "no significant difference (the 95% interval includes 0)"
    return f"{'EL' if over['delta'] > 0 else 'CE'} better (the 95% interval excludes 0)"


def _few_seeds_note(k):
    return (f"The interval over seeds rests on few seeds ({k}): with fewer than {FEW_SEEDS} the seed level of the "
            f"bootstrap has few distinct draws, so read it as a rough guide.")


def _paired_rows(kind, sig):
    rows = []
    for seed, b in sig["per_seed"].items():
        rows.append(f"| {KIND_LABELS[kind]} | seed {seed} (given the models) | {b['ce']['score']:.2f} "
                    f"{_ci(b['ce']['ci95'], '')} | {b['el']['score']:.2f} "
                    f"{_ci(b['el']['ci95'], '')} | {b['delta']:+.2f} {_ci(b['delta_ci95'])} | "
                    f"{b['p_value']:.4f} | {b['p_value_ar']:.4f} | {_verdict(b)} |")
    o = sig["over_seeds"]
    rows.append(f"| {KIND_LABELS[kind]} | **over {_seeds(sig['per_seed'])}** (two-level) | | | "
                f"**{o['delta']:+.2f} {_ci(o['delta_ci95'])}** | {o['p_value']:.4f} | | **{_verdict(o)}** |")
    return rows


def _paired_section(scope, sig_by_kind, subsets):
    present = {kind: sig_by_kind[kind][scope] for kind in KINDS if scope in sig_by_kind.get(kind, {})}
    if not present:
        return []
    first = next(iter(present.values()))
    lines = ["", f"Paired tests on {_scope_name(scope, first, subsets)}, sacreBLEU (`{first['signature']}`); "
             "scores with their 95% interval, two-sided p-values:", "",
             "| checkpoint | seeds | CE | EL | Δ [95% CI] | p (bootstrap) | p (AR) | significant |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for kind, sig in present.items():
        lines += _paired_rows(kind, sig)
        for seed, why in sig["seeds_left_out"].items():
            notes.append(f"{KIND_LABELS[kind]}: seed {seed} left out ({why}).")
    if len(first["per_seed"]) < FEW_SEEDS:
        notes.append(_few_seeds_note(len(first["per_seed"])))
    return lines + ([""] + notes if notes else [])


def _throughput_lines(prov):
    timed = {run: r for run, r in prov.items() if r.get("wall_s")}
    if not timed:
        return []
    lines = ["## Time per run", "", "| run | epochs | wall time | training tokens/s |", "|---|---|---|---|"]
    for run, r in timed.items():
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        lines.append(f"| {run} | {r.get('epochs')} | {r['wall_s'] / 60:.1f} min | {tps} |")
    pairs = throughput_pairs(prov)
    if pairs:
        lines += ["", "Training throughput EL / CE per seed pair (the same seed's runs). Side by side: their "
                  "wall-clock intervals (provenance start to DONE) overlap, so both ran under the same load; "
                  "a pair trained at different times may have run under different loads, and its ratio "
                  "measures the load as much as the loss.", "",
                  "| seed | CE tokens/s | EL tokens/s | EL / CE | trained side by side |", "|---|---|---|---|---|"]
        for seed, p in pairs.items():
            side = {True: "yes", False: "no", None: "unknown (no start/end time)"}[p["side_by_side"]]
            lines.append(f"| {seed} | {p['ce']:,.0f} | {p['el']:,.0f} | {p['ratio']:.3f} | {side} |")
        like = [p["ratio"] for p in pairs.values() if p["side_by_side"]]
        if like:
            lines += ["", f"Side-by-side pairs: EL / CE {statistics.fmean(like):.3f} "
                      f"(mean over {len(like)} pair{'s' if len(like) > 1 else ''})."]
    return lines + [""]


def render_markdown(task, table, sig, margins, subsets, prov, pngs, pair, from_hypotheses=None):
    lines = [f"# CE vs EL: {task} ({pair})", "",
             f"Generated by `python -m el_fairseq.pipeline.report` on {datetime.date.today().isoformat()}"
             + (f" from the hypotheses in `{from_hypotheses}`" if from_hypotheses else "") + ". "
             "Mean ± sample standard deviation over seeds; Δ = EL − CE over the seeds evaluated for both. "
             "A Δ smaller than the seeds' standard deviations is not a result.", ""]
    machine = _machine_line(prov)
    if machine:
        lines += [machine, ""]
    lines += ["Criterion flags: CE `" + " ".join(LOSS_FLAGS["ce"]) + "`; EL `" + " ".join(LOSS_FLAGS["el"]) + "`.",
              "Full fairseq-train commands per run: results.json (`runs`).", ""]
    any_sig = next((s for by_scope in sig.values() for s in by_scope.values()), None)
    if any_sig:
        lines += [
            "Statistics. Every interval is the 95% percentile interval of a paired bootstrap with "
            f"{any_sig['samples']} resamples of sacreBLEU's corpus BLEU (from per-sentence statistics, as "
            "sacreBLEU computes it); CE and EL of a seed are always scored on the same resampled sentences, "
            f"drawn by the report's own generator (seed {any_sig['rng_seed']}, independent of SACREBLEU_SEED). "
            "All p-values are two-sided: bootstrap p = 2·min(P(Δ* ≤ 0), P(Δ* ≥ 0)) with the +1 correction; "
            f"approximate randomisation ({any_sig['trials']} trials, sentences swapped between CE and EL) "
            "p = P(|Δ_perm| ≥ |Δ|), +1 corrected. **Significant** means the 95% interval excludes 0, nothing "
            "else. A *seed* row resamples sentences only: it is conditional on the two trained models and "
            "ignores the variance between trainings. The *over seeds* row is a two-level bootstrap (seeds "
            "with replacement, and the sentences, one draw shared by the drawn seeds since they all translated "
            "the same test set): the interval that speaks about the "
            "training method.", ""]
        lines += ["## Summary", "", "| checkpoint | test sets | seeds | Δ [95% CI] over seeds | p (two-sided) | "
                  "conclusion |", "|---|---|---|---|---|---|"]
        for kind in KINDS:
            for scope, s in sig.get(kind, {}).items():
                o = s["over_seeds"]
                lines.append(f"| {KIND_LABELS[kind]} | {'all: ' + ' + '.join(s['subsets']) if scope == ALL else scope}"
                             f" | {o['seeds']} | {o['delta']:+.2f} {_ci(o['delta_ci95'])} | {o['p_value']:.4f} | "
                             f"{_conclusion(o)} |")
        k = min(s["over_seeds"]["seeds"] for by_scope in sig.values() for s in by_scope.values())
        if k < FEW_SEEDS:
            lines += ["", _few_seeds_note(k)]
        lines += ["", f"The hypotheses sacreBLEU scored: `{HYPOTHESES}/{{ce,el}}_seed{{N}}_{{avg,best}}_{{subset}}.txt` "
                  f"(line i = sentence i of the subset; `{HYPOTHESES}/{MANIFEST}` holds each evaluation). "
                  f"`python -m el_fairseq.pipeline.report OUT --from-hypotheses OUT/{HYPOTHESES} --data DATA_BIN` "
                  "re-makes every statistic from them; `sacrebleu DATA_BIN/test.raw.en -i "
                  f"{HYPOTHESES}/el_seed1_avg_test.txt` (with `-lc` for case:lc) rescores one.", ""]
    for subset, name in subsets.items():
        lines += [f"## {subset}: {name}", "", "| checkpoint | metric | CE | EL | Δ |", "|---|---|---|---|---|"]
        for kind in KINDS:
            for metric in METRICS:
                entry = table.get(f"{subset}/{kind}/{metric}")
                if not entry or not (entry["ce"]["n"] or entry["el"]["n"]):
                    continue
                metric_name = "tokenized BLEU (fairseq)" if metric == "tokenized_bleu" else "sacreBLEU"
                lines.append(f"| {KIND_LABELS[kind]} | {metric_name} | {_fmt(entry['ce'])} | {_fmt(entry['el'])} | "
                             f"{_delta_cell(entry)} |")
        lines += _paired_section(subset, sig, subsets)
        lines.append("")
    if any(ALL in by_scope for by_scope in sig.values()):
        lines += ["## All test sets together", "",
                  "The sentences of every test set concatenated per seed, in the same paired tests."]
        lines += _paired_section(ALL, sig, subsets) + [""]
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
    lines += _throughput_lines(prov)
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


def _earlier(out):
    """OUT/results.json of an earlier report, or {}."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def report(out, task, data=None, margins=True, cpu=False, from_hypotheses=None,
           samples=significance.BOOTSTRAP_SAMPLES, trials=significance.AR_TRIALS):
    runs = {} if from_hypotheses else collect(out)
    if not runs and not from_hypotheses and os.path.exists(os.path.join(out, HYPOTHESES, MANIFEST)):
        from_hypotheses = os.path.join(out, HYPOTHESES)
    if from_hypotheses:
        runs = hypotheses.collect(from_hypotheses, data)
    if not runs:
        raise FileNotFoundError(f"{out}: no evaluated runs ({{ce,el}}_seed*/eval_*/result.json) and no "
                                f"{HYPOTHESES}/{MANIFEST}")
    subsets = subsets_of(runs)
    table = aggregate(runs)
    sig = paired_significance(runs, samples=samples, trials=trials)
    pair = language_pair(runs, task)
    first = next(iter(subsets))
    if from_hypotheses:  # what needs the runs themselves comes from the earlier report, if any
        earlier = _earlier(out)
        prov, curves, margin_result = (earlier.get("runs") or {}), (earlier.get("valid_curves") or {}), earlier.get("margins")
    else:
        prov, curves, margin_result = run_provenance(out), valid_curves(out), None
    pngs = plot(table, sig, curves, out, first, subsets, pair if pair == task else f"{pair} ({task})")
    seeds = sorted(set(runs.get("ce", {})) & set(runs.get("el", {})))
    if margins and data and seeds and not from_hypotheses:
        from .analysis import analyze

        ckpts = [(runs[loss][seeds[0]][("avg", first)]["checkpoint"], loss.upper()) for loss in ("ce", "el")
                 if ("avg", first) in runs[loss][seeds[0]]]
        margin_result, margin_pngs = analyze(ckpts, data, first, out, cpu=cpu)
        pngs += margin_pngs
    elif margin_result:
        pngs += [p for p in (os.path.join(out, f"{n}_hist.png") for n in ("margin", "energy", "p_y")) if os.path.exists(p)]
    hypotheses.keep(runs, out)
    results = {"task": task, "pair": pair, "subsets": subsets, "table": table, "paired_significance": sig,
               "paper": paper_bleu(task), "criterion_flags": {k: quote(v) for k, v in LOSS_FLAGS.items()},
               "runs": prov, "throughput_pairs": throughput_pairs(prov), "valid_curves": curves,
               "margins": margin_result, "from_hypotheses": from_hypotheses}
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"),
                       ("RESULTS.md", render_markdown(task, table, sig, margin_result, subsets, prov, pngs, pair,
                                                      from_hypotheses))):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--task", default="custom")
    parser.add_argument("--data", help="data-bin: for the margin/energy comparison, and the raw references "
                                       "with --from-hypotheses")
    parser.add_argument("--from-hypotheses", metavar="DIR",
                        help="re-make the statistics from a hypotheses folder (OUT/hypotheses of a report)")
    parser.add_argument("--no-margins", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args(argv)
    # fairseq's imports turn the root logger to DEBUG; matplotlib would then print its font search
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    try:
        results = report(args.out, args.task, args.data, not args.no_margins, args.cpu, args.from_hypotheses)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"report: error: {err}")
    for subset, name in results["subsets"].items():
        avg = results["table"][f"{subset}/avg/tokenized_bleu"]
        delta = f"{avg['delta']:+.2f}" if "delta" in avg else "-"
        print(f"{subset} ({name}): CE {_fmt(avg['ce'])}  EL {_fmt(avg['el'])}  delta {delta}")
    for kind, by_scope in results["paired_significance"].items():
        for scope, s in by_scope.items():
            o = s["over_seeds"]
            print(f"{kind} {scope}: sacreBLEU delta over {o['seeds']} seeds {o['delta']:+.2f} {_ci(o['delta_ci95'])}, "
                  f"p {o['p_value']:.4f} (two-sided): {_conclusion(o)}")
    print(f"-> {os.path.join(args.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()

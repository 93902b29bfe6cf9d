"""CE against EL from their evaluations: the results per run, mean ± standard deviation and Δ per
subset, the paired tests (el_fairseq.pipeline.significance) per seed and over seeds, per subset and
over every subset together, and the runs' provenance (times, throughput per seed pair).

Layout read: OUT/{ce,el}_seed{N}/eval_{avg,best}_{SUBSET}/ (result.json, hyp.detok.txt, ref.txt; the
older eval_{avg,best}/ count as subset test), train.log, provenance.json and DONE.
"""
import glob
import json
import os
import re
import statistics

from . import provenance, significance, testsets

RUN_DIR = re.compile(r"(ce|el)_seed(\d+)$")
EVAL_DIR = re.compile(r"eval_(avg|best)(?:_(\w+))?$")
KINDS = ("avg", "best")
METRICS = ("tokenized_bleu", "sacrebleu")
ALL = "all"  # the scope of the paired tests over every test subset together


def collect(out):
    """{loss: {seed: {(kind, subset): result}}} from the run folders; each result carries the paths of
    the hypotheses and references it was scored on (_hyp, _ref) where they exist."""
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
                for key, name in (("_hyp", "hyp.detok.txt"), ("_ref", "ref.txt")):
                    if os.path.exists(os.path.join(folder, name)):
                        result[key] = os.path.join(folder, name)
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
    """Mean and sample standard deviation; the deviation of fewer than two values is None (undefined)."""
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs):
    """{subset/kind/metric: {ce, el: {per_seed, mean, std, n}, delta, delta_seeds}}; Δ is the mean over
    the seeds that have both a CE and an EL result (delta_seeds) of EL − CE."""
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
                both = sorted(set(entry["ce"]["per_seed"]) & set(entry["el"]["per_seed"]))
                if both:
                    entry["delta"] = statistics.fmean(entry["el"]["per_seed"][s] - entry["ce"]["per_seed"][s]
                                                      for s in both)
                    entry["delta_seeds"] = both
                table[f"{subset}/{kind}/{metric}"] = entry
    return table


def _lines(path):
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _metric(signature):
    from sacrebleu.metrics import BLEU

    return BLEU(lowercase="case:lc" in signature)


def sentence_statistics(runs):
    """{(loss, seed, kind, subset): per-sentence sacreBLEU statistics} of every result with its
    hypotheses and references, each checked against the score its result.json records."""
    stats = {}
    for loss, per_seed in runs.items():
        for seed, results in per_seed.items():
            for (kind, subset), r in results.items():
                if not (r.get("_hyp") and r.get("_ref")):
                    continue
                metric = _metric(r["sacrebleu"]["signature"])
                s = significance.sentence_stats(metric, _lines(r["_hyp"]), _lines(r["_ref"]))
                score = significance.corpus_bleu(metric, s.sum(0))
                if abs(score - r["sacrebleu"]["score"]) > 0.005 + 1e-9:
                    raise ValueError(f"{r['_hyp']} scores {score:.2f} against {r['_ref']}, but its evaluation "
                                     f"recorded {r['sacrebleu']['score']:.2f}: not the references it was scored on")
                stats[(loss, seed, kind, subset)] = s
    return stats


def paired_significance(runs, stats=None, samples=significance.BOOTSTRAP_SAMPLES, trials=significance.AR_TRIALS):
    """{kind: {subset or 'all': {per_seed, over_seeds, seeds_left_out, signature, sentences}}}.

    Per seed: paired bootstrap (each system's score and 95% interval, Δ with its interval and two-sided
    p) and approximate randomisation (two-sided p), conditional on the trained models. Over seeds: the
    two-level bootstrap. 'all': the sentences of every subset concatenated, per seed."""
    import numpy as np

    stats = sentence_statistics(runs) if stats is None else stats
    subsets = list(subsets_of(runs))
    seeds = sorted(set(runs.get("ce", {})) | set(runs.get("el", {})))
    out = {}
    for kind in KINDS:
        scopes = {subset: [subset] for subset in subsets}
        if len(subsets) > 1:
            scopes[ALL] = subsets
        for scope, members in scopes.items():
            pairs, left_out = {}, {}
            for seed in seeds:
                missing = [f"{loss.upper()} {subset}" for subset in members for loss in ("ce", "el")
                           if (loss, seed, kind, subset) not in stats]
                if missing:
                    left_out[seed] = "no scored hypotheses for " + ", ".join(missing)
                    continue
                pairs[seed] = tuple(np.concatenate([stats[(loss, seed, kind, subset)] for subset in members])
                                    for loss in ("ce", "el"))
            if not pairs:
                continue
            signatures = {runs[loss][seed][(kind, subset)]["sacrebleu"]["signature"]
                          for seed in pairs for subset in members for loss in ("ce", "el")}
            if len(signatures) > 1:
                raise ValueError(f"{kind} {scope}: results scored with different sacreBLEU signatures: "
                                 + "; ".join(sorted(signatures)))
            signature = signatures.pop()
            metric = _metric(signature)
            generator = significance.rng()
            per_seed = {}
            for seed, (ce, el) in pairs.items():
                per_seed[seed] = significance.paired_bootstrap(metric, ce, el, samples, generator)
                per_seed[seed]["p_value_ar"] = significance.approximate_randomization(
                    metric, ce, el, trials, generator)["p_value"]
            over = significance.hierarchical_bootstrap(metric, list(pairs.values()), samples, generator)
            out.setdefault(kind, {})[scope] = {
                "subsets": members, "sentences": int(len(next(iter(pairs.values()))[0])), "signature": signature,
                "per_seed": per_seed, "over_seeds": over, "seeds_left_out": left_out,
                "samples": samples, "trials": trials, "rng_seed": significance.RNG_SEED}
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
    """{run: {command, versions, machine, started, finished, epochs, wall_s, tokens_per_s}} of every
    finished run folder; finished is the time DONE was written (the wrapper writes it as fairseq-train
    ends), else started + the run's wall time."""
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
        finished = os.path.getmtime(done)
        if record.get("started") is not None and finished < record["started"] and record.get("wall_s"):
            finished = record["started"] + record["wall_s"]  # DONE's time lost (a copy): the log's wall time
        record["finished"] = finished
        runs[os.path.basename(run)] = record
    return runs


def _interval(run):
    """(started, finished) of a run's provenance; finished falls back to started + its wall time (the
    records of reports made before finished was kept)."""
    started, finished = run.get("started"), run.get("finished")
    if finished is None and started is not None and run.get("wall_s"):
        finished = started + run["wall_s"]
    return started, finished


def throughput_pairs(prov):
    """{seed: {ce, el (tokens/s), ratio (EL / CE), side_by_side}} for every seed with both runs timed;
    side by side: the two runs' wall-clock intervals (started to finished) overlap, so both ran under
    the same load."""
    pairs = {}
    for run, ce in prov.items():
        match = RUN_DIR.search(run)
        el = prov.get(f"el_seed{match.group(2)}") if match and match.group(1) == "ce" else None
        if not el or not ce.get("tokens_per_s") or not el.get("tokens_per_s"):
            continue
        times = [t for r in (ce, el) for t in _interval(r)]
        side = None if None in times else max(times[0], times[2]) < min(times[1], times[3])
        pairs[int(match.group(2))] = {"ce": ce["tokens_per_s"], "el": el["tokens_per_s"],
                                      "ratio": el["tokens_per_s"] / ce["tokens_per_s"], "side_by_side": side}
    return dict(sorted(pairs.items()))


def language_pair(runs, task):
    """'de-en' from the evaluations (their data folder's testsets.json), else the task's name."""
    for per_seed in runs.values():
        for results in per_seed.values():
            for r in results.values():
                if r.get("pair"):
                    return r["pair"]
                info = testsets.read(r["data"]) if r.get("data") and os.path.isdir(r["data"]) else None
                if info and info.get("source") and info.get("target"):
                    return f"{info['source']}-{info['target']}"
    return task

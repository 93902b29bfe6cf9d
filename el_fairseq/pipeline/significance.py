"""Paired significance of EL against CE from sacreBLEU's per-sentence statistics.

A corpus BLEU here is always sacreBLEU's own corpus statistic, computed from the summed per-sentence
sufficient statistics [hyp_len, ref_len, correct_1..4, total_1..4] by `BLEU._compute_score_from_stats`
(what `BLEU.corpus_score` does on the whole test set). Resampling uses this module's own generator
with a fixed seed (RNG_SEED), never sacreBLEU's SACREBLEU_SEED, and CE and EL of a seed are always
resampled with the same sentence indices.

- paired_bootstrap: one seed, sentences resampled with replacement. Its interval is conditional on the
  two trained models: it holds test-set variance only, not the variance between trainings.
- hierarchical_bootstrap: the interval over seeds. Each resample draws k seeds with replacement from
  the k seeds, and one set of sentence indices (with replacement) at which every drawn seed's CE and EL
  are scored; Δ* = mean over the drawn seeds of EL − CE. Seed-to-seed variance enters through the
  first level, test-set variance through the second. The sentences are drawn once per resample, not
  once per seed, because every seed translated the same test set (seeds and sentences are crossed, not
  nested): independent draws per seed would treat each seed's test set as a fresh sample and shrink
  the sentence part of the interval by the square root of the number of seeds.
- approximate_randomization: per trial, each sentence's CE and EL statistics are swapped with
  probability 1/2; p = (1 + #{|Δ_perm| >= |Δ|}) / (trials + 1), two-sided.
- two_sided_p: for a bootstrap, p = min(1, 2 min(1 + #{Δ* <= 0}, 1 + #{Δ* >= 0}) / (B + 1)): the
  percentile test of Δ = 0, two-sided, with the usual +1 correction.

Intervals are the 2.5 and 97.5 percentiles of Δ*; "significant" means that interval excludes 0.
"""
import numpy as np

RNG_SEED = 2110  # fixed: the same resamples on every run, whatever SACREBLEU_SEED says
BOOTSTRAP_SAMPLES = 1000
AR_TRIALS = 10000


def rng(seed=RNG_SEED):
    return np.random.default_rng(seed)


def sentence_stats(metric, hypotheses, references):
    """(n, 2 + 2 * max_ngram_order) int64 array: sacreBLEU's sufficient statistics per sentence."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return np.asarray(metric._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=np.int64)


def corpus_bleu(metric, summed):
    """sacreBLEU's corpus BLEU of one summed statistics vector, or of each row of a (B, d) array."""
    summed = np.asarray(summed)
    if summed.ndim == 1:
        return metric._compute_score_from_stats(summed.tolist()).score
    return np.array([metric._compute_score_from_stats(row).score for row in summed.tolist()])


def interval(values):
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return [float(lo), float(hi)]


def two_sided_p(deltas):
    deltas = np.asarray(deltas)
    below, above = int(np.sum(deltas <= 0)), int(np.sum(deltas >= 0))
    return min(1.0, 2.0 * (1 + min(below, above)) / (len(deltas) + 1))


def _summary(deltas, delta):
    ci = interval(deltas)
    return {"delta": float(delta), "delta_ci95": ci, "p_value": two_sided_p(deltas),
            "significant": bool(ci[0] > 0 or ci[1] < 0)}


def paired_bootstrap(metric, ce, el, samples=BOOTSTRAP_SAMPLES, generator=None):
    """One seed: EL vs CE on the same resampled sentences. ce, el: sentence_stats of the same test set.
    Returns each system's score and 95% interval, Δ with its interval and two-sided p."""
    if ce.shape != el.shape:
        raise ValueError(f"CE has {len(ce)} sentences but EL {len(el)}: not the same test set")
    generator = generator or rng()
    n = len(ce)
    scores = {"ce": np.empty(samples), "el": np.empty(samples)}
    for b in range(samples):
        idx = generator.integers(0, n, size=n)  # one index set for both systems: paired
        scores["ce"][b] = corpus_bleu(metric, ce[idx].sum(0))
        scores["el"][b] = corpus_bleu(metric, el[idx].sum(0))
    full = {name: corpus_bleu(metric, stats.sum(0)) for name, stats in (("ce", ce), ("el", el))}
    out = {name: {"score": float(full[name]), "mean": float(scores[name].mean()), "ci95": interval(scores[name])}
           for name in ("ce", "el")}
    out.update(_summary(scores["el"] - scores["ce"], full["el"] - full["ce"]))
    out["samples"] = samples
    return out


def hierarchical_bootstrap(metric, pairs, samples=BOOTSTRAP_SAMPLES, generator=None):
    """Over seeds: pairs = [(ce_stats, el_stats) per seed]. Δ = mean over seeds of the per-seed Δ;
    its interval from resampling seeds and, once per resample, the sentences (the same indices for
    every drawn seed's CE and EL)."""
    if not pairs:
        raise ValueError("no seed with both CE and EL")
    for ce, el in pairs:
        if ce.shape != el.shape or len(ce) != len(pairs[0][0]):
            raise ValueError(f"CE has {len(ce)} sentences but EL {len(el)} (first seed {len(pairs[0][0])}): "
                             "not the same test set")
    generator = generator or rng()
    k = len(pairs)
    deltas = np.empty(samples)
    for b in range(samples):
        drawn = generator.integers(0, k, size=k)
        idx = generator.integers(0, len(pairs[0][0]), size=len(pairs[0][0]))  # shared: one test set
        total = 0.0
        for j in drawn:
            ce, el = pairs[j]
            total += corpus_bleu(metric, el[idx].sum(0)) - corpus_bleu(metric, ce[idx].sum(0))
        deltas[b] = total / k
    per_seed = [corpus_bleu(metric, el.sum(0)) - corpus_bleu(metric, ce.sum(0)) for ce, el in pairs]
    return {**_summary(deltas, float(np.mean(per_seed))), "seeds": k, "samples": samples}


def approximate_randomization(metric, ce, el, trials=AR_TRIALS, generator=None, chunk=500):
    """Two-sided p of Δ = 0: each sentence's statistics swapped between CE and EL with probability 1/2."""
    if ce.shape != el.shape:
        raise ValueError(f"CE has {len(ce)} sentences but EL {len(el)}: not the same test set")
    generator = generator or rng()
    observed = abs(corpus_bleu(metric, el.sum(0)) - corpus_bleu(metric, ce.sum(0)))
    ce_total, el_total, diff = ce.sum(0), el.sum(0), el - ce
    at_least = 0
    for start in range(0, trials, chunk):
        swap = generator.integers(0, 2, size=(min(chunk, trials - start), len(ce)))
        # what the swapped sentences move from EL's sums to CE's: counts, exact in float64 (< 2**53),
        # through a BLAS product
        moved = np.rint(swap.astype(np.float64) @ diff.astype(np.float64)).astype(np.int64)
        perm = np.abs(corpus_bleu(metric, el_total - moved) - corpus_bleu(metric, ce_total + moved))
        # a tolerance so that an exact tie in float arithmetic counts as a tie
        at_least += int(np.sum(perm >= observed - 1e-9))
    return {"p_value": (1 + at_least) / (trials + 1), "trials": trials}

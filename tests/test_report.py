"""The reproduction report's arithmetic and statistics on hand-made evaluations: mean ± std and Δ per
subset, sacreBLEU's corpus BLEU from per-sentence statistics, the paired bootstrap per seed and the
two-level bootstrap over seeds, two-sided p-values, the kept hypotheses (and the report re-made from
them), the pooled line over test sets, missing evaluations, throughput per seed pair, the plot, and
evaluate's one-line error for a subset the data lacks."""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sacrebleu.metrics import BLEU

from el_fairseq.pipeline import report as report_module
from el_fairseq.pipeline import significance, testsets
from el_fairseq.pipeline.report import aggregate, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNATURE = "nrefs:1|case:lc|eff:no|tok:13a|smooth:exp|version:2.6.0"
FAST = {"samples": 300, "trials": 500}


def write_result(folder, tok, sacre, subset="test", name="test_2016_flickr", hyps=None, refs=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"checkpoint": os.path.join(os.path.dirname(folder), "x.pt"), "tokenized_bleu": tok,
                   "subset": subset, "test_set": name, "sacrebleu": {"score": sacre, "signature": SIGNATURE}}, f)
    for fname, lines in (("hyp.detok.txt", hyps), ("ref.txt", refs)):
        if lines is not None:
            with open(os.path.join(folder, fname), "w") as f:
                f.writelines(line + "\n" for line in lines)


def references(n, length=12, seed=3):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    return [" ".join(rng.choice(words) for _ in range(length)) for _ in range(n)]


def degrade(refs, p, seed):
    """Drop the last words of a share p of the sentences: lower BLEU for larger p."""
    rng = random.Random(seed)
    return [r if rng.random() > p else " ".join(r.split()[:7]) for r in refs]


def evaluated(out, loss, seed, hyps, refs, subset="test", name="test_2016_flickr", kinds=("avg",)):
    score = BLEU(lowercase=True).corpus_score(hyps, [refs]).score
    for kind in kinds:
        write_result(os.path.join(out, f"{loss}_seed{seed}", f"eval_{kind}_{subset}"), score, round(score, 2),
                     subset, name, hyps, refs)
    return score


def test_report_mean_std_and_delta_per_subset_on_hand_made_results(tmp_path):
    ce, el = [30.0, 31.0, 32.0], [31.5, 32.5, 34.5]
    for seed, (c, e) in enumerate(zip(ce, el), 1):
        for kind in ("avg", "best"):
            write_result(str(tmp_path / f"ce_seed{seed}" / f"eval_{kind}_test"), c, c - 1)
            write_result(str(tmp_path / f"el_seed{seed}" / f"eval_{kind}_test"), e, e - 1)
            write_result(str(tmp_path / f"ce_seed{seed}" / f"eval_{kind}_test1"), c - 5, c - 6, "test1", "test_2017_flickr")
            write_result(str(tmp_path / f"el_seed{seed}" / f"eval_{kind}_test1"), e - 7, e - 8, "test1", "test_2017_flickr")
    results = report(str(tmp_path), "de-en", margins=False)
    avg = results["table"]["test/avg/tokenized_bleu"]
    assert avg["ce"]["mean"] == pytest.approx(31.0) and avg["ce"]["std"] == pytest.approx(1.0)
    assert avg["el"]["mean"] == pytest.approx(32.8333333) and avg["el"]["std"] == pytest.approx(1.5275252)
    assert avg["delta"] == pytest.approx(1.8333333) and avg["delta_seeds"] == [1, 2, 3]
    assert results["table"]["test/best/sacrebleu"]["delta"] == pytest.approx(1.8333333)
    assert results["table"]["test1/avg/tokenized_bleu"]["delta"] == pytest.approx(1.8333333 - 2)
    assert results["subsets"] == {"test": "test_2016_flickr", "test1": "test_2017_flickr"}
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## test: test_2016_flickr" in md and "## test1: test_2017_flickr" in md
    assert "31.00 ± 1.00 (n=3)" in md and "+1.83" in md and "-0.17" in md and "35.09" in md and "35.50" in md
    assert "label_smoothed_cross_entropy --label-smoothing 0.1" in md and "--criterion encouraging_loss" in md
    assert (tmp_path / "bleu_per_seed.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["paper"] == {"ce": 35.09, "el": 35.50}


def test_aggregate_single_seed_has_no_std_and_missing_loss_has_no_delta():
    table = aggregate({"ce": {1: {("avg", "test"): {"tokenized_bleu": 20.0, "sacrebleu": {"score": 19.0}}}}})
    assert table["test/avg/tokenized_bleu"]["ce"]["std"] is None and "delta" not in table["test/avg/tokenized_bleu"]


def test_corpus_bleu_from_summed_sentence_statistics_is_sacrebleus(tmp_path):
    """On the whole set and on one resample (repeated sentences), with sentences that match no 4-gram
    (exp smoothing) and an empty hypothesis."""
    refs = references(60, length=9)
    hyps = degrade(refs, 0.5, 1)
    hyps[3], hyps[7] = "w1 w2", ""
    for lowercase in (True, False):
        metric = BLEU(lowercase=lowercase)
        stats = significance.sentence_stats(metric, hyps, refs)
        assert significance.corpus_bleu(metric, stats.sum(0)) == BLEU(lowercase=lowercase).corpus_score(
            hyps, [refs]).score
        idx = np.random.default_rng(0).integers(0, len(refs), size=len(refs))
        assert significance.corpus_bleu(metric, stats[idx].sum(0)) == pytest.approx(BLEU(lowercase=lowercase).corpus_score(
            [hyps[i] for i in idx], [[refs[i] for i in idx]]).score, abs=1e-12)


def test_interval_over_seeds_includes_the_seed_to_seed_variance(tmp_path):
    """Per-seed Δ of about +6.7, +7.3 and -6.0, each clearly away from 0 given its models: the interval
    over seeds must include 0 (the old pooled interval averaged the per-seed resamples with the models
    held fixed and came out as a "significant" +2.68 [+0.81, +4.39])."""
    refs = references(300)
    for seed, (p_ce, p_el) in {1: (0.49, 0.38), 2: (0.53, 0.39), 3: (0.40, 0.47)}.items():
        evaluated(str(tmp_path), "ce", seed, degrade(refs, p_ce, 10 * seed), refs)
        evaluated(str(tmp_path), "el", seed, degrade(refs, p_el, 10 * seed + 1), refs)
    results = report(str(tmp_path), "multi30k-cpu-de-en", margins=False)
    sig = results["paired_significance"]["avg"]["test"]
    deltas = [sig["per_seed"][s]["delta"] for s in (1, 2, 3)]
    assert deltas == pytest.approx([6.7, 7.3, -6.0], abs=0.2)
    for s in (1, 2, 3):
        assert sig["per_seed"][s]["significant"]  # each seed's interval, given its models, excludes 0
    over = sig["over_seeds"]
    assert over["delta"] == pytest.approx(np.mean(deltas)) and over["seeds"] == 3
    lo, hi = over["delta_ci95"]
    assert lo < 0 < hi and not over["significant"] and over["p_value"] > 0.05
    assert lo < min(deltas) + 1.5 and hi > max(deltas) - 1.5  # the seed level spans the per-seed results
    md = (tmp_path / "RESULTS.md").read_text()
    assert "rests on few seeds (3)" in md and "two-sided" in md and "given the models" in md
    assert "no significant difference" in md and "over seeds 1, 2, 3" in md


def test_seeds_scored_on_one_test_set_share_its_sentence_resamples():
    """Seeds are crossed with the test sentences (every seed translated the same test set), so the
    test-set part of the interval over seeds must not shrink with the number of seeds: four seeds that
    are copies of one seed give the one seed's interval, not one half as wide (independent sentence
    draws per seed averaged four independent test-set samples)."""
    metric = BLEU()
    refs = references(400)
    ce = significance.sentence_stats(metric, degrade(refs, 0.45, 1), refs)
    el = significance.sentence_stats(metric, degrade(refs, 0.40, 2), refs)
    one = significance.paired_bootstrap(metric, ce, el, samples=400)
    four = significance.hierarchical_bootstrap(metric, [(ce, el)] * 4, samples=400)
    assert four["delta"] == pytest.approx(one["delta"])
    width = lambda r: r["delta_ci95"][1] - r["delta_ci95"][0]  # noqa: E731
    assert 0.8 < width(four) / width(one) < 1.25
    with pytest.raises(ValueError, match="not the same test set"):
        significance.hierarchical_bootstrap(metric, [(ce, el), (ce[:-1], el[:-1])], samples=10)


def test_ce_and_el_share_their_resamples_whatever_sacrebleu_seed_says(tmp_path, monkeypatch):
    """Identical CE and EL hypotheses: every paired resample gives Δ* = 0 exactly, whatever
    SACREBLEU_SEED is ('none' unpaired sacreBLEU's resampling of CE and EL); and the figures do not
    depend on SACREBLEU_SEED."""
    refs = references(80)
    for seed in (1, 2):
        hyps = degrade(refs, 0.4, seed)
        evaluated(str(tmp_path / "same"), "ce", seed, hyps, refs)
        evaluated(str(tmp_path / "same"), "el", seed, hyps, refs)
        evaluated(str(tmp_path / "diff"), "ce", seed, hyps, refs)
        evaluated(str(tmp_path / "diff"), "el", seed, degrade(refs, 0.3, seed + 5), refs)
    figures = []
    for value in ("none", "7"):
        monkeypatch.setenv("SACREBLEU_SEED", value)
        same = report(str(tmp_path / "same"), "demo", margins=False, **FAST)["paired_significance"]["avg"]["test"]
        for b in same["per_seed"].values():
            assert b["delta_ci95"] == [0.0, 0.0] and b["p_value"] == 1.0 and b["p_value_ar"] == 1.0
        assert same["over_seeds"]["delta_ci95"] == [0.0, 0.0]
        figures.append(report(str(tmp_path / "diff"), "demo", margins=False, **FAST)["paired_significance"])
    assert figures[0] == figures[1]


def test_p_values_are_two_sided():
    assert significance.two_sided_p([-1.0, 1.0, 2.0, 3.0]) == pytest.approx(2 * (1 + 1) / 5)
    assert significance.two_sided_p([1.0, 2.0, 3.0]) == pytest.approx(2 * 1 / 4)
    assert significance.two_sided_p([0.0, 0.0]) == 1.0
    metric = BLEU(lowercase=True)
    refs = references(120)
    a = significance.sentence_stats(metric, degrade(refs, 0.6, 1), refs)
    b = significance.sentence_stats(metric, degrade(refs, 0.3, 2), refs)
    forward = significance.paired_bootstrap(metric, a, b, 400, significance.rng())
    backward = significance.paired_bootstrap(metric, b, a, 400, significance.rng())
    assert forward["delta"] == pytest.approx(-backward["delta"]) and forward["p_value"] == backward["p_value"]
    assert forward["delta_ci95"] == pytest.approx([-backward["delta_ci95"][1], -backward["delta_ci95"][0]])
    ar = [significance.approximate_randomization(metric, x, y, 2000, significance.rng())["p_value"]
          for x, y in ((a, b), (b, a))]
    assert ar[0] == ar[1] and ar[0] < 0.05


def test_hypotheses_are_kept_rescore_to_the_reported_figures_and_remake_the_report(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data-bin"
    refs = {"test": references(90), "test1": references(70, length=10, seed=4)}
    data.mkdir()
    raw = tmp_path / "raw"
    raw.mkdir()
    files = {}
    for subset, lines in refs.items():
        for lang in ("de", "en"):
            (raw / f"{subset}.{lang}").write_text("".join(x + "\n" for x in lines))
        files[subset] = ({"test": "test_2016_flickr", "test1": "test_2017_flickr"}[subset],
                         {lang: str(raw / f"{subset}.{lang}") for lang in ("de", "en")})
    testsets.write(str(data), "de", "en", files, lowercased=True)
    for seed in (1, 2):
        for subset, r in refs.items():
            name = files[subset][0]
            evaluated(str(out), "ce", seed, degrade(r, 0.5, seed), r, subset, name, kinds=("avg", "best"))
            evaluated(str(out), "el", seed, degrade(r, 0.4, seed + 9), r, subset, name, kinds=("avg", "best"))
    first = report(str(out), "multi30k-cpu-de-en", str(data), margins=False, **FAST)
    kept = out / "hypotheses"
    assert len(list(kept.glob("*.txt"))) == 2 * 2 * 2 * 2  # loss x seed x kind x subset
    hyp = (kept / "el_seed2_avg_test1.txt").read_text().splitlines()
    assert hyp == (out / "el_seed2" / "eval_avg_test1" / "hyp.detok.txt").read_text().splitlines()
    rescored = BLEU(lowercase=True).corpus_score(hyp, [refs["test1"]]).score
    assert round(rescored, 2) == first["table"]["test1/avg/sacrebleu"]["el"]["per_seed"][2]
    assert rescored == pytest.approx(first["paired_significance"]["avg"]["test1"]["per_seed"][2]["el"]["score"])
    manifest = json.loads((kept / "evaluations.json").read_text())
    assert manifest["el_seed2_avg_test1.txt"]["sacrebleu"]["score"] == round(rescored, 2)

    for run in [p for p in out.glob("*_seed*") if p.is_dir()]:
        shutil.rmtree(run)  # no checkpoints, no evaluation folders: the hypotheses alone
    again = report(str(out), "multi30k-cpu-de-en", str(data), margins=False, **FAST)
    assert again["from_hypotheses"] == str(kept)
    assert json.loads(json.dumps(again["paired_significance"])) == json.loads(json.dumps(first["paired_significance"]))
    assert json.loads(json.dumps(again["table"])) == json.loads(json.dumps(first["table"]))
    assert sorted(p.name for p in kept.iterdir()) == sorted([*manifest, "evaluations.json"])

    (data / "test1.raw.en").write_text("".join(x + " extra\n" for x in refs["test1"]))
    proc = subprocess.run([sys.executable, "-m", "el_fairseq.pipeline.report", str(out), "--from-hypotheses",
                           str(kept), "--data", str(data), "--no-margins"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "usage:" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("report: error: ") and "not the references" in proc.stderr


def test_one_line_per_checkpoint_kind_over_all_test_sets_together(tmp_path):
    refs = {"test": references(80), "test1": references(50, length=8, seed=5), "test2": references(40, seed=6)}
    hyps = {}
    for seed in (1, 2, 3):
        for subset, r in refs.items():
            for loss, p in (("ce", 0.5), ("el", 0.42)):
                hyps[(loss, seed, subset)] = degrade(r, p, hash((loss, seed, subset)) % 1000)
                evaluated(str(tmp_path), loss, seed, hyps[(loss, seed, subset)], r, subset, subset + "_set",
                          kinds=("avg", "best"))
    results = report(str(tmp_path), "demo", margins=False, **FAST)
    for kind in ("avg", "best"):
        pooled = results["paired_significance"][kind]["all"]
        assert pooled["subsets"] == ["test", "test1", "test2"] and pooled["sentences"] == 80 + 50 + 40
        for seed in (1, 2, 3):
            joined = {loss: [h for subset in refs for h in hyps[(loss, seed, subset)]] for loss in ("ce", "el")}
            all_refs = [x for subset in refs for x in refs[subset]]
            expected = {loss: BLEU(lowercase=True).corpus_score(joined[loss], [all_refs]).score for loss in joined}
            assert pooled["per_seed"][seed]["delta"] == pytest.approx(expected["el"] - expected["ce"])
        assert pooled["over_seeds"]["seeds"] == 3
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## All test sets together" in md and md.count("| all: test + test1 + test2 |") == 2


def test_missing_evaluations_unequal_seeds_and_a_single_seed(tmp_path):
    """CE seed 1 lacks test1 (seed 2 has it), EL has seed 1 only for test1; EL seed 3 missing: no KeyError,
    Δ over the seeds both have, n = 1 without '± 0.00'."""
    refs = {"test": references(60), "test1": references(50, seed=8)}
    for subset, seeds_ce, seeds_el in (("test", (1, 2, 3), (1, 2)), ("test1", (2,), (1, 2))):
        for seed in seeds_ce:
            evaluated(str(tmp_path), "ce", seed, degrade(refs[subset], 0.5, seed), refs[subset], subset, subset)
        for seed in seeds_el:
            evaluated(str(tmp_path), "el", seed, degrade(refs[subset], 0.4, seed + 3), refs[subset], subset, subset)
    results = report(str(tmp_path), "demo", margins=False, **FAST)
    test = results["table"]["test/avg/sacrebleu"]
    assert test["delta_seeds"] == [1, 2] and test["ce"]["n"] == 3
    assert test["delta"] == pytest.approx(statistics_mean([test["el"]["per_seed"][s] - test["ce"]["per_seed"][s]
                                                           for s in (1, 2)]))
    sig = results["paired_significance"]["avg"]
    assert set(sig["test"]["per_seed"]) == {1, 2} and 3 in sig["test"]["seeds_left_out"]
    assert set(sig["test1"]["per_seed"]) == {2} and set(sig["all"]["per_seed"]) == {2}
    md = (tmp_path / "RESULTS.md").read_text()
    assert "± 0.00" not in md and "(1 seed)" in md and "(seeds 1, 2 only)" in md
    assert "seed 1 left out (no scored hypotheses for CE test1)" in md


def statistics_mean(values):
    return sum(values) / len(values)


def fake_run(out, name, started, finished, wps):
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "provenance.json").write_text(json.dumps({"started": started, "command": "fairseq-train ..."}))
    (run / "train.log").write_text(
        f'x | INFO | train | {{"epoch": 1, "train_wps": "{wps}", "train_train_wall": "{finished - started - 20}", '
        f'"train_wall": "{finished - started - 10}"}}\n')
    (run / "DONE").write_text("fairseq-train ...\n")
    os.utime(run / "DONE", (finished, finished))


def test_throughput_per_seed_pair_says_which_pairs_trained_side_by_side(tmp_path):
    refs = references(30)
    t = 1_795_000_000.0
    # seed 1: CE and EL together; seed 2: CE alone earlier, EL later (a lighter load)
    for name, start, end, wps in (("ce_seed1", t, t + 3000, 1600), ("el_seed1", t + 5, t + 2900, 1750),
                                  ("ce_seed2", t + 4000, t + 6000, 1500), ("el_seed2", t + 6100, t + 7500, 2300)):
        fake_run(tmp_path, name, start, end, wps)
        evaluated(str(tmp_path), name[:2], int(name[-1]), degrade(refs, 0.4, len(name) + int(name[-1])), refs)
    results = report(str(tmp_path), "demo", margins=False, **FAST)
    pairs = results["throughput_pairs"]
    assert pairs[1]["side_by_side"] is True and pairs[2]["side_by_side"] is False
    assert pairs[1]["ratio"] == pytest.approx(1750 / 1600) and pairs[2]["ratio"] == pytest.approx(2300 / 1500)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| 1 | 1,600 | 1,750 | 1.094 | yes |" in md and "| 2 | 1,500 | 2,300 | 1.533 | no |" in md
    assert "Side-by-side pairs: EL / CE 1.094 (mean over 1 pair)" in md
    assert "Training throughput EL / CE: " not in md  # no ratio over differently loaded runs


def test_bleu_per_seed_figure_has_integer_seeds_intervals_and_a_zero_based_axis(tmp_path):
    from matplotlib.container import ErrorbarContainer

    refs = references(60)
    for seed in (2, 5):
        evaluated(str(tmp_path), "ce", seed, degrade(refs, 0.5, seed), refs)
        evaluated(str(tmp_path), "el", seed, degrade(refs, 0.45, seed + 1), refs)
    results = report(str(tmp_path), "multi30k-cpu-de-en", margins=False, **FAST)
    results = json.loads((tmp_path / "results.json").read_text(), object_hook=lambda d: {
        (int(k) if k.isdigit() else k): v for k, v in d.items()})
    fig = report_module.per_seed_figure(results["table"], results["paired_significance"], "test",
                                        results["subsets"], "de-en")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "5"]
    assert list(ax.get_xticks()) == [0, 1] and ax.get_ylim()[0] == 0
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # CE and EL, each with the per-seed 95% intervals
    ce = results["paired_significance"]["avg"]["test"]["per_seed"][2]["ce"]
    segment = bars[0].lines[2][0].get_segments()[0]
    assert segment[0][1] == pytest.approx(ce["ci95"][0]) and segment[1][1] == pytest.approx(ce["ci95"][1])
    assert "de-en" in ax.get_title() and "sacreBLEU" in ax.get_title()


def test_evaluate_names_the_subsets_a_data_folder_has(tmp_path):
    data, raw = tmp_path / "bin", tmp_path / "raw"
    data.mkdir()
    raw.mkdir()
    for lang in ("de", "en"):
        (raw / f"t.{lang}").write_text("a\nb\n")
    testsets.write(str(data), "de", "en", {"test": ("test_2016_flickr", {l: str(raw / f"t.{l}") for l in ("de", "en")})},
                   lowercased=True)
    (tmp_path / "model.pt").write_bytes(b"x")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "evaluate.sh"), str(tmp_path / "model.pt"), str(data),
                           "--subset", "test1", "--cpu"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" not in proc.stderr and "prepare" not in proc.stderr
    assert proc.stderr.strip() == (f"evaluate: error: --subset 'test1' does not exist in {data}: its test subsets "
                                   "(testsets.json) are test (test_2016_flickr)")


def test_evaluate_failures_are_one_line_without_the_usage_block(data_bin, tmp_path):
    """A checkpoint fairseq-generate cannot load: its failure in one line, exit 1, no argparse usage, no
    result.json."""
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "evaluate.sh"), str(tmp_path / "broken.pt"),
                           str(data_bin / "bin"), "--remove-bpe", "", "--detok", "space", "--out", str(tmp_path / "ev"),
                           "--cpu"], capture_output=True, text=True)
    assert proc.returncode == 1 and "usage:" not in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate: error: fairseq-generate failed (1): ")
    assert not (tmp_path / "ev" / "result.json").exists()


def test_side_by_side_from_an_earlier_reports_records():
    """Records without finished (results.json of earlier reports): started + wall time. The published
    De-En runs: CE 1-2 together, then EL 1-2 together, then CE 3 beside EL 3."""
    from el_fairseq.pipeline.comparison import throughput_pairs

    runs = {"ce_seed1": (1795617935.30, 2681.0, 1594.1), "ce_seed2": (1795617935.18, 2676.0, 1596.1),
            "ce_seed3": (1795622538.46, 2030.0, 2103.6), "el_seed1": (1795620625.46, 1904.0, 2243.7),
            "el_seed2": (1795620621.00, 1915.0, 2229.7), "el_seed3": (1795622544.96, 1869.0, 2284.3)}
    pairs = throughput_pairs({run: {"started": s, "wall_s": w, "tokens_per_s": tps} for run, (s, w, tps) in runs.items()})
    assert [pairs[s]["side_by_side"] for s in (1, 2, 3)] == [False, False, True]
    assert pairs[3]["ratio"] == pytest.approx(2284.3 / 2103.6)

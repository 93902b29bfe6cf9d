"""Recipes, dry runs, GPU batch scaling, the report's arithmetic, and a resumable reproduction."""
import json
import os
import re
import subprocess
import sys

import pytest

from el_fairseq.recipes import effective_batch_tokens, train_command
from el_fairseq.report import aggregate, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(task, seeds="1-5"):
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce_iwslt.sh"), task, "--seeds", seeds,
                          "--dry-run"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def flag(line, name):
    match = re.search(re.escape(name) + r" ('[^']*'|\S+)", line)
    return match.group(1).strip("'") if match else None


COMMON = {"--optimizer": "adam", "--adam-betas": "(0.9, 0.98)", "--lr-scheduler": "inverse_sqrt",
          "--warmup-updates": "4000", "--max-tokens": "4096", "--label-smoothing": "0.1",
          "--arch": "transformer_iwslt_de_en", "--eval-bleu-detok": "moses", "--best-checkpoint-metric": "bleu"}
EL = {"--criterion": "encouraging_loss", "--log-end": "0.5", "--bonus-label-smoothing": "0.1", "--bonus-rho": "1",
      "--bonus": "log"}


@pytest.mark.parametrize("task,recipe", [
    ("de-en", {"--weight-decay": "0.0001", "--dropout": "0.4", "--lr": "0.001", "--update-freq": "4",
               "--max-update": "20000"}),
    ("fr-en", {"--weight-decay": "0.001", "--dropout": "0.3", "--lr": "0.0005", "--update-freq": "1",
               "--max-update": "100000", "--encoder-layers": "2", "--decoder-layers": "2",
               "--eval-bleu-remove-bpe": "sentencepiece"}),
])
def test_dry_run_carries_the_paper_hyperparameters(task, recipe):
    lines = dry_run(task)
    train = [line for line in lines if "fairseq-train" in line]
    assert len(train) == 10  # 5 seeds x {CE, EL}
    for line in train:
        for name, value in {**COMMON, **recipe}.items():
            assert flag(line, name) == value, (name, line)
        if "/el_seed" in line:
            for name, value in EL.items():
                assert flag(line, name) == value, (name, line)
        else:
            assert flag(line, "--criterion") == "label_smoothed_cross_entropy" and "--log-end" not in line
        assert ("--share-all-embeddings" in line) == (task == "fr-en")
    assert sorted(int(flag(line, "--seed")) for line in train) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert all(flag(line, "--keep-last-epochs") == "10" for line in train)
    averages = [line for line in lines if "el_fairseq.checkpoints" in line]
    assert len(averages) == 10 and all(flag(line, "--num-epoch-checkpoints") == "10" for line in averages)
    evals = [line for line in lines if "el_fairseq.evaluate" in line]
    assert len(evals) == 20 and {("avg_last10.pt" in e) or ("checkpoint_best.pt" in e) for e in evals} == {True}
    assert all(flag(e, "--remove-bpe") == ("sentencepiece" if task == "fr-en" else "@@ ") for e in evals)
    assert "el_fairseq.report" in lines[-1]


@pytest.mark.parametrize("gpus,update_freq", [(1, "4"), (2, "2"), (4, "1")])
def test_update_freq_keeps_the_effective_batch_on_more_gpus(gpus, update_freq):
    cmd = train_command("iwslt14-de-en", "el", 1, "DATA", "SAVE", n_gpus=gpus)
    assert cmd[cmd.index("--update-freq") + 1] == update_freq and "--fp16" in cmd and "--cpu" not in cmd
    assert effective_batch_tokens("iwslt14-de-en", gpus) == 4096 * 4


def test_bf16_cpu_and_bad_gpu_count():
    assert "--bf16" in train_command("multi30k", "ce", 1, "D", "S", n_gpus=1, precision="bf16")
    cpu = train_command("multi30k", "ce", 1, "D", "S", n_gpus=0)
    assert "--cpu" in cpu and "--fp16" not in cpu
    with pytest.raises(ValueError, match="--update-freq 4 is not divisible by 3 GPUs"):
        train_command("iwslt14-de-en", "el", 1, "D", "S", n_gpus=3)
    with pytest.raises(ValueError, match="--recipe 'wmt' is not known"):
        train_command("wmt", "el", 1, "D", "S")


def write_result(folder, tok, sacre):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({"checkpoint": os.path.join(os.path.dirname(folder), "x.pt"), "tokenized_bleu": tok,
                   "sacrebleu": {"score": sacre, "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp"}}, f)


def test_report_mean_std_and_delta_on_hand_made_results(tmp_path):
    ce, el = [30.0, 31.0, 32.0], [31.5, 32.5, 34.5]
    for seed, (c, e) in enumerate(zip(ce, el), 1):
        for kind in ("avg", "best"):
            write_result(str(tmp_path / f"ce_seed{seed}" / f"eval_{kind}"), c, c - 1)
            write_result(str(tmp_path / f"el_seed{seed}" / f"eval_{kind}"), e, e - 1)
    results = report(str(tmp_path), "de-en", margins=False)
    avg = results["table"]["avg/tokenized_bleu"]
    assert avg["ce"]["mean"] == pytest.approx(31.0) and avg["ce"]["std"] == pytest.approx(1.0)
    assert avg["el"]["mean"] == pytest.approx(32.8333333) and avg["el"]["std"] == pytest.approx(1.5275252)
    assert avg["delta"] == pytest.approx(1.8333333)
    assert results["table"]["best/sacrebleu"]["delta"] == pytest.approx(1.8333333)
    assert results["table"]["avg/sacrebleu"]["ce"]["mean"] == pytest.approx(30.0)
    md = (tmp_path / "RESULTS.md").read_text()
    assert "31.00 ± 1.00 (n=3)" in md and "+1.83" in md and "35.09" in md and "35.50" in md
    assert (tmp_path / "bleu_per_seed.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["paper"] == {"ce": 35.09, "el": 35.50}


def test_aggregate_single_seed_has_zero_std_and_missing_loss_has_no_delta():
    table = aggregate({"ce": {1: {"avg": {"tokenized_bleu": 20.0, "sacrebleu": {"score": 19.0}}}}})
    assert table["avg/tokenized_bleu"]["ce"]["std"] == 0.0 and "delta" not in table["avg/tokenized_bleu"]


def test_reproduction_runs_then_skips_finished_work(data_bin, tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "el_fairseq.reproduce", "demo", "--seeds", "1", "--data", str(data_bin / "bin"),
           "--out", str(out), "--avg-last", "2", "--cpu", "--max-epoch", "2", "--max-tokens", "4096"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "skipped" not in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["table"]["avg/tokenized_bleu"]["ce"]["n"] == 1 and "delta" in results["table"]["avg/tokenized_bleu"]
    assert set(results["margins"]["checkpoints"]) == {"CE", "EL"}
    assert (out / "RESULTS.md").exists() and (out / "valid_curves.png").exists()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert second.returncode == 0
    assert second.stdout.count("done already, skipped") == 8  # 2 x (train, average, 2 evaluations)
    assert "| train | " not in second.stdout

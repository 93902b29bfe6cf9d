"""Recipes, dry runs, GPU batch scaling, and a resumable reproduction (the report's arithmetic: test_report.py)."""
import json
import os
import re
import subprocess
import sys

import pytest

from el_fairseq.pipeline.recipes import effective_batch_tokens, train_command

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
    averages = [line for line in lines if "el_fairseq.pipeline.checkpoints" in line]
    assert len(averages) == 10 and all(flag(line, "--num-epoch-checkpoints") == "10" for line in averages)
    evals = [line for line in lines if "el_fairseq.pipeline.evaluate" in line]
    assert len(evals) == 20 and {("avg_last10.pt" in e) or ("checkpoint_best.pt" in e) for e in evals} == {True}
    assert all(flag(e, "--remove-bpe") == ("sentencepiece" if task == "fr-en" else "@@ ") for e in evals)
    assert "el_fairseq.pipeline.report" in lines[-1]


@pytest.mark.parametrize("pair", ["de-en", "fr-en"])
def test_cpu_recipe_dry_run_through_the_one_front(pair, tmp_path):
    from el_fairseq.pipeline import testsets

    data = tmp_path / "bin"
    data.mkdir()
    raw = tmp_path / "raw"
    raw.mkdir()
    src = pair.split("-")[0]
    for name in ("a", "b"):
        for lang in (src, "en"):
            (raw / f"{name}.{lang}").write_text("x\ny\n")
    testsets.write(str(data), src, "en", {"test": ("test_2016_flickr", {l: str(raw / f"a.{l}") for l in (src, "en")}),
                                          "test1": ("test_2017_flickr", {l: str(raw / f"b.{l}") for l in (src, "en")})},
                   lowercased=True)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), f"multi30k-cpu-{pair}", "--data",
                          str(data), "--seeds", "1-3", "--dry-run"], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    train = [line for line in lines if "fairseq-train" in line]
    assert len(train) == 6 and all(flag(line, "--max-epoch") == "10" and "--max-update" not in line for line in train)
    assert all(flag(line, "--encoder-layers") == "2" and flag(line, "--encoder-ffn-embed-dim") == "512" and
               flag(line, "--best-checkpoint-metric") == "nll_loss" and "--eval-bleu" not in line and "--cpu" in line
               for line in train)
    evals = [line for line in lines if "el_fairseq.pipeline.evaluate" in line]
    assert len(evals) == 6 * 2 * 2  # runs x {avg, best} x {test, test1}
    assert {flag(e, "--subset") for e in evals} == {"test", "test1"}
    assert all(flag(e, "--out").endswith(f"_{flag(e, '--subset')}") for e in evals)
    averages = [line for line in lines if "el_fairseq.pipeline.checkpoints" in line]
    assert all(flag(line, "--num-epoch-checkpoints") == "5" for line in averages)
    bad = subprocess.run(["bash", os.path.join(ROOT, "scripts", "reproduce.sh"), "multi30k-cpu-xx-en", "--dry-run"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "target 'multi30k-cpu-xx-en' is not known: allowed iwslt14-de-en" in bad.stderr


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


def test_reproduction_runs_then_skips_finished_work(data_bin, tmp_path):
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "el_fairseq.pipeline.reproduce", "demo", "--seeds", "1", "--data", str(data_bin / "bin"),
           "--out", str(out), "--avg-last", "2", "--cpu", "--max-epoch", "2", "--max-tokens", "4096"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "skipped" not in first.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["table"]["test/avg/tokenized_bleu"]["ce"]["n"] == 1
    assert "delta" in results["table"]["test/avg/tokenized_bleu"]
    run = results["runs"]["el_seed1"]
    assert "--criterion encouraging_loss" in run["command"] and run["machine"]["cpu_cores"] >= 1
    assert run["versions"]["torch"] and run["epochs"] == 2 and run["tokens_per_s"] > 0
    assert set(results["margins"]["checkpoints"]) == {"CE", "EL"}
    assert (out / "RESULTS.md").exists() and (out / "valid_curves.png").exists()
    evaluation = json.loads((out / "el_seed1" / "eval_avg_test" / "result.json").read_text())
    generate = evaluation["generate"]
    assert (generate["beam"], generate["lenpen"], generate["max_tokens"]) == (5, 1.0, 8000)
    assert re.search(r"fairseq-generate .*--beam 5 --lenpen 1.0 --max-tokens 8000", generate["command"])
    # the hypotheses sacreBLEU scored, kept beside results.json, rescore to the reported figure
    from sacrebleu.metrics import BLEU

    from el_fairseq.pipeline import testsets

    kept = (out / "hypotheses" / "el_seed1_avg_test.txt").read_text().splitlines()
    refs, lowercase, _ = testsets.raw_references(str(data_bin / "bin"), "test", "tgt")
    assert len(kept) == len(refs) == evaluation["sentences"]
    score = BLEU(lowercase=lowercase).corpus_score(kept, [refs]).score
    assert round(score, 2) == results["table"]["test/avg/sacrebleu"]["el"]["per_seed"]["1"]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert second.returncode == 0
    assert second.stdout.count("done already, skipped") == 8  # 2 x (train, average, 2 evaluations)
    assert "| train | " not in second.stdout


def test_train_log_follows_the_run_line_by_line(tmp_path):
    """SAVE_DIR/train.log shows each line while fairseq-train is still running (progress), not a
    block at a time; the child runs unbuffered."""
    import threading
    import time

    from el_fairseq.pipeline.train import run_logged

    log = tmp_path / "train.log"
    cmd = [sys.executable, "-c", "import sys, time; print('epoch 1 done'); time.sleep(4); print('epoch 2 done')"]
    worker = threading.Thread(target=run_logged, args=(cmd, str(log)))
    worker.start()
    deadline = time.time() + 3
    while time.time() < deadline and "epoch 1 done" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)
    seen_early = "epoch 1 done" in log.read_text()
    worker.join()
    assert seen_early and log.read_text().splitlines()[-1] == "epoch 2 done"


def test_training_speed_sums_the_epochs_training_time(tmp_path):
    """train_train_wall in fairseq's end-of-epoch record is that epoch's alone (the "train" meters are
    reset every epoch); the run's training time is their sum. Records as fairseq-train writes them,
    with a resumed epoch 2 (interrupted, then logged again: the later record counts)."""
    from el_fairseq.pipeline.provenance import training_speed

    def record(epoch, updates, wps, train_wall, wall):
        return (f'2026-11-25 15:23:32 | INFO | train | {{"epoch": {epoch}, "train_loss": "4.435", '
                f'"train_wps": "{wps}", "train_num_updates": "{updates}", "train_train_wall": "{train_wall}", '
                f'"train_wall": "{wall}"}}\n')

    log = tmp_path / "train.log"
    log.write_text("# fairseq-train ...\n" + record(1, 123, "2000", "190", "220") + record(2, 246, "1000", "400", "700")
                   + "2026-11-25 15:24:00 | INFO | fairseq_cli.train | begin training epoch 2\n"
                   + record(2, 246, "2500", "160", "420") + record(3, 369, "2000", "170", "630"))
    speed = training_speed(str(log))
    assert speed["epochs"] == 3 and speed["wall_s"] == 630.0
    assert speed["train_wall_s"] == 190.0 + 160.0 + 170.0
    assert abs(speed["tokens_per_s"] - 3 / (1 / 2000 + 1 / 2500 + 1 / 2000)) < 1e-9

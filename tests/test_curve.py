"""BLEU against training time (el_fairseq.pipeline.curve): a real run of the pipeline's trainer on the
generated corpus, every epoch checkpoint scored; each row's BLEU equals fairseq-generate's own
BLEU line for that checkpoint, and its time/updates are the epoch's from fairseq's log."""
import json
import os
import subprocess
import sys

from conftest import run

from el_fairseq.cli import user_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def python(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=ENV, cwd=ROOT)


def test_curve_scores_every_epoch_checkpoint_like_fairseq_generate(data_bin, tmp_path):
    save = tmp_path / "run"
    trained = python("el_fairseq.pipeline.train", "--recipe", "demo", "--loss", "el", "--seed", "3",
                     "--data", str(data_bin / "bin"), "--save-dir", str(save), "--cpu", "--max-epoch", "3",
                     "--max-update", "0", "--no-last-checkpoints")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    os.remove(save / "checkpoint2.pt")  # a gap, as --keep-last-epochs leaves: rows follow the files

    out = tmp_path / "curve.json"
    proc = python("el_fairseq.pipeline.curve", str(save), str(data_bin / "bin"), "--remove-bpe", "",
                  "--cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["epoch"] for r in rows] == [1, 3]

    log = (save / "train.log").read_text()
    ends = [json.loads(line.split("| train | ", 1)[1]) for line in log.splitlines() if "| train | " in line]
    assert [int(e["epoch"]) for e in ends] == [1, 2, 3]
    for row in rows:
        end = ends[row["epoch"] - 1]
        assert row["updates"] == int(end["train_num_updates"]) and row["wall_s"] == float(end["train_wall"])
        assert row["train_wall_s"] == sum(float(e["train_train_wall"]) for e in ends[:row["epoch"]])
        assert row["valid_nll"] is not None and row["valid_nll"] > 0
        gen = run("fairseq-generate", str(data_bin / "bin"), "--user-dir", user_dir(), "--path",
                  str(save / f"checkpoint{row['epoch']}.pt"), "--gen-subset", "valid", "--beam", "5",
                  "--max-tokens", "8000", "--cpu").stdout
        bleu = float(gen.split("BLEU4 = ", 1)[1].split(",", 1)[0])
        assert row["bleu"] == bleu
    assert rows[0]["updates"] < rows[1]["updates"] and rows[0]["wall_s"] < rows[1]["wall_s"]
    assert f"{rows[1]['bleu']:.2f}" in proc.stdout.splitlines()[-2]


def test_curve_without_epoch_checkpoints_is_one_line(data_bin, tmp_path):
    (tmp_path / "train.log").write_text("")
    proc = python("el_fairseq.pipeline.curve", str(tmp_path), str(data_bin / "bin"), "--cpu")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"curve: error: {tmp_path} has no checkpointN.pt: train with --keep-last-epochs 0 to keep them"]

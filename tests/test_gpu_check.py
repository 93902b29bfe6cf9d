"""`make gpu-check` without a GPU: the same command with --device cpu runs every stage (CUDA tests,
which skip here; the loss benchmark; CE and EL fairseq-train runs on Multi30k-named raw files it
prepares) and writes report.json/report.md; with --device cuda and no GPU it stops with one line."""
import gzip
import json
import os
import subprocess
import sys

from el_fairseq.pipeline.gpu_check import pytest_counts
from el_fairseq.pipeline.synthetic import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
        "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--max-tokens", "600"]


def multi30k_like(folder):
    """train/val/test_2016_flickr .de/.en .gz, as in the Multi30k release."""
    text = folder / "text"
    write_corpus(str(text), sizes=(("train", 500), ("val", 40), ("test_2016_flickr", 30)), src="de", tgt="en", seed=4)
    raw = folder / "raw"
    raw.mkdir()
    for name in os.listdir(text):
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write((text / name).read_bytes())
    return raw


def gpu_check(*args):
    return subprocess.run([sys.executable, "-m", "el_fairseq.pipeline.gpu_check", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_stage_runs_on_the_cpu_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu-check"
    proc = gpu_check("--device", "cpu", "--raw-dir", str(multi30k_like(tmp_path)), "--out", str(out), "--updates", "5",
                     "--bench-vocabs", "300", "--bench-tokens", "128", "--bench-repeats", "1",
                     "--bench-dtypes", "float16", "--linear-vocabs", "301", "--linear-tokens", "67",
                     "--linear-dim", "24", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    tests = report["stages"]["tests"]["counts"]
    assert tests.get("skipped", 0) >= 10 and not tests.get("failed") and not tests.get("passed")  # no GPU here
    rows = report["stages"]["benchmark"]["rows"]
    assert {(r["impl"], r["mode"], r["dtype"]) for r in rows} == {
        (impl, mode, "float16") for impl in ("ls_ce", "el_chunked") for mode in ("train", "eval")}
    linear = report["stages"]["linear"]["rows"]
    assert {(r["method"], r["dtype"], r["vocab"]) for r in linear} == {
        (m, "float16", 301) for m in ("el_logits", "el_linear", "torch_ce", "torch_linear_ce")}
    assert all(r["seconds"] > 0 and r["peak_extra_bytes"] >= 0 for r in linear)
    runs = report["stages"]["training"]["runs"]
    for loss, criterion in (("ce", "label_smoothed_cross_entropy"), ("el", "encouraging_loss")):
        run = runs[loss]
        assert run["ok"] and run["updates"] == 5 and run["steady_wps"] > 0 and run["peak_bytes"] > 0
        assert f"--criterion {criterion}" in run["command"] and "--distributed-world-size 1" in run["command"]
    assert runs["el_over_ce_wps"] > 0
    md = (out / "report.md").read_text()
    for heading in ("## CUDA tests", "## Loss benchmark", "## Output projection + loss", "## Training"):
        assert heading in md
    assert "| EL | 5 |" in md and not list(out.glob("*.tmp"))


def test_cuda_without_a_gpu_stops_with_one_line(tmp_path):
    proc = gpu_check("--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("gpu-check: error: torch") and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in proc.stderr and not (tmp_path / "out" / "report.json").exists()


def test_missing_raw_dir_is_named(tmp_path):
    proc = gpu_check("--device", "cpu", "--stages", "training", "--raw-dir", str(tmp_path / "nope"),
                     "--out", str(tmp_path / "out"))
    assert proc.returncode == 1 and f"--raw-dir {tmp_path / 'nope'}: no such folder" in proc.stderr


def test_pytest_counts():
    assert pytest_counts("....\n3 passed, 2 skipped, 5 warnings in 4.1s\n") == {"passed": 3, "skipped": 2}
    assert pytest_counts("F.\n1 failed, 1 passed in 2s\n") == {"failed": 1, "passed": 1}
    assert pytest_counts("9 skipped, 700 deselected in 3s") == {"skipped": 9, "deselected": 700}


def test_compile_stage_runs_on_the_cpu(tmp_path):
    """The compile benchmark stage (a GPU default) named on the CPU, tiny and with aot_eager: every row of
    head x loss x mode, EL without graph breaks, and its report section."""
    out = tmp_path / "gpu-check"
    proc = gpu_check("--device", "cpu", "--stages", "compile", "--out", str(out), "--compile-tokens", "64",
                     "--compile-seq", "32", "--compile-dim", "32", "--compile-layers", "1", "--compile-vocab", "301",
                     "--compile-rounds", "1", "--compile-backend", "aot_eager")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())["stages"]["compile"]["rows"]
    assert {(r["head"], r["loss"], r["mode"]) for r in rows} == {
        (h, l, m) for h in ("logits", "linear") for l in ("ce", "el") for m in ("eager", "compiled")}
    assert all(r["graph_breaks"] == 0 and r["median_s"] > 0 for r in rows if r["loss"] == "el")
    assert "## torch.compile" in (out / "report.md").read_text()

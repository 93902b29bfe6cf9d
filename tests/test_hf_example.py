"""examples/hf_multi30k.py end to end on a handful of real Multi30k pairs (tests/data/multi30k-tiny, gzip'd
here as the real data is): sentencepiece, Trainer with CE and EL, beam search, both BLEU figures, the JSON."""
import gzip
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "hf_multi30k.py")
TINY = os.path.join(ROOT, "tests", "data", "multi30k-tiny")
SMALL = ["--train-size", "0", "--valid-size", "0", "--test-size", "0", "--vocab-size", "150", "--d-model", "16",
         "--layers", "1", "--epochs", "2", "--batch-size", "16", "--warmup", "2", "--beam", "2", "--max-len", "24"]


def example(*args):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def load_example():
    spec = importlib.util.spec_from_file_location("hf_multi30k", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def raw_dir(tmp_path):
    for name in os.listdir(TINY):
        if name.endswith((".de", ".en")):
            with open(os.path.join(TINY, name), "rb") as src, gzip.open(tmp_path / (name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    return tmp_path


def test_ce_and_el_train_translate_and_score(raw_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = example("--raw-dir", str(raw_dir), *SMALL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train_pairs"] == 60 and report["test_sentences"] == 12
    ce, el = report["results"]
    assert (ce["loss"], el["loss"]) == ("CE", "EL")
    assert ce["options"]["bonus_rho"] == 0.0 and "bonus_rho" not in el["options"]
    for r in (ce, el):
        assert r["updates"] == 8  # 60 pairs / 16 per batch = 4 steps, 2 epochs
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["valid_ce"]) and r["valid_ce"] > 0
        assert 0.0 <= r["tokenized_bleu"] <= 100.0 and 0.0 <= r["sacrebleu"] <= 100.0
        assert r["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
        assert len(r["examples"]) == 3 and all(isinstance(h, str) for h in r["examples"])
    assert ce["train_loss"] != el["train_loss"]  # the bonus changes the objective
    assert "sacreBLEU signature: nrefs:1" in proc.stdout and "EL: 8 updates" in proc.stdout


@pytest.mark.parametrize("setup, args, message", [
    ("missing", ["--raw-dir", "{dir}/nowhere"], "is not a directory"),
    ("no_test", ["--raw-dir", "{dir}"], "has no test_2016_flickr.de.gz or test_2016_flickr.de"),
    ("misaligned", ["--raw-dir", "{dir}"], "train.de has 60 lines but train.en has 59"),
    ("ok", ["--raw-dir", "{dir}", "--losses", "CE,XE"], "--losses 'CE,XE': allowed a comma-separated list of CE, EL"),
])
def test_bad_input_is_one_line(raw_dir, setup, args, message, capsys):
    if setup == "no_test":
        os.remove(raw_dir / "test_2016_flickr.de.gz")
    if setup == "misaligned":
        with open(os.path.join(TINY, "train.en"), "rb") as f:
            lines = f.readlines()[:-1]
        with gzip.open(raw_dir / "train.en.gz", "wb") as f:
            f.writelines(lines)
    with pytest.raises(SystemExit) as exit:  # in-process: the checks come before any training
        load_example().main([a.format(dir=raw_dir) for a in args] + SMALL)
    said = capsys.readouterr().err + (exit.value.code if isinstance(exit.value.code, str) else "")
    assert exit.value.code != 0 and message in said, said
    assert len([line for line in said.splitlines() if "error" in line or "hf_multi30k:" in line]) == 1

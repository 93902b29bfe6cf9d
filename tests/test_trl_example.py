"""examples/trl_sft.py end to end on a handful of real Multi30k pairs (tests/data/multi30k-tiny, gzip'd here as
the real data is): tokenizer and base model, TRL's SFTTrainer with loss types nll, dft and el, greedy
completions, sacreBLEU, the two-level bootstrap, the JSON; each loss's first step checked against the loss
it names, computed here in float64 from the saved base model; a rerun resumes."""
import gzip
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from reference64 import bonus64

pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "trl_sft.py")
TINY = os.path.join(ROOT, "tests", "data", "multi30k-tiny")
# One batch of all 40 fine-tuning pairs, so that the first step's loss does not depend on the data order.
SMALL = ["--train-size", "40", "--base-size", "20", "--vocab-size", "150", "--hidden", "32", "--layers", "1",
         "--epochs", "2", "--base-epochs", "1", "--batch-size", "40", "--warmup", "1", "--log-every", "1",
         "--max-new-tokens", "8", "--seeds", "1", "--bootstrap-samples", "50", "--max-len", "256",
         "--speed-rounds", "1", "--speed-steps", "1"]


def example(*args):
    return subprocess.run([sys.executable, EXAMPLE, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def load_example():
    spec = importlib.util.spec_from_file_location("trl_sft", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    for name in os.listdir(TINY):
        if name.endswith((".de", ".en")):
            with open(os.path.join(TINY, name), "rb") as src, gzip.open(raw / (name + ".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    return raw


@pytest.fixture(scope="module")
def finished(raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = example("--raw-dir", str(raw_dir), "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def first_step_losses64(out, raw_dir, log_end):
    """{loss type: its value on the 40 fine-tuning pairs under the saved base model}, float64, tokenized as
    TRL tokenizes a prompt-completion pair (prompt + completion + EOS, loss on the completion only)."""
    import transformers

    module = load_example()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(out / "base", dtype=torch.float64).eval()
    pairs = module.read_pairs(str(raw_dir), "train", "de", "en")[:40]
    nll, p_y = [], []
    with torch.no_grad():
        for de, en in pairs:
            prompt = tokenizer(de + module.SEP, add_special_tokens=False)["input_ids"]
            ids = tokenizer(de + module.SEP + en + module.EOS, add_special_tokens=False)["input_ids"]
            assert ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            for t in range(len(prompt), len(ids)):  # position t - 1 predicts completion token t
                nll.append(-logp[t - 1, ids[t]])
                p_y.append(logp[t - 1, ids[t]].exp())
    nll, p_y = torch.stack(nll), torch.stack(p_y)
    return {"nll": nll.mean().item(), "dft": (p_y * nll).mean().item(),
            "el": (nll + bonus64(p_y, "log", log_end=log_end)).mean().item()}


def test_three_losses_train_decode_score_and_report(finished, raw_dir):
    out, proc = finished
    report = json.loads((out / "report.json").read_text())
    assert report["train_pairs"] == 40 and report["base_pairs"] == 20 and report["test_sentences"] == 12
    base = report["base"]
    assert base["pairs"] == 20 and base["updates"] == 1 and base["made_by"]["hidden"] == 32
    assert math.isfinite(base["test"]["test_nll"]) and 0.0 <= base["test"]["sacrebleu"] <= 100.0
    assert [(r["loss"], r["seed"]) for r in report["runs"]] == [("nll", 1), ("dft", 1), ("el", 1)]
    assert report["el_options"] == {"log_end": 0.75, "bonus_rho": 1.0}
    for r in report["runs"]:
        assert r["updates"] == 2 and [step for step, _ in r["loss_curve"]] == [1, 2]
        assert r["train_tokens"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["test_nll"])
        assert 0.0 <= r["sacrebleu"] <= 100.0 and r["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
        hyps = (out / "runs" / f"{r['loss']}_seed1.hyp").read_text(encoding="utf-8").split("\n")
        assert len(hyps) == 13 and hyps[-1] == "" and hyps[:3] == r["examples"]
    assert [r["options"]["trainer"] for r in report["runs"]] == ["SFTTrainer", "SFTTrainer", "EncouragingSFTTrainer"]
    speed = report["speed"]  # one step of each loss on the same batch: the same tokens
    assert [r["loss"] for r in speed["runs"]] == ["nll", "dft", "el"] and len({r["tokens"] for r in speed["runs"]}) == 1
    assert set(speed["median_tokens_per_s"]) == {"nll", "dft", "el"}
    assert speed["ratio_per_round"]["nll/nll"] == [1.0] and speed["median_ratio"]["nll/nll"] == 1.0
    assert set(report["losses"]) == {"nll", "dft", "el"}
    assert report["losses"]["el"]["sacrebleu"] == [report["runs"][2]["sacrebleu"]]
    assert set(report["deltas"]) == {"dft-nll", "el-nll", "el-dft"}
    for d in report["deltas"].values():
        assert d["seeds"] == 1 and d["samples"] == 50 and d["delta_ci95"][0] <= d["delta_ci95"][1]
        assert 0.0 < d["p_value"] <= 1.0
    # The same base model, the same single batch: each first step is the loss its type names.
    expected = first_step_losses64(out, raw_dir, log_end=0.75)
    first = {r["loss"]: r["loss_curve"][0][1] for r in report["runs"]}
    for loss in ("nll", "dft", "el"):
        assert first[loss] == pytest.approx(expected[loss], rel=2e-5), loss
    assert first["dft"] < first["el"] < first["nll"]  # p_y * NLL, and NLL plus a negative bonus
    assert "sacreBLEU signature: nrefs:1" in proc.stdout and "el-nll: Δ" in proc.stdout


def test_rerun_resumes_and_refuses_another_base(finished, raw_dir):
    out, _ = finished
    before = (out / "runs" / "el_seed1.json").read_text()
    proc = example("--raw-dir", str(raw_dir), "--out", str(out), *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base model: " + str(out / "base") + " (done)" in proc.stdout
    assert all(f"{loss} seed 1: done" in proc.stdout for loss in ("nll", "dft", "el"))
    assert (out / "runs" / "el_seed1.json").read_text() == before
    proc = example("--raw-dir", str(raw_dir), "--out", str(out), *SMALL, "--hidden", "16")
    assert proc.returncode != 0 and "was made with other arguments: --hidden 16 (base: 32)" in proc.stderr


@pytest.mark.parametrize("setup, args, message", [
    ("missing", ["--raw-dir", "{dir}/nowhere"], "is not a directory"),
    ("no_test", ["--raw-dir", "{dir}"], "has no test_2016_flickr.de.gz or test_2016_flickr.de"),
    ("ok", ["--raw-dir", "{dir}", "--losses", "nll,ce"], "--losses 'nll,ce': allowed a comma-separated list of "
                                                         "nll, dft, el"),
    ("ok", ["--raw-dir", "{dir}", "--speed-steps", "0"], "--speed-steps 0: must be > 0"),
    ("ok", ["--raw-dir", "{dir}", "--seeds", "1,x"], "--seeds '1,x': allowed a comma-separated list of integers"),
    ("ok", ["--raw-dir", "{dir}", "--base-size", "30"], "--train-size 40 + --base-size 30: the training split has "
                                                        "60 pairs"),
])
def test_bad_input_is_one_line(raw_dir, tmp_path, setup, args, message, capsys):
    raw = tmp_path / "raw"
    shutil.copytree(raw_dir, raw)
    if setup == "no_test":
        os.remove(raw / "test_2016_flickr.de.gz")
    with pytest.raises(SystemExit) as exit:  # in-process: the checks come before any training
        load_example().main(SMALL + ["--out", str(tmp_path / "out")] + [a.format(dir=raw) for a in args])
    said = capsys.readouterr().err + (exit.value.code if isinstance(exit.value.code, str) else "")
    assert exit.value.code != 0 and message in said, said
    assert len([line for line in said.splitlines() if "error" in line or "trl_sft:" in line]) == 1


def test_tokenizer_is_the_same_every_time():
    """The unigram trainer numbers its pieces in no fixed order; the example renumbers them, so that the same
    text makes the same tokenizer (and, from it, the same base model)."""
    module = load_example()
    with open(os.path.join(TINY, "train.de"), encoding="utf-8") as de, \
            open(os.path.join(TINY, "train.en"), encoding="utf-8") as en:
        texts = [line.rstrip("\n") for line in de] + [line.rstrip("\n") for line in en]
    vocabs = [module.train_tokenizer(texts, 150).get_vocab() for _ in range(4)]
    assert all(v == vocabs[0] for v in vocabs[1:])
    assert [vocabs[0][t] for t in (module.PAD, module.EOS, module.UNK, module.SEP)] == [0, 1, 2, 3]

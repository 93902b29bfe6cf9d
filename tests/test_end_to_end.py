"""fairseq's own command line with --user-dir el_fairseq, on a small generated corpus (CPU):
preprocess, train with each criterion name (the loss goes down), resume from checkpoint_last.pt,
generate (BLEU printed), average checkpoints, hydra config, and the one-line option error."""
import json
import os
import subprocess
import sys

import pytest
from conftest import run

from el_fairseq.cli import user_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARCH = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
             "--encoder-embed-dim", "64", "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
             "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]


def train(data, save_dir, criterion, max_update, *extra):
    proc = run("fairseq-train", str(data / "bin"), "--user-dir", user_dir(), *TINY_ARCH,
               "--criterion", criterion, "--label-smoothing", "0.1", "--optimizer", "adam",
               "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
               "--max-tokens", "1500", "--max-update", str(max_update), "--save-dir", str(save_dir),
               "--log-format", "json", "--log-interval", "5", "--cpu", "--seed", "1", *extra)
    inner = [json.loads(line.split("train_inner | ", 1)[1]) for line in (proc.stdout + proc.stderr).splitlines()
             if "train_inner | " in line]
    return proc, inner


@pytest.mark.parametrize("criterion", ["encouraging_loss", "encouraging_label_smoothed_cross_entropy"])
def test_train_resume_generate_average(data_bin, tmp_path, criterion):
    save = tmp_path / "ckpt"
    _, inner = train(data_bin, save, criterion, 30)
    losses = [float(r["loss"]) for r in inner]
    assert len(losses) >= 4 and losses[-1] < losses[0] - 0.3, losses
    assert all("margin" in r and "energy" in r for r in inner)
    assert (save / "checkpoint_last.pt").exists()

    proc, inner = train(data_bin, save, criterion, 45)
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "@ 30 updates" in log
    assert int(inner[-1]["num_updates"]) == 45 and float(inner[-1]["loss"]) < losses[0]

    out = run("fairseq-generate", str(data_bin / "bin"), "--user-dir", user_dir(), "--path",
              str(save / "checkpoint_last.pt"), "--beam", "5", "--max-tokens", "4000", "--cpu").stdout
    hyps = sum(line.startswith("H-") for line in out.splitlines())
    assert "BLEU4 = " in out and hyps == 100  # all of them: see compat.patch_fairseq_batching

    avg = tmp_path / "avg.pt"
    msg = run("el-fairseq-average-checkpoints", "--inputs", str(save), "--num-epoch-checkpoints", "2",
              "--output", str(avg)).stdout
    assert "averaged 2 checkpoints" in msg and avg.exists()
    out = run("el-fairseq-generate", str(data_bin / "bin"), "--path", str(avg), "--beam", "5", "--cpu").stdout
    assert "BLEU4 = " in out

    ev = tmp_path / "eval"
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "evaluate.sh"), str(avg), str(data_bin / "bin"),
                          "--remove-bpe", "", "--detok", "space", "--out", str(ev), "--cpu"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads((ev / "result.json").read_text())
    assert result["sentences"] == 100 and 0 <= result["tokenized_bleu"] <= 100
    assert result["sacrebleu"]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "tokenized BLEU (fairseq, as in the paper) = " in out and result["sacrebleu"]["signature"] in out
    assert len((ev / "hyp.detok.txt").read_text().splitlines()) == 100
    if criterion == "encouraging_loss":
        check_sacrebleu_uses_raw_references(avg, data_bin, tmp_path)

    analysis = tmp_path / "margins"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "analyze_margins.py"), "--path",
                          f"{save / 'checkpoint1.pt'}:early,{avg}:avg", "--data", str(data_bin / "bin"),
                          "--out", str(analysis), "--cpu"], capture_output=True, text=True, check=True).stdout
    result = json.loads((analysis / "margins.json").read_text())
    assert set(result["checkpoints"]) == {"early", "avg"} and "early:" in out
    for stats in result["checkpoints"].values():
        assert stats["tokens"] > 500 and stats["margin"]["q05"] <= stats["margin"]["q50"] <= stats["margin"]["q95"]
        assert 0 < stats["p_y"]["mean"] < 1
    for png in ("margin_hist.png", "energy_hist.png", "p_y_hist.png"):
        assert (analysis / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_without_plugin_hits_the_torch_weights_only_failure(data_bin, tmp_path):
    """Documents why the plugin patches checkpoint loading (torch >= 2.6)."""
    import torch

    save = tmp_path / "ckpt"
    train(data_bin, save, "encouraging_loss", 5)
    proc = run("fairseq-generate", str(data_bin / "bin"), "--path", str(save / "checkpoint_last.pt"),
               "--cpu", check=False)
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 6):
        assert proc.returncode != 0 and "weights_only" in proc.stderr


def test_option_out_of_range_is_one_line(data_bin, tmp_path):
    proc = run("fairseq-train", str(data_bin / "bin"), "--user-dir", user_dir(), *TINY_ARCH,
               "--criterion", "encouraging_loss", "--log-end", "1.5", "--max-tokens", "1000",
               "--save-dir", str(tmp_path / "x"), "--cpu", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "fairseq-train: error: --log-end 1.5 is out of range: allowed 0 < LE <= 1"
    assert not (tmp_path / "x" / "checkpoint_last.pt").exists()


def test_hydra_config(data_bin, tmp_path):
    config = tmp_path / "el.yaml"
    config.write_text(f"""# @package _group_
common: {{user_dir: {user_dir()}, cpu: true, log_format: json, log_interval: 5}}
task: {{_name: translation, data: {data_bin / 'bin'}}}
model: {{_name: transformer, encoder_layers: 1, decoder_layers: 1, encoder_embed_dim: 32, decoder_embed_dim: 32,
        encoder_ffn_embed_dim: 64, decoder_ffn_embed_dim: 64, encoder_attention_heads: 2, decoder_attention_heads: 2}}
criterion: {{_name: encouraging_loss, label_smoothing: 0.1, log_end: 0.75}}
optimizer: {{_name: adam}}
lr_scheduler: {{_name: inverse_sqrt, warmup_updates: 5}}
optimization: {{lr: [0.003], max_update: 10}}
dataset: {{max_tokens: 1500}}
checkpoint: {{save_dir: {tmp_path / 'ckpt'}}}
""")
    proc = run("fairseq-hydra-train", "--config-dir", str(tmp_path), "--config-name", "el", cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert "criterion: EncouragingLossCriterion" in log and "'log_end': 0.75" in log
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


def check_sacrebleu_uses_raw_references(checkpoint, data_bin, tmp_path):
    """sacreBLEU scores the detokenised output against the raw references data-prep keeps, lowercased
    (case:lc) where the data is; every subset is evaluated and named. The raw references here are
    the test targets in upper case with a trailing period: scored against the tokenised T- lines
    (the old behaviour) the score and the signature would differ."""
    import shutil

    from sacrebleu.metrics import BLEU

    from el_fairseq.pipeline import testsets

    data = tmp_path / "cased"
    shutil.copytree(data_bin / "bin", data)
    for f in list(data.glob("test.src-tgt.*")):
        shutil.copy(f, data / f.name.replace("test.", "test1.", 1))
    raw = (data_bin / "raw" / "test.tgt").read_text().splitlines()
    (tmp_path / "ref.tgt").write_text("".join(line.upper() + " .\n" for line in raw))
    testsets.write(str(data), "src", "tgt", {
        "test": ("cased test", {"src": str(data_bin / "raw" / "test.src"), "tgt": str(tmp_path / "ref.tgt")}),
        "test1": ("cased test, again", {"src": str(data_bin / "raw" / "test.src"), "tgt": str(tmp_path / "ref.tgt")})},
        lowercased=True)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "evaluate.sh"), str(checkpoint), str(data),
                          "--subset", "all", "--remove-bpe", "", "--detok", "space", "--out", str(tmp_path / "ev"),
                          "--cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for subset, name in (("test", "cased test"), ("test1", "cased test, again")):
        result = json.loads((tmp_path / f"ev_{subset}" / "result.json").read_text())
        assert result["test_set"] == name and result["sacrebleu"]["reference"] == f"{subset}.raw.tgt"
        assert result["sacrebleu"]["signature"].startswith("nrefs:1|case:lc|")
        hyps = (tmp_path / f"ev_{subset}" / "hyp.detok.txt").read_text().splitlines()
        refs = [line.upper() + " ." for line in raw]
        assert result["sacrebleu"]["score"] == round(BLEU(lowercase=True).corpus_score(hyps, [refs]).score, 2)
        assert result["sacrebleu"]["score"] != result["tokenized_bleu"]  # the period: not the T- lines
        assert f"{subset} = {name}" in out.stdout

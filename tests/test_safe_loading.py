"""fairseq checkpoints load with weights_only=True and the allow-list of el_fairseq.safe_loading: real
checkpoints of the demo recipe (best/last, epoch and update checkpoints, --eval-bleu, resumed by
two workers, averaged) load and decode through fairseq-generate and from_pretrained; a crafted
checkpoint is refused with one line everywhere, and nothing of it runs, unless the user names it in
EL_FAIRSEQ_TRUST_CHECKPOINT."""
import argparse
import glob
import os
import subprocess
import sys

import pytest
import torch

from conftest import run

from el_fairseq import safe_loading
from el_fairseq.cli import user_dir
from el_fairseq.pipeline.recipes import train_command

TINY = ["--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--max-tokens", "1500"]


def fairseq_train(data_bin, save_dir, *extra, check=True):
    return run("fairseq-train", *train_command("demo", "el", 1, str(data_bin / "bin"), str(save_dir), n_gpus=0,
                                               user_dir=user_dir(), extra=TINY + list(extra)), check=check)


def allowed_names(allowed):
    return {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allowed}


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    """A demo-recipe run with --eval-bleu (numpy BLEU counts in its metrics) and update checkpoints,
    resumed for a third epoch by two workers, and the average of its epoch checkpoints."""
    save = tmp_path_factory.mktemp("safe") / "run"
    bleu = ["--eval-bleu", "--eval-bleu-detok", "space", "--best-checkpoint-metric", "bleu",
            "--maximize-best-checkpoint-metric", "--save-interval-updates", "4", "--max-update", "0"]
    fairseq_train(data_bin, save, *bleu, "--max-epoch", "2")
    proc = fairseq_train(data_bin, save, *bleu, "--max-epoch", "3", "--distributed-world-size", "2")
    # Rank 0 reads the checkpoint and sends its state (omegaconf config included) to rank 1 through
    # torch.load: refused by torch's weights_only before el_fairseq.safe_loading covered it.
    log = proc.stdout + proc.stderr
    assert "distributed init (rank 1)" in log and "Loaded checkpoint" in log and (save / "checkpoint3.pt").exists()
    run("el-fairseq-average-checkpoints", "--inputs", str(save), "--num-epoch-checkpoints", "3",
        "--output", str(save / "avg.pt"))
    return save


class Marker:
    """Pickles as a call of exec that creates PATH: what a crafted checkpoint runs on a trusting load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted" / "checkpoint_best.pt"
    path.parent.mkdir()
    torch.save({"args": argparse.Namespace(arch="transformer"), "cfg": None, "model": {"w": torch.zeros(2)},
                "extra_state": {"x": Marker(marker)}}, path)
    return path, marker


def test_real_checkpoints_need_only_the_allow_list(trained):
    files = sorted(glob.glob(str(trained / "*.pt")))
    names = {os.path.basename(f) for f in files}
    assert {"checkpoint1.pt", "checkpoint3.pt", "checkpoint_best.pt", "checkpoint_last.pt", "avg.pt"} <= names
    assert any(n.startswith("checkpoint_1_") for n in names)  # --save-interval-updates
    allowed = allowed_names(safe_loading.checkpoint_globals())
    with_numpy = 0
    for f in files:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        assert "argparse.Namespace" in unsafe and unsafe <= allowed, (f, unsafe - allowed)
        with_numpy += "numpy.ndarray" in unsafe
        ours, theirs = safe_loading.load(f, map_location="cpu"), torch.load(f, map_location="cpu", weights_only=False)
        assert ours.keys() == theirs.keys() and ours["model"].keys() == theirs["model"].keys()
        assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in theirs["model"])
    assert with_numpy >= 3  # the --eval-bleu epoch checkpoints: numpy arrays are really allowed, not absent


def test_fairseq_generate_and_from_pretrained_on_real_checkpoints(trained, data_bin, tmp_path):
    for name in ("avg.pt", "checkpoint_last.pt"):  # averaged; resumed
        out = run("fairseq-generate", str(data_bin / "bin"), "--user-dir", user_dir(), "--path", str(trained / name),
                  "--gen-subset", "valid", "--beam", "2", "--max-tokens", "4000", "--cpu").stdout
        assert "BLEU4 = " in out and sum(line.startswith("H-") for line in out.splitlines()) == 100
    hub = (f"m = TransformerModel.from_pretrained({str(trained)!r}, checkpoint_file='checkpoint_best.pt', "
           f"data_name_or_path={str(data_bin / 'bin')!r}{{}})\n"
           "print(m.translate('a1 n2 v3 the n4', beam=2))\n")
    for preamble, kwargs in ((f"import sys; sys.path.insert(0, {os.path.dirname(user_dir())!r})\n",
                              f", user_dir={user_dir()!r}"),  # fairseq loads the plugin itself
                             ("import el_fairseq.criterions\n", "")):  # the plugin, imported
        code = preamble + "from fairseq.models.transformer import TransformerModel\n" + hub.format(kwargs)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        # the last line: fairseq imports DeepSpeed where it is installed (a test requirement), which logs to stdout
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1].startswith("t"), out.stderr[-2000:]


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


def test_crafted_checkpoint_is_refused_and_runs_nothing(crafted, trained, data_bin, tmp_path):
    path, marker = crafted
    with pytest.raises(safe_loading.UntrustedCheckpointError) as err:
        safe_loading.load(str(path))
    assert str(err.value) == (f"{path}: not loaded: it needs builtins.exec, which fairseq checkpoints do not contain "
                              f"(loading it could run code); if you trust this file, load it with "
                              f"EL_FAIRSEQ_TRUST_CHECKPOINT={path}")
    proc = run("fairseq-generate", str(data_bin / "bin"), "--user-dir", user_dir(), "--path", str(path), "--cpu",
               check=False)
    assert proc.returncode == 2 and one_error_line(proc) == f"fairseq-generate: error: {err.value}"
    proc = run("el-fairseq-average-checkpoints", "--inputs", str(trained / "checkpoint1.pt"), str(path), "--output",
               str(tmp_path / "avg.pt"), check=False)
    assert one_error_line(proc) == f"el-fairseq-average-checkpoints: error: {err.value}"
    assert not (tmp_path / "avg.pt").exists()
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(user_dir())!r})\n"
            "from fairseq.models.transformer import TransformerModel\n"
            f"TransformerModel.from_pretrained({str(path.parent)!r}, checkpoint_file='checkpoint_best.pt', "
            f"data_name_or_path={str(data_bin / 'bin')!r}, user_dir={user_dir()!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert one_error_line(proc) == f"-c: error: {err.value}"  # the plugin's one-line hook, loaded as the user dir
    assert not marker.exists()


def test_a_checkpoint_named_in_the_trust_variable_loads_unrestricted(crafted, monkeypatch):
    path, marker = crafted
    monkeypatch.setenv(safe_loading.TRUST_ENV, os.pathsep.join(["/elsewhere.pt", str(path)]))
    state = safe_loading.load(str(path))
    assert marker.exists() and state["model"]["w"].shape == (2,)  # the user's explicit choice: it ran

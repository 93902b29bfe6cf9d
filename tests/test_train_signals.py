"""Stopping a training wrapper stops its fairseq-train: SIGTERM to scripts/train.sh, Ctrl-C (SIGINT)
to the reproduction, on a real (tiny) fairseq-train run; and --dry-run without a GPU says it is the
CPU command."""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}


def live_command_lines():
    """{pid: command line} of the live processes (zombies excluded)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found[int(pid)] = cmdline
    return found


def training_under(save_dir):
    """pids of the fairseq-train processes writing into save_dir."""
    return [pid for pid, cmdline in live_command_lines().items()
            if str(save_dir) in cmdline and ("fairseq-train" in cmdline or "fairseq_cli.train" in cmdline)]


def wait_for(condition, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def stop_and_check(proc, signum, save_dir, train_log):
    """Wait until fairseq-train has begun training, send signum to the wrapper, check what remains."""
    started = wait_for(lambda: os.path.exists(train_log) and "begin training" in open(train_log).read(), 120)
    children_before = training_under(save_dir)
    try:
        assert started and children_before, "fairseq-train did not start"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        left = training_under(save_dir)
        for pid in left:  # do not leave a stray training behind a failed test
            os.kill(pid, signal.SIGKILL)
    assert not left, f"fairseq-train still running after {signal.Signals(signum).name} to the wrapper: {left}"
    assert proc.returncode == -signum, (proc.returncode, err[-2000:])
    assert "Traceback" not in out + err
    assert not os.path.exists(os.path.join(save_dir, "DONE"))
    return out, err


def test_sigterm_to_train_sh_ends_its_fairseq_train(data_bin, tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "train.sh"), "--recipe", "demo", "--loss", "el",
                             "--data", str(data_bin / "bin"), "--save-dir", str(save), "--cpu", "--max-epoch", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    _, err = stop_and_check(proc, signal.SIGTERM, save, str(save / "train.log"))
    assert err.strip().splitlines()[-1].startswith("train: stopped by SIGTERM; fairseq-train has ended (not DONE)")


def test_ctrl_c_to_the_reproduction_ends_the_training_step_without_a_traceback(data_bin, tmp_path):
    out_dir = tmp_path / "repro"
    proc = subprocess.Popen([sys.executable, "-m", "el_fairseq.pipeline.reproduce", "demo", "--seeds", "1", "--data",
                             str(data_bin / "bin"), "--out", str(out_dir), "--cpu", "--only", "train",
                             "--max-epoch", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    save = out_dir / "ce_seed1"
    _, err = stop_and_check(proc, signal.SIGINT, save, str(save / "train.log"))
    assert err.strip().splitlines()[-1].startswith("reproduce: stopped by SIGINT during 'train ce seed 1'")


def dry_run_stderr(*args):
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, check=True)
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("precision", [None, "fp16", "bf16"])
def test_dry_run_without_a_gpu_says_it_prints_the_cpu_command(precision):
    opt = ["--precision", precision] if precision else []
    out, err = dry_run_stderr("bash", os.path.join(ROOT, "scripts", "train.sh"), "--recipe", "multi30k", "--loss",
                              "ce", "--data", "D", "--save-dir", "S", "--dry-run", *opt)
    assert "--cpu" in out and "--fp16" not in out and "--bf16" not in out
    shown = precision or "fp16"
    assert err.splitlines() == [f"train: no GPU visible: this is the CPU command (--cpu, fp32); on GPUs it would "
                                f"train in {shown} (--{shown})"]
    out, err = dry_run_stderr("bash", os.path.join(ROOT, "scripts", "reproduce.sh"), "multi30k-de-en", "--seeds", "1-2",
                              "--dry-run", *opt)
    assert out.count("--cpu") >= 4 and "--fp16" not in out
    assert err.splitlines() == [f"reproduce: no GPU visible: these are the CPU commands (--cpu, fp32); on GPUs "
                                f"they would train in {shown} (--{shown})"]


def test_explicit_cpu_with_a_gpu_precision_says_the_precision_is_not_used():
    out, err = dry_run_stderr("bash", os.path.join(ROOT, "scripts", "train.sh"), "--recipe", "multi30k", "--loss",
                              "el", "--data", "D", "--save-dir", "S", "--dry-run", "--cpu", "--precision", "bf16")
    assert "--cpu" in out and "--bf16" not in out
    assert err.splitlines() == ["train: --precision bf16 applies on GPUs only: --cpu trains in fp32"]
    out, err = dry_run_stderr("bash", os.path.join(ROOT, "scripts", "train.sh"), "--recipe", "multi30k", "--loss",
                              "el", "--data", "D", "--save-dir", "S", "--dry-run", "--cpu")
    assert err == ""  # --cpu with the default precision: nothing to say

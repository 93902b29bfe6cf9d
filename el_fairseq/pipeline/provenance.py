"""How a result was made: versions, the machine, the el-fairseq revision; a run's time and speed.

Written by el_fairseq.pipeline.train into SAVE_DIR/provenance.json at the start of a run and read by the
report, so that results.json says which command, code and machine produced each number.
"""
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_revision():
    """The el-fairseq checkout's commit, '+dirty' when tracked files differ from it; None outside git."""
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """CPU model and usable cores; GPU names and count when CUDA is visible."""
    out = {"cpu": cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count(), "platform": platform.platform()}
    try:
        import torch

        n = torch.cuda.device_count()
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
    except Exception:  # noqa: BLE001  (a broken CUDA set-up must not stop the record)
        out["gpus"] = []
    return out


def versions():
    import sys

    return {"python": sys.version.split()[0], "torch": _version("torch"),
            "fairseq": _version("fairseq") or _version("ve-fairseq") or _version("fairseq-fixed"),
            "sacrebleu": _version("sacrebleu"), "el-fairseq": _version("el-fairseq"), "el-fairseq_git": git_revision()}


def record():
    return {"versions": versions(), "machine": machine()}


def write(path, **fields):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**record(), **fields}, f, indent=1)
    os.replace(path + ".tmp", path)


def read(path):
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def log_records(log_path, stage):
    """fairseq's json log lines `| STAGE | {...}` (train_inner, train, valid), in order."""
    records = []
    marker = f"| {stage} | "
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if marker not in line:
                continue
            try:
                records.append(json.loads(line.split(marker, 1)[1]))
            except ValueError:
                continue
    return records


def epoch_records(log_path, stage):
    """{epoch: record} of fairseq's json log lines `| train | {...}` or `| valid | {...}` (stage)."""
    return {int(rec["epoch"]): rec for rec in log_records(log_path, stage) if "epoch" in rec}


def training_seconds(epochs, upto):
    """Seconds spent in training steps in epochs 1..UPTO, from {epoch: end-of-epoch record}.

    Epoch summaries prefix every key with "train_": train_wall is the run's wall clock so far
    (validation and checkpoint saving included), but train_train_wall is the epoch's own time in
    training steps (fairseq resets the "train" meters every epoch), hence the sum."""
    return float(sum(float(rec.get("train_train_wall", 0)) for epoch, rec in epochs.items() if epoch <= upto))


def training_speed(log_path):
    """From fairseq's json log: {'epochs', 'wall_s', 'train_wall_s', 'tokens_per_s'} of the run
    (tokens/s over the whole run: every epoch has the same tokens, so the harmonic mean of the
    epochs' wps), or None."""
    if not os.path.exists(log_path):
        return None
    epochs = epoch_records(log_path, "train")
    if not epochs:
        return None
    last = epochs[max(epochs)]
    wps = [float(r["train_wps"]) for r in epochs.values() if float(r.get("train_wps", 0)) > 0]
    return {"epochs": len(epochs), "wall_s": float(last.get("train_wall", 0)),
            "train_wall_s": training_seconds(epochs, max(epochs)),
            "tokens_per_s": len(wps) / sum(1 / w for w in wps) if wps else None}

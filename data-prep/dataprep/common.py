"""Shared pieces: one-line errors, stage markers, atomic writes, progress lines."""
import hashlib
import json
import os
import sys
import time


class PrepError(Exception):
    """A problem with the input (archive, member, parallel files): one line, exit status 1."""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_lines(path, lines):
    """Write lines (without newlines) to path via a temporary name; returns the count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_lines(path):
    """Lines split at "\n" only, as perl and awk read them (see text.split_lines)."""
    from .text import split_lines

    with open(path, encoding="utf-8", newline="") as f:
        return split_lines(f.read())


def count_lines(path):
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def check_parallel(path_a, path_b):
    a, b = count_lines(path_a), count_lines(path_b)
    if a != b:
        raise PrepError(f"{path_a} has {a} lines but {path_b} has {b}: parallel files must match")
    return a


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Stages:
    """Stage bookkeeping in DIR/.stages/NAME (JSON): what each finished stage was made from.

    `run(name, fn, *args, inputs={...})` adds `inputs` (options, input checksums, tool versions) to
    everything the earlier stages were made from; a finished stage is skipped only when that whole
    record is unchanged, otherwise it and every later stage are rebuilt, with a line naming what
    changed. `--force` rebuilds everything.
    """

    def __init__(self, folder, force=False, inputs=None):
        self.folder = os.path.join(folder, ".stages")
        self.made_from = dict(inputs or {})
        os.makedirs(self.folder, exist_ok=True)
        if force:
            for name in os.listdir(self.folder):
                os.remove(os.path.join(self.folder, name))

    def _recorded(self, name):
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("made_from")
        except (ValueError, AttributeError):
            return {}  # a marker from an older version: what it was made from is unknown

    def run(self, name, fn, *args, inputs=None):
        self.made_from.update(inputs or {})
        recorded = self._recorded(name)
        if recorded == self.made_from:
            log(f"{name}: done already, skipped (--force redoes it)")
            return
        if recorded is not None:
            changed = sorted(k for k in set(recorded) | set(self.made_from) if recorded.get(k) != self.made_from.get(k))
            what = ", ".join(f"{k}: {recorded.get(k)!r} -> {self.made_from.get(k)!r}" for k in changed)
            log(f"{name}: made from other inputs before ({what}), rebuilding")
            os.remove(os.path.join(self.folder, name))
        t = time.time()
        note = fn(*args)
        write_lines(os.path.join(self.folder, name),
                    [json.dumps({"note": note or "", "made_from": self.made_from}, sort_keys=True)])
        log(f"{name}: {note or 'done'} ({time.time() - t:.1f}s)")


def tool_versions():
    """Versions of the libraries whose behaviour shapes the prepared text."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("sacremoses", "subword-nmt", "sentencepiece", "fairseq", "ve-fairseq", "fairseq-fixed"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def fail(err):
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)

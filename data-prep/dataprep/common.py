"""Shared pieces: one-line errors, stage markers, atomic writes, progress lines."""
import hashlib
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
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


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
    """Stage bookkeeping in DIR/.stages: a finished stage is skipped unless --force."""

    def __init__(self, folder, force=False):
        self.folder = os.path.join(folder, ".stages")
        self.force = force
        os.makedirs(self.folder, exist_ok=True)
        if force:
            for name in os.listdir(self.folder):
                os.remove(os.path.join(self.folder, name))

    def done(self, name):
        return os.path.exists(os.path.join(self.folder, name))

    def mark(self, name, note=""):
        write_lines(os.path.join(self.folder, name), [note])

    def run(self, name, fn, *args):
        if self.done(name):
            log(f"{name}: done already, skipped (--force redoes it)")
            return
        t = time.time()
        note = fn(*args)
        self.mark(name, note or "")
        log(f"{name}: {note or 'done'} ({time.time() - t:.1f}s)")


def fail(err):
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)

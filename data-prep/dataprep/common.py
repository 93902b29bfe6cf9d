"""Shared pieces: one-line errors, stage markers, atomic writes, progress lines."""
import hashlib
import json
import os
import shutil
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


def decode_utf8(data, name):
    """data as UTF-8 text, or a PrepError naming `name` and the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PrepError(f"{name}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start:,})") from None


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
    """The stages of a preparation, declared in order with `add`, then run with `run()`.

    Bookkeeping in DIR/.stages/NAME (JSON): what each finished stage was made from, i.e. its own
    `inputs` (options, input checksums, tool versions) added to everything the earlier stages were
    made from. A stage counts as done only when that record is unchanged and its `outputs` exist;
    otherwise it and every later stage are rebuilt, with a line naming what changed or what is
    missing. Outputs under `scratch` (the intermediate texts) are removed once the last stage has
    succeeded: they are missing on a rerun, which matters only when a later stage has to be rebuilt
    (then the preparation restarts from the stage that made them). `--force` rebuilds everything.
    """

    def __init__(self, folder, force=False, inputs=None, scratch=None):
        self.folder = os.path.join(folder, ".stages")
        self.base = dict(inputs or {})
        self.scratch = scratch
        self.stages = []
        os.makedirs(self.folder, exist_ok=True)
        if force:
            for name in os.listdir(self.folder):
                os.remove(os.path.join(self.folder, name))

    def add(self, name, fn, *args, inputs=None, outputs=()):
        self.stages.append((name, fn, args, dict(inputs or {}), list(outputs)))

    def _recorded(self, name):
        path = os.path.join(self.folder, name)
        if not os.path.exists(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("made_from")
        except (ValueError, AttributeError):
            return {}  # a marker from an older version: what it was made from is unknown

    def _why_rebuild(self, name, made_from, outputs, scratch_too):
        """None when the stage is done, "" when it was never built, else why it has to be rebuilt."""
        recorded = self._recorded(name)
        if recorded is None:
            return ""
        if recorded != made_from:
            changed = sorted(k for k in set(recorded) | set(made_from) if recorded.get(k) != made_from.get(k))
            return "made from other inputs before (" + ", ".join(
                f"{k}: {recorded.get(k)!r} -> {made_from.get(k)!r}" for k in changed) + ")"
        missing = [p for p in outputs if not os.path.exists(p) and (scratch_too or not self._is_scratch(p))]
        if missing:
            return f"its output {missing[0]} is missing"
        return None

    def _is_scratch(self, path):
        return self.scratch is not None and os.path.abspath(path).startswith(os.path.abspath(self.scratch) + os.sep)

    def run(self):
        made_from, plan = dict(self.base), []
        for name, fn, args, inputs, outputs in self.stages:
            made_from = {**made_from, **inputs}
            plan.append((name, fn, args, dict(made_from), outputs))
        # The first stage that is not done; a rebuild from there needs the earlier stages' scratch outputs.
        reasons = [self._why_rebuild(name, made, outputs, False) for name, _, _, made, outputs in plan]
        start = next((i for i, why in enumerate(reasons) if why is not None), len(plan))
        begin = start
        if start < len(plan):
            for i in range(start):
                gone = [p for p in plan[i][4] if not os.path.exists(p)]
                if gone:
                    begin = i
                    reasons[i] = f"its output {gone[0]} was removed after the last run and {plan[start][0]} needs it"
                    break
        for name, *_ in plan[begin:]:  # no stale marker survives a rebuild that fails half-way
            if os.path.exists(os.path.join(self.folder, name)):
                os.remove(os.path.join(self.folder, name))
        for i, (name, fn, args, made, _) in enumerate(plan):
            if i < begin:
                log(f"{name}: done already, skipped (--force redoes it)")
                continue
            if reasons[i]:
                log(f"{name}: {reasons[i]}, rebuilding")
            t = time.time()
            note = fn(*args)
            write_lines(os.path.join(self.folder, name),
                        [json.dumps({"note": note or "", "made_from": made}, sort_keys=True)])
            log(f"{name}: {note or 'done'} ({time.time() - t:.1f}s)")
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


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

"""The hypotheses behind a report: OUT/hypotheses/{ce,el}_seed{N}_{avg,best}_{SUBSET}.txt, the detokenised
output sacreBLEU scored (line i = sentence i of SUBSET, fairseq's S-/H- id i, and line i of
DATA_BIN/{SUBSET}.raw.{tgt}), and OUT/hypotheses/evaluations.json holding each one's result.json
(fairseq's tokenized BLEU, the sacreBLEU signature, the fairseq-generate command). With DATA_BIN's raw
references they are all a report needs: no checkpoint, no run folder.
"""
import json
import os
import re
import shutil

from . import testsets

HYPOTHESIS_FILE = re.compile(r"(ce|el)_seed(\d+)_(avg|best)_(\w+)\.txt$")
HYPOTHESES = "hypotheses"
MANIFEST = "evaluations.json"


def hypothesis_name(loss, seed, kind, subset):
    return f"{loss}_seed{seed}_{kind}_{subset}.txt"


def collect(folder, data):
    """{loss: {seed: {(kind, subset): result}}} as comparison.collect gives it, from a hypotheses folder
    and DATA_BIN's raw references (each result with _hyp and _ref, the files it is scored on)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: a hypotheses folder is written by this report "
                                f"({HYPOTHESES}/ beside results.json)")
    if not data:
        raise ValueError(f"--data DATA_BIN is needed with hypotheses ({folder}): the raw references are there")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    target = (testsets.read(data) or {}).get("target")
    if target is None:
        raise ValueError(f"{data} has no testsets.json: the raw references come from data-prep's testsets.json")
    runs = {}
    for name, result in sorted(manifest.items()):
        match = HYPOTHESIS_FILE.fullmatch(name)
        if not match:
            raise ValueError(f"{path}: entry {name!r} is not named {{ce,el}}_seed{{N}}_{{avg,best}}_{{subset}}.txt")
        loss, seed, kind, subset = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        testsets.raw_references(data, subset, target)  # a subset DATA_BIN lacks: one line, here
        info = testsets.read(data)["subsets"][subset]
        result = {**result, "_hyp": os.path.join(folder, name), "_ref": os.path.join(data, info["raw"][target])}
        runs.setdefault(loss, {}).setdefault(seed, {})[(kind, subset)] = result
    return runs


def keep(runs, out):
    """Copy every scored hypothesis file to OUT/hypotheses/ with evaluations.json; a new folder
    replaces the old one whole, so that no stale file stays beside the new ones."""
    target = os.path.join(out, HYPOTHESES)
    entries = {(loss, seed, key): r for loss, per_seed in runs.items() for seed, results in per_seed.items()
               for key, r in results.items() if r.get("_hyp")}
    if not entries:
        return None
    if all(os.path.dirname(os.path.abspath(r["_hyp"])) == os.path.abspath(target) for r in entries.values()):
        return target  # re-made from OUT/hypotheses itself
    tmp = target + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    manifest = {}
    for (loss, seed, (kind, subset)), r in sorted(entries.items()):
        name = hypothesis_name(loss, seed, kind, subset)
        shutil.copyfile(r["_hyp"], os.path.join(tmp, name))
        manifest[name] = {k: v for k, v in r.items() if not k.startswith("_")}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target

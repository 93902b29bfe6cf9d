"""DATA_BIN/testsets.json: which official test set each fairseq test subset is, and where its
untouched reference text lies ({subset}.raw.{lang}, line i = fairseq sentence id i), so that
sacreBLEU scores detokenised output against real references (lowercased where the data is).

Written by data-prep and the demo, read by el_fairseq.pipeline.evaluate.
"""
import json
import os


def _read(path):
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _write(path, lines):
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(path + ".tmp", path)


def write(data_bin, src, tgt, subsets, lowercased, **extra):
    """subsets: {subset: (official name, {lang: raw text file})}; copies the raw files into DATA_BIN
    and writes testsets.json; returns its content."""
    info = {"source": src, "target": tgt, "lowercased": bool(lowercased), **extra, "subsets": {}}
    for subset, (name, files) in subsets.items():
        counts = {}
        for lang in (src, tgt):
            lines = _read(files[lang])
            _write(os.path.join(data_bin, f"{subset}.raw.{lang}"), lines)
            counts[lang] = len(lines)
        if counts[src] != counts[tgt]:
            raise ValueError(f"{files[src]} has {counts[src]} lines but {files[tgt]} has {counts[tgt]}")
        info["subsets"][subset] = {"name": name, "sentences": counts[tgt],
                                   "raw": {lang: f"{subset}.raw.{lang}" for lang in (src, tgt)}}
    path = os.path.join(data_bin, "testsets.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    os.replace(path + ".tmp", path)
    return info


def read(data_bin):
    """testsets.json of DATA_BIN, or None."""
    path = os.path.join(data_bin, "testsets.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def subsets(data_bin):
    """{subset: official name}; {'test': 'test'} for data without testsets.json."""
    info = read(data_bin)
    return {k: v["name"] for k, v in info["subsets"].items()} if info else {"test": "test"}


def raw_references(data_bin, subset, lang):
    """(lines, lowercased, official name) of SUBSET's untouched references; ValueError when absent."""
    info = read(data_bin)
    entry = (info or {}).get("subsets", {}).get(subset)
    if entry is None:
        raise ValueError(f"{data_bin} has no raw references for subset {subset!r} (testsets.json): prepare the "
                         f"data with this version's data-prep/, which keeps them for sacreBLEU")
    return _read(os.path.join(data_bin, entry["raw"][lang])), bool(info.get("lowercased")), entry["name"]

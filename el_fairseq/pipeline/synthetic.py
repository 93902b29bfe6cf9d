"""A generated parallel corpus: a toy "language pair" a small Transformer learns in minutes on CPU.

Source sentences are random word sequences; the target translates each word through a fixed
lexicon and swaps every adjacent (adjective, noun) pair, so the model must learn lexical mapping
and a little local reordering. Deterministic in its seed; used by the tests and `make demo`.
"""
import os
import random
import shutil
import subprocess
import sys

NOUNS = [f"n{i}" for i in range(24)]
ADJECTIVES = [f"a{i}" for i in range(12)]
VERBS = [f"v{i}" for i in range(12)]
FUNCTION = ["the", "of", "and", "in", "to", "with"]


def _lexicon():
    rng = random.Random(1234)
    src = NOUNS + ADJECTIVES + VERBS + FUNCTION
    tgt = [f"t{w}" for w in src]
    rng.shuffle(tgt)
    return dict(zip(src, tgt))


LEXICON = _lexicon()


def source_sentence(rng: random.Random, min_len=3, max_len=14):
    words = []
    target_len = rng.randint(min_len, max_len)
    while len(words) < target_len:
        r = rng.random()
        if r < 0.3:
            words += [rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        elif r < 0.55:
            words.append(rng.choice(NOUNS))
        elif r < 0.75:
            words.append(rng.choice(VERBS))
        else:
            words.append(rng.choice(FUNCTION))
    return words[:max_len]


def translate(words):
    out = []
    i = 0
    while i < len(words):
        if i + 1 < len(words) and words[i] in ADJECTIVES and words[i + 1] in NOUNS:
            out += [LEXICON[words[i + 1]], LEXICON[words[i]]]
            i += 2
        else:
            out.append(LEXICON[words[i]])
            i += 1
    return out


def write_corpus(dest, sizes=(("train", 4000), ("valid", 200), ("test", 200)), src="src", tgt="tgt", seed=1):
    """Write DEST/{split}.{src,tgt}; returns the paths prefix. Files appear complete or not at all."""
    os.makedirs(dest, exist_ok=True)
    rng = random.Random(seed)
    for split, n in sizes:
        pairs = []
        for _ in range(n):
            words = source_sentence(rng)
            pairs.append((" ".join(words), " ".join(translate(words))))
        for lang, col in ((src, 0), (tgt, 1)):
            path = os.path.join(dest, f"{split}.{lang}")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(p[col] + "\n" for p in pairs)
            os.replace(path + ".tmp", path)
    return dest


def binarize(raw, data_bin, src="src", tgt="tgt", workers=1):
    """fairseq-preprocess RAW/{train,valid,test}.{src,tgt} into DATA_BIN (via a temporary name), with
    the test references kept as raw text for sacreBLEU (el_fairseq.pipeline.testsets). Returns DATA_BIN."""
    from . import testsets

    tool = os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess")
    cmd = [tool] if os.path.exists(tool) else [sys.executable, "-m", "fairseq_cli.preprocess"]
    tmp = data_bin + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(cmd + ["--source-lang", src, "--target-lang", tgt, "--trainpref", os.path.join(raw, "train"),
                          "--validpref", os.path.join(raw, "valid"), "--testpref", os.path.join(raw, "test"),
                          "--destdir", tmp, "--workers", str(workers)], check=True, capture_output=True)
    testsets.write(tmp, src, tgt, {"test": ("generated test", {l: os.path.join(raw, f"test.{l}") for l in (src, tgt)})},
                   lowercased=False)
    shutil.rmtree(data_bin, ignore_errors=True)
    os.replace(tmp, data_bin)
    return data_bin

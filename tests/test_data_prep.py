"""data-prep scripts end to end on small archives in the official IWSLT layouts (no network)."""
import gzip
import io
import os
import random
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["Haus", "Katze", "läuft", "schnell", "über", "die", "Straße", "und", "der", "Hund", "bellt", "laut",
         "Maison", "chat", "rue", "vite", "chien", "très", "été"]
N_TRAIN = 120


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 9))) + rng.choice([".", "!", ","])


def train_tags(rng, lines, tag_lines):
    out = list(tag_lines[:3])
    for i, line in enumerate(lines):
        if i == 5:
            out.append(f"<title>{line}</title>")
        elif i == 6:
            out.append(f"<description>{line}</description>")
        else:
            out.append(line)
        if i % 40 == 0:
            out += tag_lines
    return "\n".join(out) + "\n"


def xml(lines, lang):
    curly = [line + " l\u2019arbre" for line in lines]  # IWSLT xml uses the typographic apostrophe
    segs = "\n".join(f'<seg id="{i}"> {line} </seg>' for i, line in enumerate(curly, 1))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<srcset setid="x" srclang="{lang}">\n'
            f'<doc docid="1" genre="lectures">\n<url>http://x</url>\n<talkid>1</talkid>\n{segs}\n</doc>\n</srcset>\n</mteval>\n')


def make_archive(path, pair, year, sets, tag_lines, seed=0, drop_member=None, uneven=False):
    src, tgt = pair.split("-")
    rng = random.Random(seed)
    lengths = [rng.randint(3, 9) for _ in range(N_TRAIN)]
    train = [(sentence(rng, n), sentence(rng, n)) for n in lengths]
    train.append((sentence(rng, 3), sentence(rng, 12)))  # ratio > 1.5: cleaned away
    members = {}
    for lang, col in ((src, 0), (tgt, 1)):
        lines = [p[col] for p in train] + (["extra line ."] if uneven and lang == tgt else [])
        members[f"{pair}/train.tags.{pair}.{lang}"] = train_tags(rng, lines, tag_lines)
    counts = {}
    for k, name in enumerate(sets):
        n = 5 + k
        counts[name] = n
        pairs = [(sentence(rng), sentence(rng)) for _ in range(n)]
        for lang, col in ((src, 0), (tgt, 1)):
            members[f"{pair}/IWSLT{year}.{name}.{pair}.{lang}.xml"] = xml([p[col] for p in pairs], lang)
    if drop_member:
        members.pop(drop_member)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return counts


IWSLT14_SETS = ["TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012"]
IWSLT17_SETS = ["TED.dev2010"] + [f"TED.tst{y}" for y in range(2010, 2016)]
TAGS14 = ["<url>http://www.ted.com/talks/x</url>", "<talkid>42</talkid>", "<keywords>talks, art</keywords>"]
TAGS17 = ['<doc docid="1" genre="lectures">', "<url>http://x</url>", "<keywords>k</keywords>",
          "<speaker>Someone</speaker>", "<talkid>1</talkid>", '<reviewer href="x">R</reviewer>',
          '<translator href="y">T</translator>', "</doc>"]


def prep(script, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "data-prep", script), *args], capture_output=True, text=True)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def load_binarized(data_bin, split, src, tgt):
    from fairseq.data import Dictionary, data_utils

    for lang in (src, tgt):
        d = Dictionary.load(os.path.join(data_bin, f"dict.{lang}.txt"))
        ds = data_utils.load_indexed_dataset(os.path.join(data_bin, f"{split}.{src}-{tgt}.{lang}"), d)
        yield len(ds)


@pytest.fixture(scope="module")
def iwslt14(tmp_path_factory):
    root = tmp_path_factory.mktemp("iwslt14")
    counts = make_archive(str(root / "de-en.tgz"), "de-en", 14, IWSLT14_SETS, TAGS14)
    proc = prep("prepare-iwslt14-de-en.sh", "--archive", str(root / "de-en.tgz"), "--dest", str(root / "out"),
                "--bpe-size", "40", "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return root, counts, proc


def test_iwslt14_outputs_follow_fairseqs_recipe(iwslt14):
    root, counts, proc = iwslt14
    text = root / "out" / "iwslt14.tokenized.de-en"
    unbpe = {s: [l.replace("@@ ", "") for l in lines(text / f"{s}.de")] for s in ("train", "valid")}
    # tag lines dropped, the 1.5-ratio pair cleaned away, every 23rd line (1-based) valid, the rest train
    assert len(unbpe["train"]) + len(unbpe["valid"]) == N_TRAIN
    assert len(lines(text / "train.de")) == N_TRAIN - N_TRAIN // 23 and len(lines(text / "valid.en")) == N_TRAIN // 23
    # (tests/test_moses_parity.py checks every file byte for byte against fairseq's perl recipe)
    joined = "\n".join(unbpe["train"] + lines(text / "test.en") + lines(text / "train.en"))
    for tag in ("<url>", "<talkid>", "<keywords>", "<title>", "</title>", "<description>", "talks, art", "http"):
        assert tag not in joined
    assert joined == joined.lower()
    assert "&apos;" in joined.replace("@@ ", "")  # Moses escaping, ’ normalised to '
    assert not (text / "tmp").exists()  # the intermediate texts are gone after success
    assert len(lines(text / "test.de")) == sum(counts.values()) == len(lines(text / "test.en"))
    assert any("@@ " in l for l in lines(text / "train.de"))
    data_bin = root / "out" / "data-bin" / "iwslt14.tokenized.de-en"
    assert list(load_binarized(str(data_bin), "test", "de", "en")) == [sum(counts.values())] * 2
    assert "sentence pairs: train 115, valid 5, test 35" in proc.stdout
    assert not list((root / "out").rglob("*.tmp"))


def test_rerun_skips_finished_stages_and_force_redoes_them(iwslt14):
    root, _, _ = iwslt14
    args = ["--archive", str(root / "de-en.tgz"), "--dest", str(root / "out"), "--bpe-size", "40"]
    again = prep("prepare-iwslt14-de-en.sh", *args)
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 5
    forced = prep("prepare-iwslt14-de-en.sh", *args, "--force")
    assert forced.returncode == 0 and "skipped" not in forced.stdout


def test_iwslt17_fr_en_is_cased_with_sentencepiece_and_joined_dictionary(tmp_path):
    counts = make_archive(str(tmp_path / "fr-en.tgz"), "fr-en", 17, IWSLT17_SETS, TAGS17, seed=3)
    proc = prep("prepare-iwslt17-fr-en.sh", "--archive", str(tmp_path / "fr-en.tgz"), "--dest", str(tmp_path / "out"),
                "--bpe-size", "60")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = tmp_path / "out" / "iwslt17.fr-en"
    train = lines(text / "train.fr") + lines(text / "train.en")
    joined = "\n".join(train)
    for tag in ("<doc", "</doc>", "<url>", "<keywords>", "<speaker>", "<talkid>", "<reviewer", "<translator", "<title>"):
        assert tag not in joined
    assert any(c.isupper() for c in joined)  # case kept
    assert "▁" in joined  # sentencepiece pieces
    assert len(lines(text / "train.fr")) == N_TRAIN
    assert len(lines(text / "valid.en")) == counts["TED.dev2010"]
    assert len(lines(text / "test.fr")) == sum(n for k, n in counts.items() if "tst" in k)
    data_bin = tmp_path / "out" / "data-bin" / "iwslt17.fr-en"
    assert (data_bin / "spm.model").exists() and (text / "spm.model").exists()
    assert lines(data_bin / "dict.fr.txt") == lines(data_bin / "dict.en.txt")  # joined dictionary
    assert list(load_binarized(str(data_bin), "valid", "fr", "en")) == [counts["TED.dev2010"]] * 2


def test_multi30k_from_a_local_folder_with_every_test_set(tmp_path):
    import json

    rng = random.Random(5)
    raw = tmp_path / "raw"
    raw.mkdir()
    sizes = (("train", 60), ("val", 7), ("test_2016_flickr", 9), ("test_2017_flickr", 6), ("test_2018_flickr", 5))
    for name, n in sizes:
        for lang in ("de", "en"):
            if name == "test_2018_flickr" and lang == "en":
                continue  # a set without its reference file is skipped
            with gzip.open(raw / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("".join(sentence(rng).capitalize() + "\n" for _ in range(n)))
    proc = prep("prepare-multi30k.sh", "--src", "de", "--raw-dir", str(raw), "--dest", str(tmp_path / "out"),
                "--bpe-size", "30")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test_2018_flickr: no de and en files" in proc.stdout and "test_2017_mscoco: no de and en" in proc.stdout
    text = tmp_path / "out" / "multi30k.de-en"
    assert [len(lines(text / f"{s}.en")) for s in ("train", "valid", "test", "test1")] == [60, 7, 9, 6]
    assert all(l == l.lower() for l in lines(text / "train.de"))
    data_bin = tmp_path / "out" / "data-bin" / "multi30k.de-en"
    assert list(load_binarized(str(data_bin), "test", "de", "en")) == [9, 9]
    assert list(load_binarized(str(data_bin), "test1", "de", "en")) == [6, 6]
    info = json.loads((data_bin / "testsets.json").read_text())
    assert {k: v["name"] for k, v in info["subsets"].items()} == {"test": "test_2016_flickr", "test1": "test_2017_flickr"}
    assert info["lowercased"] is True
    with gzip.open(raw / "test_2017_flickr.en.gz", "rt", encoding="utf-8") as f:
        assert lines(data_bin / "test1.raw.en") == f.read().splitlines()  # untouched: cased, untokenised
    assert "test1: test_2017_flickr (6 sentences)" in proc.stdout
    assert f"done: {data_bin}  (train 60 / valid 7 / test 9 / test1 6)" in proc.stdout  # every subset counted
    bad = prep("prepare-multi30k.sh", "--src", "es", "--raw-dir", str(raw), "--dest", str(tmp_path / "o2"))
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --src 'es' is not available: allowed de, fr"

    # A rerun with another --bpe-size rebuilds the BPE stages and what follows, and says why.
    again = prep("prepare-multi30k.sh", "--src", "de", "--raw-dir", str(raw), "--dest", str(tmp_path / "out"),
                 "--bpe-size", "5")
    assert again.returncode == 0, again.stderr[-2000:]
    # (the tokenised text of 1-extract was removed with tmp/ after the first run: it is made again)
    assert "/tmp/train.de was removed after the last run and 2-learn-bpe needs it, rebuilding" in again.stdout
    assert "2-learn-bpe: made from other inputs before (bpe_size: 30 -> 5), rebuilding" in again.stdout
    assert "4-binarize: made from other inputs before" in again.stdout
    assert len(lines(text / "code")) == 1 + 5  # '#version' line + 5 merges
    # ... and a changed input file rebuilds from the first stage.
    with gzip.open(raw / "val.en.gz", "wt", encoding="utf-8") as f:
        f.write("".join(sentence(rng) + "\n" for _ in range(7)))
    third = prep("prepare-multi30k.sh", "--src", "de", "--raw-dir", str(raw), "--dest", str(tmp_path / "out"),
                 "--bpe-size", "5")
    assert third.returncode == 0 and "1-extract: made from other inputs before (inputs_sha256:" in third.stdout


@pytest.mark.parametrize("case,message", [
    ("missing", "error: archive not found: {path}"),
    ("corrupt", "error: corrupt or unreadable archive {path}"),
    ("member", "{path} has no member IWSLT14.TED.tst2011.de-en.en.xml"),
    ("uneven", "but train.tags.de-en.en has"),
])
def test_bad_archives_are_refused_with_one_line(tmp_path, case, message):
    path = tmp_path / "de-en.tgz"
    if case == "corrupt":
        path.write_bytes(b"\x1f\x8b\x08 this is not a tarball")
    elif case == "member":
        make_archive(str(path), "de-en", 14, IWSLT14_SETS, TAGS14, drop_member="de-en/IWSLT14.TED.tst2011.de-en.en.xml")
    elif case == "uneven":
        make_archive(str(path), "de-en", 14, IWSLT14_SETS, TAGS14, uneven=True)
    proc = prep("prepare-iwslt14-de-en.sh", "--archive", str(path), "--dest", str(tmp_path / "out"), "--bpe-size", "40")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr
    assert message.format(path=path) in err[0]
    assert not (tmp_path / "out" / "data-bin").exists()

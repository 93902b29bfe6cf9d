"""data-prep never says "done" without its outputs, and bad input files end it with one line naming
the file and the problem (no traceback, no done marker, no data-bin)."""
import gzip
import io
import os
import random
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["ein", "Hund", "läuft", "über", "die", "Straße", "a", "dog", "runs", "across", "the", "street", "Mann"]
SPLITS = (("train", 40), ("val", 5), ("test_2016_flickr", 6))


def prep(script, *args, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, "data-prep", script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def write_gz(path, text, encoding="utf-8"):
    with gzip.open(path, "wb") as f:
        f.write(text.encode(encoding))


def multi30k_raw(folder, seed=0):
    rng = random.Random(seed)
    folder.mkdir()
    for name, n in SPLITS:
        for lang in ("de", "en"):
            write_gz(folder / f"{name}.{lang}.gz",
                     "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + " .\n" for _ in range(n)))
    return folder


def multi30k(raw, dest, **env):
    return prep("prepare-multi30k.sh", "--src", "de", "--raw-dir", str(raw), "--dest", str(dest), "--bpe-size", "20",
                env=env)


def assert_refused(proc, dest, *parts):
    """Exit status 1, one stderr line holding every part, no traceback, nothing that looks done."""
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in parts:
        assert part in err[0], (part, err[0])
    assert not err[0].endswith(":")
    assert "done:" not in proc.stdout
    assert not os.path.isdir(os.path.join(dest, "data-bin")) or not os.listdir(os.path.join(dest, "data-bin"))
    assert not [m for m in _markers(dest) if m.endswith("binarize")]
    return err[0]


def _markers(dest):
    return [name for root, _, files in os.walk(dest) if root.endswith(".stages") for name in files]


def test_a_deleted_data_bin_is_made_again_and_tmp_is_removed(tmp_path):
    raw = multi30k_raw(tmp_path / "raw")
    first = multi30k(raw, tmp_path / "out")
    assert first.returncode == 0, first.stderr[-2000:]
    data_bin = tmp_path / "out" / "data-bin" / "multi30k.de-en"
    assert (data_bin / "train.de-en.de.bin").exists() and not (tmp_path / "out" / "multi30k.de-en" / "tmp").exists()
    again = multi30k(raw, tmp_path / "out")
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 4  # nothing to redo
    for path in data_bin.iterdir():
        path.unlink()
    data_bin.rmdir()
    third = multi30k(raw, tmp_path / "out")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "4-binarize: done already" not in third.stdout
    assert "testsets.json is missing" in third.stdout or "was removed after the last run" in third.stdout
    assert (data_bin / "train.de-en.de.bin").exists() and (data_bin / "testsets.json").exists()
    assert (data_bin / "test.raw.en").exists() and not (tmp_path / "out" / "multi30k.de-en" / "tmp").exists()


@pytest.mark.parametrize("name", ["train.de", "test_2016_flickr.en"])
def test_an_empty_multi30k_file_is_refused(tmp_path, name):
    raw = multi30k_raw(tmp_path / "raw")
    write_gz(raw / f"{name}.gz", "")
    assert_refused(multi30k(raw, tmp_path / "out"), tmp_path / "out", f"{raw / name}.gz: no sentences")


def test_a_multi30k_file_that_is_not_utf8_is_not_called_a_corrupt_gzip(tmp_path):
    raw = multi30k_raw(tmp_path / "raw")
    write_gz(raw / "val.de.gz", "ein Hund läuft .\n" * 5, encoding="latin-1")
    line = assert_refused(multi30k(raw, tmp_path / "out"), tmp_path / "out",
                          f"{raw / 'val.de.gz'}: not UTF-8 text (byte 0xe4 at offset 10)")
    assert "gzip" not in line.replace(".gz", "")


def test_multi30k_offline_names_its_own_option(tmp_path):
    # a proxy nobody listens on: the download fails at once, as offline
    proc = prep("prepare-multi30k.sh", "--src", "de", "--dest", str(tmp_path / "out"),
                env={"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"})
    line = assert_refused(proc, tmp_path / "out", "could not download train.de.gz", "pass --raw-dir FOLDER")
    assert "--archive" not in line
    assert not list((tmp_path / "out").rglob("*.tmp"))


def iwslt14_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"de-en/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def iwslt14(archive, dest):
    return prep("prepare-iwslt14-de-en.sh", "--archive", str(archive), "--dest", str(dest), "--bpe-size", "20")


def test_an_iwslt_member_that_is_not_utf8_is_named(tmp_path):
    archive = iwslt14_archive(tmp_path / "de-en.tgz", {"train.tags.de-en.de": "Straße über\n".encode("latin-1"),
                                                        "train.tags.de-en.en": b"street over\n"})
    assert_refused(iwslt14(archive, tmp_path / "out"), tmp_path / "out",
                   f"member de-en/train.tags.de-en.de of {archive}: not UTF-8 text (byte 0xdf at offset 4)")


def test_an_iwslt_train_member_with_only_tag_lines_is_refused(tmp_path):
    tags = b"<url>http://x</url>\n<talkid>1</talkid>\n"
    archive = iwslt14_archive(tmp_path / "de-en.tgz", {"train.tags.de-en.de": tags, "train.tags.de-en.en": tags})
    assert_refused(iwslt14(archive, tmp_path / "out"), tmp_path / "out",
                   f"member train.tags.de-en.de of {archive} (after dropping tag lines): no sentences")


@pytest.mark.parametrize("cut,reason", [(0, "empty file"), (None, "the gzip data ends early"),
                                        ("plain", "not a tar archive")])
def test_a_broken_archive_says_what_is_wrong_with_it(tmp_path, cut, reason):
    with open(os.path.join(ROOT, "tests", "data", "iwslt14-like", "de-en.tgz"), "rb") as f:
        good = f.read()
    path = tmp_path / "de-en.tgz"
    path.write_bytes(b"just some text, no archive\n" if cut == "plain" else good[:len(good) // 2 if cut is None else cut])
    assert_refused(iwslt14(path, tmp_path / "out"), tmp_path / "out", f"corrupt or unreadable archive {path}: {reason}")

"""The three corpora. Each stage writes its files via temporary names and is skipped when done
(its record unchanged and its outputs present: common.Stages); PREP/tmp/ is removed after success."""
import gzip
import os
import shutil
import zlib

from . import archive, bpe, text
from .binarize import fairseq_preprocess
from .common import PrepError, Stages, check_parallel, decode_utf8, log, read_lines, sha256, tool_versions, write_lines

IWSLT14_URLS = ["https://wit3.fbk.eu/archive/2014-01/texts/de/en/de-en.tgz",
                "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"]
IWSLT14_DROP = ("<url>", "<talkid>", "<keywords>")
# fairseq's prepare-iwslt14.sh: `ls IWSLT14.TED*.$l.xml` files, concatenated in this order for test.
IWSLT14_TEST = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
                "IWSLT14.TED.tst2012"]

IWSLT17_URLS = ["https://wit3.fbk.eu/archive/2017-01-trnted/texts/fr/en/fr-en.tgz"]
IWSLT17_DROP = ("<doc", "</doc>", "<url>", "<keywords>", "<speaker>", "<talkid>", "<reviewer", "<translator")
# Our fixed Fr-En split (README): valid = dev2010, test = tst2010..tst2015 concatenated in order.
IWSLT17_VALID = ["IWSLT17.TED.dev2010"]
IWSLT17_TEST = [f"IWSLT17.TED.tst{y}" for y in range(2010, 2016)]

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}.gz"
MULTI30K_SPLITS = {"train": "train", "valid": "val"}
# The official test sets, binarised as fairseq subsets test, test1, ... in this order when present.
MULTI30K_TESTS = ["test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr"]
# Bumped when a change here changes the prepared text: a stage made by an older version is rebuilt.
PREP_VERSION = 2


def _texts(folder, splits, langs, kind=""):
    """FOLDER/SPLIT{kind}.LANG for every split and language."""
    return [os.path.join(folder, f"{s}{kind}.{l}") for s in splits for l in langs]


def _binarized(data_bin, src, tgt, splits, beside=()):
    """What fairseq-preprocess (and the binarize stage) leaves in DATA_BIN."""
    return [os.path.join(data_bin, name) for name in (
        "testsets.json", *beside, f"dict.{src}.txt", f"dict.{tgt}.txt",
        *(f"{s}.{src}-{tgt}.{l}.{ext}" for s in splits for l in (src, tgt) for ext in ("bin", "idx")))]


def _not_empty(n, what):
    """Refuse a split without sentences: subword-nmt and fairseq-generate would fail on it later."""
    if n == 0:
        raise PrepError(f"{what}: no sentences")
    return n


def _report(folder, langs, splits=("train", "valid", "test")):
    counts = {s: check_parallel(*[os.path.join(folder, f"{s}.{l}") for l in langs]) for s in splits}
    log("sentence pairs: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()))
    return counts


def _archive_path(archive_path, urls, cache_dir):
    """--archive as given, or the official archive downloaded into DEST (first URL that answers)."""
    if archive_path is None:
        archive_path = archive.fetch(urls, os.path.join(cache_dir, os.path.basename(urls[0])))
    return archive_path


def _extract_iwslt(archive_path, pair, src, tgt, drop, sets, tmp, workers, lower, clean=True):
    """train.tags -> tokenised (cleaned) train.tags.{l}; xml sets -> tokenised {set}.{l}."""
    tar, names = archive.open_archive(archive_path)
    train = {}
    for lang in (src, tgt):
        lines = text.train_tags_lines(archive.read_member(tar, names, f"train.tags.{pair}.{lang}", archive_path),
                                      drop)
        _not_empty(len(lines), f"member train.tags.{pair}.{lang} of {archive_path} (after dropping tag lines)")
        log(f"train.tags.{pair}.{lang}: {len(lines):,} lines after dropping tag lines; tokenising")
        train[lang] = text.tokenize(lines, lang, workers)
    if len(train[src]) != len(train[tgt]):
        raise PrepError(f"train.tags.{pair}.{src} has {len(train[src])} lines but train.tags.{pair}.{tgt} has "
                        f"{len(train[tgt])} in {archive_path}")
    if clean:
        before = len(train[src])
        train[src], train[tgt] = text.clean_corpus(train[src], train[tgt], ratio=1.5, min_len=1, max_len=175)
        _not_empty(len(train[src]), f"train.tags.{pair}.{{{src},{tgt}}} of {archive_path} after clean-corpus "
                                    "(ratio 1.5, length 1-175)")
        log(f"clean-corpus (ratio 1.5, length 1-175): kept {len(train[src]):,} of {before:,}")
    for lang in (src, tgt):
        write_lines(os.path.join(tmp, f"train.tags.{lang}"), text.lowercase(train[lang]) if lower else train[lang])
    for name in sets:
        counts = []
        for lang in (src, tgt):
            lines, raw = text.xml_segments(archive.read_member(tar, names, f"{name}.{pair}.{lang}.xml", archive_path))
            _not_empty(len(lines), f"member {name}.{pair}.{lang}.xml of {archive_path} (no <seg id> line)")
            write_lines(os.path.join(tmp, f"{name}.raw.{lang}"), raw)
            lines = text.tokenize(lines, lang, workers)
            counts.append(write_lines(os.path.join(tmp, f"{name}.{lang}"), text.lowercase(lines) if lower else lines))
        if counts[0] != counts[1]:
            raise PrepError(f"{name}.{pair}.{src}.xml has {counts[0]} segments but {name}.{pair}.{tgt}.xml has "
                            f"{counts[1]} in {archive_path}")
        log(f"{name}: {counts[0]:,} segments")
    return f"train {len(train[src]):,} pairs, {len(sets)} xml sets"


def _split_every_23rd(tmp, langs):
    for lang in langs:
        lines = read_lines(os.path.join(tmp, f"train.tags.{lang}"))
        # awk 'NR % 23 == 0' (1-based line numbers) -> valid, the rest -> train
        _not_empty(len(lines) // 23, f"valid (every 23rd of the {len(lines)} cleaned train lines)")
        write_lines(os.path.join(tmp, f"valid.{lang}"), (l for i, l in enumerate(lines, 1) if i % 23 == 0))
        write_lines(os.path.join(tmp, f"train.{lang}"), (l for i, l in enumerate(lines, 1) if i % 23 != 0))


def _concat_sets(tmp, sets, split, langs, raw=False):
    """cat the sets' files into SPLIT.{lang} (and, with raw, their untouched text into SPLIT.raw.{lang})."""
    for kind in (("", ".raw") if raw else ("",)):
        for lang in langs:
            write_lines(os.path.join(tmp, f"{split}{kind}.{lang}"),
                        (line for name in sets for line in read_lines(os.path.join(tmp, f"{name}{kind}.{lang}"))))


def _subword_nmt_stages(stages, first, prep, tmp, src, tgt, merges, tests=("test",)):
    """Learn joint subword-nmt BPE on train.{src,tgt} and apply it to every split (stage numbers
    from `first`); the codes stay in PREP/code."""
    codes = os.path.join(prep, "code")
    stages.add(f"{first}-learn-bpe", lambda: bpe.learn_subword_nmt(
        [os.path.join(tmp, f"train.{src}"), os.path.join(tmp, f"train.{tgt}")], merges, codes) or
        f"subword-nmt, {merges} merges, joint {src}+{tgt}", inputs={"bpe_size": merges}, outputs=[codes])
    splits = ("train", "valid", *tests)
    stages.add(f"{first + 1}-apply-bpe", lambda: [
        bpe.apply_subword_nmt(codes, os.path.join(tmp, f"{s}.{l}"), os.path.join(prep, f"{s}.{l}"))
        for s in splits for l in (src, tgt)] and "BPE applied", outputs=_texts(prep, splits, (src, tgt)))


def write_testsets(data_bin, prep, src, tgt, subsets, lowercased, bpe_kind):
    """Copy each test subset's raw text beside the binarised data and describe the subsets in
    DATA_BIN/testsets.json (el_fairseq.pipeline.testsets): evaluation scores sacreBLEU against these
    untouched references, lowercased when the preparation lowercased."""
    from el_fairseq.pipeline import testsets

    info = testsets.write(data_bin, src, tgt, {
        subset: (name, {l: os.path.join(prep, "tmp", f"{subset}.raw.{l}") for l in (src, tgt)})
        for subset, name in subsets.items()}, lowercased, bpe=bpe_kind, prep_version=PREP_VERSION)
    for subset, item in info["subsets"].items():
        log(f"{subset}: {item['name']} ({item['sentences']:,} sentences)")


def _iwslt_setup(dest, name, archive_path, urls, force, options):
    """(text folder, its tmp/, data-bin folder, stages, archive path) of an IWSLT preparation; the
    archive is only looked for (and downloaded) while the extraction stage is still to do."""
    prep = os.path.join(dest, name)
    if archive_path is None:
        archive_path = _archive_path(archive_path, urls, dest)
    if not os.path.isfile(archive_path):
        raise PrepError(f"archive not found: {archive_path}")
    tmp = os.path.join(prep, "tmp")
    stages = Stages(prep, force, {"prep_version": PREP_VERSION, "tools": tool_versions(),
                                  "archive_sha256": sha256(archive_path), **options}, scratch=tmp)
    return prep, tmp, os.path.join(dest, "data-bin", name), stages, archive_path


def prepare_iwslt14(archive_path=None, dest="data", bpe_size=10000, workers=2, force=False):
    src, tgt, pair = "de", "en", "de-en"
    prep, tmp, data_bin, stages, archive_path = _iwslt_setup(dest, "iwslt14.tokenized.de-en", archive_path,
                                                             IWSLT14_URLS, force, {})
    stages.add("1-extract", _extract_iwslt, archive_path, pair, src, tgt, IWSLT14_DROP, IWSLT14_TEST, tmp, workers, True,
               outputs=_texts(tmp, ["train.tags"], (src, tgt)) + _texts(tmp, IWSLT14_TEST, (src, tgt))
               + _texts(tmp, IWSLT14_TEST, (src, tgt), ".raw"))

    def split():
        _split_every_23rd(tmp, (src, tgt))
        _concat_sets(tmp, IWSLT14_TEST, "test", (src, tgt), raw=True)
        return "valid = every 23rd train line; test = " + " + ".join(IWSLT14_TEST)

    stages.add("2-split", split, outputs=_texts(tmp, ("train", "valid", "test"), (src, tgt))
               + _texts(tmp, ["test"], (src, tgt), ".raw"))
    _subword_nmt_stages(stages, 3, prep, tmp, src, tgt, bpe_size)

    def binarize():
        fairseq_preprocess(prep, src, tgt, data_bin, workers)
        # the BPE codes beside the data: fairseq-interactive / from_pretrained take --bpe-codes from there
        shutil.copyfile(os.path.join(prep, "code"), os.path.join(data_bin, "code"))
        write_testsets(data_bin, prep, src, tgt, {"test": "+".join(IWSLT14_TEST)}, True, "subword_nmt")
        return data_bin + " (BPE codes beside it)"

    stages.add("5-binarize", binarize, outputs=_binarized(data_bin, src, tgt, ("train", "valid", "test"), ["code"]))
    stages.run()
    return _report(prep, (src, tgt)), data_bin


def prepare_iwslt17(archive_path=None, dest="data", bpe_size=16000, workers=2, force=False):
    src, tgt, pair = "fr", "en", "fr-en"
    prep, tmp, data_bin, stages, archive_path = _iwslt_setup(dest, "iwslt17.fr-en", archive_path,
                                                             IWSLT17_URLS, force, {})
    sets = IWSLT17_VALID + IWSLT17_TEST
    stages.add("1-extract", _extract_iwslt, archive_path, pair, src, tgt, IWSLT17_DROP, sets, tmp, workers, False,
               outputs=_texts(tmp, ["train.tags"], (src, tgt)) + _texts(tmp, sets, (src, tgt))
               + _texts(tmp, sets, (src, tgt), ".raw"))

    def split():
        for lang in (src, tgt):
            shutil.copyfile(os.path.join(tmp, f"train.tags.{lang}"), os.path.join(tmp, f"train.{lang}"))
        _concat_sets(tmp, IWSLT17_VALID, "valid", (src, tgt))
        _concat_sets(tmp, IWSLT17_TEST, "test", (src, tgt), raw=True)
        return "valid = " + " + ".join(IWSLT17_VALID) + "; test = " + " + ".join(IWSLT17_TEST)

    splits = ("train", "valid", "test")
    stages.add("2-split", split, outputs=_texts(tmp, splits, (src, tgt)) + _texts(tmp, ["test"], (src, tgt), ".raw"))
    model = os.path.join(prep, "spm")
    stages.add("3-learn-bpe", lambda: bpe.learn_sentencepiece(
        [os.path.join(tmp, f"train.{src}"), os.path.join(tmp, f"train.{tgt}")], bpe_size, model) or
        f"sentencepiece BPE, vocabulary {bpe_size}, joint fr+en", inputs={"bpe_size": bpe_size},
        outputs=[model + ".model", model + ".vocab"])
    stages.add("4-apply-bpe", lambda: [bpe.apply_sentencepiece(model + ".model", os.path.join(tmp, f"{s}.{l}"),
                                                               os.path.join(prep, f"{s}.{l}"))
                                       for s in splits for l in (src, tgt)] and "pieces applied",
               outputs=_texts(prep, splits, (src, tgt)))

    def binarize():
        fairseq_preprocess(prep, src, tgt, data_bin, workers, joined=True)
        shutil.copyfile(model + ".model", os.path.join(data_bin, "spm.model"))
        write_testsets(data_bin, prep, src, tgt, {"test": "+".join(IWSLT17_TEST)}, False, "sentencepiece")
        return data_bin + " (joined dictionary, spm.model beside it)"

    stages.add("5-binarize", binarize, outputs=_binarized(data_bin, src, tgt, splits, ["spm.model"]))
    stages.run()
    return _report(prep, (src, tgt)), data_bin


def _read_gz(path):
    if not os.path.isfile(path):
        raise PrepError(f"missing Multi30k file: {path}")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise PrepError(f"corrupt gzip file {path}: {err}") from None
    return text.split_lines(decode_utf8(data, path))


def _multi30k_files(raw_dir, dest, src, tgt):
    """{official name: folder} of the splits to use: train, val, test_2016_flickr required, the other
    test sets where both sides exist (downloaded when no --raw-dir is given)."""
    folder = raw_dir or os.path.join(dest, "multi30k-raw")
    if raw_dir is not None and not os.path.isdir(raw_dir):
        raise PrepError(f"--raw-dir {raw_dir}: no such folder")
    found = []
    for name in [*MULTI30K_SPLITS.values(), *MULTI30K_TESTS]:
        required = name in MULTI30K_SPLITS.values() or name == MULTI30K_TESTS[0]
        for lang in (src, tgt):
            path = os.path.join(folder, f"{name}.{lang}.gz")
            if raw_dir is None and not os.path.exists(path):
                try:
                    archive.fetch([MULTI30K_URL.format(name=f"{name}.{lang}")], path,
                                  "pass --raw-dir FOLDER holding train/val/test_2016_flickr .{de,en,fr}.gz")
                except PrepError:
                    if required:
                        raise
        if all(os.path.isfile(os.path.join(folder, f"{name}.{l}.gz")) for l in (src, tgt)):
            found.append(name)
        elif required:
            missing = [f"{name}.{l}.gz" for l in (src, tgt) if not os.path.isfile(os.path.join(folder, f"{name}.{l}.gz"))]
            raise PrepError(f"missing Multi30k file: {os.path.join(folder, missing[0])}")
        else:
            log(f"{name}: no {src} and {tgt} files in {folder}, skipped")
    return folder, found


def prepare_multi30k(src="de", raw_dir=None, dest="data", bpe_size=10000, workers=2, force=False):
    if src not in ("de", "fr"):
        raise PrepError(f"--src {src!r} is not available: allowed de, fr")
    tgt = "en"
    prep = os.path.join(dest, f"multi30k.{src}-en")
    tmp = os.path.join(prep, "tmp")
    data_bin = os.path.join(dest, "data-bin", f"multi30k.{src}-en")
    folder, names = _multi30k_files(raw_dir, dest, src, tgt)
    tests = [n for n in names if n in MULTI30K_TESTS]
    subsets = {("test" if i == 0 else f"test{i}"): name for i, name in enumerate(tests)}
    checksums = {f"{n}.{l}.gz": sha256(os.path.join(folder, f"{n}.{l}.gz")) for n in names for l in (src, tgt)}
    stages = Stages(prep, force, {"prep_version": PREP_VERSION, "tools": tool_versions(), "src": src,
                                  "inputs_sha256": checksums}, scratch=tmp)

    def extract():
        counts = {}
        for split, name in [*MULTI30K_SPLITS.items(), *[(s, n) for s, n in subsets.items()]]:
            lines = {lang: _read_gz(os.path.join(folder, f"{name}.{lang}.gz")) for lang in (src, tgt)}
            for lang in (src, tgt):
                _not_empty(len(lines[lang]), os.path.join(folder, f"{name}.{lang}.gz"))
            if len(lines[src]) != len(lines[tgt]):
                raise PrepError(f"{folder}/{name}.{src}.gz has {len(lines[src])} lines but "
                                f"{name}.{tgt}.gz has {len(lines[tgt])}")
            for lang in (src, tgt):
                if split.startswith("test"):
                    write_lines(os.path.join(tmp, f"{split}.raw.{lang}"), lines[lang])
                write_lines(os.path.join(tmp, f"{split}.{lang}"), text.lowercase(text.tokenize(lines[lang], lang, workers)))
            counts[f"{split} ({name})" if split.startswith("test") else split] = len(lines[src])
        return ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " (tokenised, lowercased)"

    splits = ("train", "valid", *subsets)
    stages.add("1-extract", extract, outputs=_texts(tmp, splits, (src, tgt)) + _texts(tmp, subsets, (src, tgt), ".raw"))
    _subword_nmt_stages(stages, 2, prep, tmp, src, tgt, bpe_size, tests=tuple(subsets))

    def binarize():
        fairseq_preprocess(prep, src, tgt, data_bin, workers, tests=tuple(subsets))
        shutil.copyfile(os.path.join(prep, "code"), os.path.join(data_bin, "code"))
        write_testsets(data_bin, prep, src, tgt, subsets, True, "subword_nmt")
        return data_bin + " (BPE codes beside it)"

    stages.add("4-binarize", binarize, outputs=_binarized(data_bin, src, tgt, splits, ["code"]))
    stages.run()
    return _report(prep, (src, tgt), splits), data_bin

"""data-prep equals fairseq's perl recipe byte for byte.

References (tests/data, made with the perl scripts, see the README there):
- moses-golden/: tokenizer.perl -l de|en|fr on lines with the tokenizer's hard cases;
- iwslt14-like/: an archive in the official IWSLT14 layout (real Multi30k sentences plus cases where a
  naive Python port differs) and the outputs of fairseq's prepare-iwslt14.sh run on it;
- the expected values of the unit tests below are outputs of lowercase.perl, clean-corpus-n.perl and
  GNU sed (C.UTF-8) on the same inputs.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
sys.path.insert(0, os.path.join(ROOT, "data-prep"))

from dataprep import text  # noqa: E402
from dataprep.common import read_lines  # noqa: E402


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("lang", ["de", "en", "fr"])
def test_tokenizer_equals_tokenizer_perl_on_the_golden_lines(lang):
    raw = read_lines(os.path.join(DATA, "moses-golden", "raw.txt"))
    ours = "".join(line + "\n" for line in text.tokenize(raw, lang)).encode("utf-8")
    assert ours == read_bytes(os.path.join(DATA, "moses-golden", f"tok.{lang}"))


@pytest.mark.parametrize("line,lang,perl", [
    # tokenizer.perl's "split final dots unconditionally" (2018): sacremoses keeps these periods attached.
    ("Eine Person blickt aus dem Fenster auf einen Bus der Linie A.", "de",
     "Eine Person blickt aus dem Fenster auf einen Bus der Linie A ."),
    ("The U.S.A. and the U.K. signed it in 1999; see p. 12.", "de",
     "The U.S.A. and the U.K. signed it in 1999 ; see p. 12 ."),
    ("The U.S.A. and the U.K. signed it in 1999; see p. 12.", "en",
     "The U.S.A. and the U.K. signed it in 1999 ; see p . 12 ."),
    ("Die U.S.A. und das U.K.", "de", "Die U.S.A. und das U.K ."),
    ("Siehe S. 12.", "de", "Siehe S. 12 ."),
    # perl deletes U+001C..U+001F ([\000-\037] after \s+ -> ' '); Python's \s would make them spaces.
    ("Steuer\x1czeichen hier.", "de", "Steuerzeichen hier ."),
])
def test_tokenizer_rules_where_sacremoses_differs(line, lang, perl):
    assert text.tokenize_line(line, lang) == perl


def test_lowercase_is_perls_lc_not_pythons_lower():
    # lowercase.perl: Σ -> σ everywhere; str.lower() gives the final form ς at a word's end.
    assert "ΟΔΟΣ ΣΑΣ.".lower() == "οδος σας."
    assert text.lowercase(["ΟΔΟΣ ΣΑΣ. İstanbul ǅ"]) == ["οδοσ σασ. i\u0307stanbul ǆ"]


def test_clean_corpus_equals_clean_corpus_n_perl():
    src = ["a\x1cb c", "a\u00a0b c d", "  lead  and   trail  ", "", "w " * 175, "w " * 176,
           "x" * 1001 + " y", "x" * 1000 + " y", "a b c", "a b c d", "p\u2028q r", "A|B c"]
    tgt = ["p q", "p q r", "one two three four", "leer", "v " * 175, "v " * 175,
           "z y", "z y", "x y", "x y", "s t", "d e"]
    # clean-corpus-n.perl -ratio 1.5 CORPUS de en OUT 1 175 on these lines:
    perl_src = ["a\x1cb c", "a b c d", "lead and trail", ("w " * 175).strip(), "x" * 1000 + " y", "a b c", "p q r",
                "AB c"]
    perl_tgt = ["p q", "p q r", "one two three four", ("v " * 175).strip(), "z y", "x y", "s t", "d e"]
    assert text.clean_corpus(src, tgt, ratio=1.5, min_len=1, max_len=175) == (perl_src, perl_tgt)


def test_clean_corpus_keeps_factors_when_the_first_line_has_one():
    # The first pair has '|': a factored corpus, '|' is kept; a blank factor stops perl.
    assert text.clean_corpus(["a|x b|y", "q|r"], ["c|z d|w", "s|t"]) == (["a|x b|y", "q|r"], ["c|z d|w", "s|t"])
    with pytest.raises(ValueError, match="blank factor"):
        text.clean_corpus(["one two | three"], ["eins zwei drei"])


def test_xml_filter_is_the_recipes_grep_and_sed():
    lines = ['<doc docid="1">', '<seg id="1"> Hallo  Welt </seg>', '<seg id=7>Ohne</seg>',
             '<seg id="8">\u3000Breit\u3000</seg>', '<seg id="9">\u00a0Fest\u00a0</seg>',
             '<seg id="10"> Text </seg> danach', '<seg id="11">Das ist’s.</seg>']
    tokenised_input, raw = text.xml_segments(lines)
    # grep '<seg id' | sed 's/<seg id="[0-9]*">\s*//g' | sed 's/\s*<\/seg>\s*//g' | sed "s/’/'/g" (C.UTF-8):
    assert tokenised_input == ["Hallo  Welt", "<seg id=7>Ohne", "Breit", "\u00a0Fest\u00a0", "Textdanach",
                               "Das ist's."]
    assert raw[-1] == "Das ist’s."


def test_lines_split_at_newline_only():
    assert text.split_lines("a\u2028b\x85c\rd\n\ne\n") == ["a\u2028b\x85c\rd", "", "e"]
    assert "a\u2028b\n".splitlines() == ["a", "b"]  # what a naive reader would do


@pytest.fixture(scope="module")
def iwslt14_like(tmp_path_factory):
    dest = tmp_path_factory.mktemp("iwslt14-like")
    proc = subprocess.run(["bash", os.path.join(ROOT, "data-prep", "prepare-iwslt14-de-en.sh"),
                           "--archive", os.path.join(DATA, "iwslt14-like", "de-en.tgz"), "--dest", str(dest),
                           "--bpe-size", "200", "--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return dest


@pytest.mark.parametrize("name", ["code", "train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en"])
def test_iwslt14_preparation_is_byte_identical_to_fairseqs_perl_recipe(iwslt14_like, name):
    ours = read_bytes(os.path.join(iwslt14_like, "iwslt14.tokenized.de-en", name))
    assert ours == read_bytes(os.path.join(DATA, "iwslt14-like", "expected", name))


def test_iwslt14_keeps_raw_test_references_aligned_with_sentence_ids(iwslt14_like):
    import json

    data_bin = os.path.join(iwslt14_like, "data-bin", "iwslt14.tokenized.de-en")
    with open(os.path.join(data_bin, "testsets.json")) as f:
        info = json.load(f)
    assert info["lowercased"] is True and info["subsets"]["test"]["sentences"] == 65
    raw = read_lines(os.path.join(data_bin, "test.raw.en"))
    tokenised = read_lines(os.path.join(DATA, "iwslt14-like", "expected", "test.en"))
    assert len(raw) == len(tokenised) == 65
    # line i of the raw file is fairseq's sentence i: untouched text (case, ’) of the tokenised line
    assert "She said: “That’s it.”" in raw
    k = raw.index("She said: “That’s it.”")
    assert tokenised[k].replace("@@ ", "") == "she said : “ that &apos;s it . ”"

"""The Moses perl steps of fairseq's recipes, byte for byte: tokenizer.perl, lowercase.perl,
clean-corpus-n.perl, and the grep/sed filters of prepare-iwslt14.sh.

Each function names the perl (or sed) rule it mirrors; tests/test_moses_parity.py compares them with
outputs of the perl scripts on lines where a naive Python version differs.
"""
import re
from multiprocessing import Pool

from sacremoses import MosesTokenizer

# Perl's \s on character strings (Unicode rules, perl >= 5.18): Python's \s also matches
# U+001C..U+001F, which perl does not.
PERL_SPACE = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
# GNU sed's \s in a UTF-8 locale (glibc iswspace): no-break spaces (U+00A0, U+2007, U+202F) and
# U+0085 are not spaces there.
SED_SPACE = "[\t\n\x0b\x0c\r \u1680\u2000-\u2006\u2008-\u200a\u2028\u2029\u205f\u3000]"
# tokenizer.perl: `s/\s+/ /g` then `s/[\000-\037]//g`. Python's \s (sacremoses) would turn these four
# controls into a space; perl deletes them. Deleting them first gives perl's result.
_PERL_NON_SPACE_CONTROLS = re.compile("[\x1c-\x1f]")


class PerlTokenizer(MosesTokenizer):
    """sacremoses with tokenizer.perl's rule of November 2018 that it lacks:

        # split last words independently as they are unlikely to be non-breaking prefixes
        if ($i == scalar(@words)-1) { $word = $pre." ."; }

    i.e. a line's last token ending in "." always has the period split off, even after a
    non-breaking prefix ("p. 12." -> "p. 12 .", "Linie A." -> "Linie A .", "U.K." -> "U.K .").
    """

    def handles_nonbreaking_prefixes(self, text):
        text = super().handles_nonbreaking_prefixes(text)
        tokens = text.split(" ")
        last = tokens[-1]
        # perl's /^(\S+)\.$/ on the last word: at least one character before the period. The
        # parent already split it unless a prefix rule kept it whole ("p."); it never produces
        # a trailing " ." token that would match again.
        if len(last) > 1 and last.endswith("."):
            tokens[-1] = last[:-1] + " ."
        return " ".join(tokens)


_TOKENIZERS = {}


def tokenize_line(line, lang):
    """tokenizer.perl -l LANG (escaping on, no -a) on one line."""
    tok = _TOKENIZERS.get(lang)
    if tok is None:
        tok = _TOKENIZERS[lang] = PerlTokenizer(lang=lang)
    line = _PERL_NON_SPACE_CONTROLS.sub("", line)
    return tok.tokenize(line, escape=True, aggressive_dash_splits=False, return_str=True)


def _tokenize_chunk(args):
    lang, lines = args
    return [tokenize_line(line, lang) for line in lines]


def tokenize(lines, lang, workers=1, chunk=2000):
    """tokenizer.perl -l LANG on each line, over `workers` processes; order preserved."""
    chunks = [(lang, lines[i:i + chunk]) for i in range(0, len(lines), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        out = [_tokenize_chunk(c) for c in chunks]
    else:
        with Pool(workers) as pool:
            out = pool.map(_tokenize_chunk, chunks)
    return [line for part in out for line in part]


def lowercase_line(line):
    """Perl's lc() (lowercase.perl): full Unicode lowercase mapping of each character on its own.
    Python's str.lower() differs only in the context-dependent final sigma (Σ at a word's end ->
    ς); lc() always gives σ."""
    if "\u03a3" not in line:
        return line.lower()
    return "".join(ch.lower() for ch in line)


def lowercase(lines):
    """lowercase.perl on each line."""
    return [lowercase_line(line) for line in lines]


_PERL_SPACES = re.compile(PERL_SPACE + "+")


def _clean_line(line, factored):
    # $e =~ s/\|//g unless $factored_flag; s/\s+/ /g; s/^ //; s/ $//;
    if not factored:
        line = line.replace("|", "")
    line = _PERL_SPACES.sub(" ", line)
    if line.startswith(" "):
        line = line[1:]
    if line.endswith(" "):
        line = line[:-1]
    return line


def clean_corpus(src, tgt, ratio=1.5, min_len=1, max_len=175, max_word_length=1000):
    """clean-corpus-n.perl -ratio R CORPUS L1 L2 OUT MIN MAX on two lists of lines.

    As the perl script: '|' is removed unless the first pair has one (a factored corpus), whitespace
    runs become one space and the ends are trimmed; a pair is dropped when a side is empty, has
    fewer than MIN or more than MAX words (split on ' '), the word ratio either way exceeds R, or a
    word is longer than `max_word_length` characters. In a factored corpus a kept line with an empty
    factor stops it (perl: "There is a blank factor"), here with a ValueError.
    """
    if len(src) != len(tgt):
        raise ValueError(f"clean_corpus: {len(src)} source lines but {len(tgt)} target lines")
    factored = bool(src) and ("|" in src[0] or "|" in tgt[0])
    too_long = re.compile(r"[^%s|]{%d}" % (PERL_SPACE[1:-1], max_word_length + 1))
    out_src, out_tgt = [], []
    for n, (s, t) in enumerate(zip(src, tgt), 1):
        s, t = _clean_line(s, factored), _clean_line(t, factored)
        if not s or not t:
            continue
        ns, nt = len(s.split(" ")), len(t.split(" "))
        if ns > max_len or nt > max_len or ns < min_len or nt < min_len:
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        if too_long.search(s) or too_long.search(t):
            continue
        for side, line in (("source", s), ("target", t)):
            if factored and re.search(r"[ |]\|", line):
                raise ValueError(f"clean_corpus: blank factor in the {side} line {n}: {line}")
        out_src.append(s)
        out_tgt.append(t)
    return out_src, out_tgt


def split_lines(text):
    """Lines as perl, awk, grep and sed read them: split at "\\n" only. str.splitlines() would also
    split at \\r, \\v, \\f, \\x1c-\\x1e, U+0085, U+2028 and U+2029, which occur inside TED lines."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


_SEG_OPEN = re.compile('<seg id="[0-9]*">' + SED_SPACE + "*")
_SEG_CLOSE = re.compile(SED_SPACE + "*</seg>" + SED_SPACE + "*")


def xml_segments(lines):
    """prepare-iwslt14.sh's filter of an xml set, before tokenisation:
        grep '<seg id' | sed -e 's/<seg id="[0-9]*">\\s*//g' | sed -e 's/\\s*<\\/seg>\\s*//g' | sed -e "s/’/'/g"
    Returns (segments as the recipe tokenises them, raw segments without the ’ substitution)."""
    raw = [_SEG_CLOSE.sub("", _SEG_OPEN.sub("", line)) for line in lines if "<seg id" in line]
    return [line.replace("\u2019", "'") for line in raw], raw


def train_tags_lines(lines, drop):
    """prepare-iwslt14.sh's filter of train.tags: `grep -v` each of `drop` (anywhere in the line),
    then `sed -e 's/<title>//g'` ... for <title>, </title>, <description>, </description>."""
    out = []
    for line in lines:
        if any(tag in line for tag in drop):
            continue
        for tag in ("<title>", "</title>", "<description>", "</description>"):
            line = line.replace(tag, "")
        out.append(line)
    return out

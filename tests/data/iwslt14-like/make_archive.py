"""Build de-en.tgz: an archive laid out like the official IWSLT14 de-en.tgz (train.tags.de-en.{de,en}
with TED metadata lines, IWSLT14.TED*.de-en.{de,en}.xml sets), filled with real Multi30k sentence pairs
and the cases where a naive Python version of fairseq's perl recipe differs from it:

- tokenizer.perl: a line's final period after a non-breaking prefix or a single capital;
- lowercase.perl: a word-final capital sigma (Perl's lc gives σ, Python's str.lower ς);
- clean-corpus-n.perl: a word over 1,000 characters, length ratio exactly 1.5 and just above,
  empty sides, 175 / 176 words, whitespace that perl's \\s knows and Python's does not (U+001C);
- line splitting: U+2028, U+0085 and \\r inside a line (perl reads lines at \\n only);
- the xml filter (grep/sed): ids without quotes, no-break spaces and U+3000 around segments,
  text after </seg>, the typographic apostrophe.

    python make_archive.py MULTI30K_DIR   (the folder with train.{de,en}.gz)

The archive and the recipe's outputs (expected/, made by make_expected.sh) are committed; this script
documents how the archive was made.
"""
import gzip
import io
import os
import random
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
# Multi30k train lines (0-based) that tokenizer.perl's final-dot rule changes.
FINAL_DOT_LINES = [2323, 2900, 4296, 4526, 5168, 12381, 12984, 14911, 17478, 17571, 19986, 21809, 25214, 25220,
                   27020, 28040]

HARD_TRAIN = [
    ("Wir sahen die Linie A.", "We saw line A."),
    ("Siehe S. 12.", "See p. 12."),
    ("ΟΔΟΣ heißt Straße.", "ΟΔΟΣ means street."),
    ("Das Wort " + "x" * 1001 + " ist lang.", "The word is long ."),
    ("eins zwei drei vier fünf sechs", "one two three four"),  # ratio 1.5: kept
    ("eins zwei drei vier fünf sechs sieben", "one two three four"),  # ratio 1.75: dropped
    ("", "An empty source line."),
    ("Ein Satz\u2028mit Zeilentrenner.", "A sentence\u2028with a line separator."),
    ("Ein Satz\x85mit NEL.", "A sentence\x85with NEL."),
    ("Ein Satz\rmit Wagenrücklauf.", "A sentence\rwith a carriage return."),
    ("Steuer\x1czeichen hier.", "Control\x1ccharacter here."),
    (" ".join(["Wort"] * 175), " ".join(["word"] * 175)),
    (" ".join(["Wort"] * 176), " ".join(["word"] * 176)),
    ("Er sagt: „Hallo | Welt“.", "He says: \"hello | world\"."),
    ("Das kostet 1.000,50 Euro – oder 3,5 % mehr, sagte Dr. Müller.", "That costs 1,000.50 euros -- or 3.5% more, Dr. Müller said."),
    ("Die U.S.A. und das U.K.", "The U.S.A. and the U.K."),
]
XML_EXTRA = [
    ('<seg id=7>Ohne Anführungszeichen.</seg>', '<seg id=7>Without quotes.</seg>'),
    ('<seg id="8">\u3000Ideographisches Leerzeichen.\u3000</seg>', '<seg id="8">\u3000Ideographic space.\u3000</seg>'),
    ('<seg id="9">\u00a0Geschütztes Leerzeichen.\u00a0</seg>', '<seg id="9">\u00a0No-break space.\u00a0</seg>'),
    ('<seg id="10"> Text danach </seg> bleibt', '<seg id="10"> Text after </seg> stays'),
    ('<seg id="11">Sie sagte: „Das ist’s.“</seg>', '<seg id="11">She said: “That’s it.”</seg>'),
]
TAGS = ["<url>http://www.ted.com/talks/x.html</url>", "<talkid>42</talkid>", "<keywords>talks, art</keywords>"]
SETS = ["TED.dev2010", "TEDX.dev2012", "TED.tst2010", "TED.tst2011", "TED.tst2012"]


def read_gz(path):
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return f.read().split("\n")[:-1]


def main(multi30k):
    de, en = read_gz(os.path.join(multi30k, "train.de.gz")), read_gz(os.path.join(multi30k, "train.en.gz"))
    rng = random.Random(14)
    picked = sorted(set(rng.sample(range(len(de)), 300)) | set(FINAL_DOT_LINES))
    pairs = [(de[i], en[i]) for i in picked]
    train = pairs[:250] + HARD_TRAIN
    rng.shuffle(train)
    members = {}
    for lang, col in (("de", 0), ("en", 1)):
        lines = []
        for k, pair in enumerate(train):
            if k % 50 == 0:
                lines += TAGS
            line = pair[col]
            if k == 5:
                line = f"<title>{line}</title>"
            elif k == 6:
                line = f"<description>TED Talk: {line}</description>"
            lines.append(line)
        members[f"de-en/train.tags.de-en.{lang}"] = "\n".join(lines) + "\n"
    rest = pairs[250:]
    for k, name in enumerate(SETS):
        chunk = rest[k * 12:(k + 1) * 12]
        for lang, col in (("de", 0), ("en", 1)):
            segs = [f'<seg id="{i}"> {p[col].replace(chr(39), chr(0x2019))} </seg>' for i, p in enumerate(chunk, 1)]
            if k == 2:
                segs += [x[col] for x in XML_EXTRA]
            members[f"de-en/IWSLT14.{name}.de-en.{lang}.xml"] = (
                '<?xml version="1.0" encoding="UTF-8"?>\n<mteval>\n<srcset setid="iwslt2014" srclang="x">\n'
                '<doc docid="1" genre="lectures">\n<url>http://x</url>\n<talkid>1</talkid>\n'
                + "\n".join(segs) + "\n</doc>\n</srcset>\n</mteval>\n")
    out = os.path.join(HERE, "de-en.tgz")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(members):
            data = members[name].encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    with gzip.GzipFile(out, "wb", mtime=0) as f:
        f.write(buf.getvalue())
    print(out, len(train), "train pairs")


if __name__ == "__main__":
    main(sys.argv[1])

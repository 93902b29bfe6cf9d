"""Moses-compatible tokenisation (sacremoses), lowercasing and corpus cleaning, in parallel."""
import re
from multiprocessing import Pool

_TOKENIZERS = {}


def _tokenize_chunk(args):
    lang, lines = args
    from sacremoses import MosesTokenizer

    tok = _TOKENIZERS.get(lang)
    if tok is None:
        tok = _TOKENIZERS[lang] = MosesTokenizer(lang=lang)
    # tokenizer.perl defaults: XML escaping on, no aggressive hyphen splitting.
    return [tok.tokenize(line, escape=True, aggressive_dash_splits=False, return_str=True) for line in lines]


def tokenize(lines, lang, workers=1, chunk=2000):
    """Moses tokenizer.perl -l LANG on each line, over `workers` processes; order preserved."""
    chunks = [(lang, lines[i:i + chunk]) for i in range(0, len(lines), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        out = [_tokenize_chunk(c) for c in chunks]
    else:
        with Pool(workers) as pool:
            out = pool.map(_tokenize_chunk, chunks)
    return [line for part in out for line in part]


def lowercase(lines):
    """Moses lowercase.perl: Perl lc() on UTF-8 text."""
    return [line.lower() for line in lines]


def clean_corpus(src, tgt, ratio=1.5, min_len=1, max_len=175):
    """Moses clean-corpus-n.perl -ratio R ... MIN MAX: whitespace normalised, '|' removed, pairs with a
    side shorter than MIN or longer than MAX tokens, or a length ratio above R, dropped."""
    out_src, out_tgt = [], []
    for s, t in zip(src, tgt):
        s = re.sub(r"\s+", " ", s.replace("|", "")).strip()
        t = re.sub(r"\s+", " ", t.replace("|", "")).strip()
        ns, nt = len(s.split(" ")) if s else 0, len(t.split(" ")) if t else 0
        if ns < min_len or nt < min_len or ns > max_len or nt > max_len:
            continue
        if ns / nt > ratio or nt / ns > ratio:
            continue
        out_src.append(s)
        out_tgt.append(t)
    return out_src, out_tgt

"""Subword models: subword-nmt joint BPE (IWSLT14, Multi30k) and sentencepiece BPE (IWSLT17)."""
import io
import os

from .common import read_lines, write_lines


def learn_subword_nmt(train_paths, merges, codes_path):
    from subword_nmt.learn_bpe import learn_bpe

    joined = io.StringIO("".join(line + "\n" for p in train_paths for line in read_lines(p)))
    out = io.StringIO()
    learn_bpe(joined, out, merges)  # learn_bpe.py -s MERGES (min frequency 2)
    write_lines(codes_path, out.getvalue().splitlines())


def apply_subword_nmt(codes_path, in_path, out_path):
    from subword_nmt.apply_bpe import BPE

    with open(codes_path, encoding="utf-8") as codes:
        bpe = BPE(codes)
    return write_lines(out_path, (bpe.process_line(line) for line in read_lines(in_path)))


def learn_sentencepiece(train_paths, vocab_size, model_prefix):
    import sentencepiece as spm

    joined = model_prefix + ".train.txt"
    write_lines(joined, (line for p in train_paths for line in read_lines(p)))
    spm.SentencePieceTrainer.train(
        input=joined, model_prefix=model_prefix + ".tmp", vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    for ext in ("model", "vocab"):
        os.replace(f"{model_prefix}.tmp.{ext}", f"{model_prefix}.{ext}")
    os.remove(joined)


def apply_sentencepiece(model_path, in_path, out_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return write_lines(out_path, (" ".join(sp.encode(line, out_type=str)) for line in read_lines(in_path)))

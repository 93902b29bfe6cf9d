"""CE vs the encouraging loss for translation in Hugging Face transformers' Trainer: Multi30k De-En, a small
Marian transformer built from a config (nothing downloaded), a sentencepiece vocabulary trained here on the
training text, beam search, tokenized BLEU and sacreBLEU with its signature. A few minutes on one CPU thread
with the defaults (a 4,000-pair training subsample, 4 epochs, 500 test sentences).

    python examples/hf_multi30k.py --raw-dir DIR [--train-size 4000] [--epochs 4] [--json out.json]

DIR holds Multi30k's raw text, one sentence per line, line-aligned: train.de(.gz), train.en(.gz), and the
--valid and --test splits (val, test_2016_flickr). The two runs differ in one option of the same loss:
    CE: compute_loss_func(label_smoothing=0.1, bonus_rho=0.0)        (= the model's own loss, smoothed)
    EL: compute_loss_func(label_smoothing=0.1, log_end=0.5, bonus_label_smoothing=0.1)   (the paper's MT setting)
Tokenized BLEU: BLEU of Moses-tokenized hypotheses against Moses-tokenized references (sacremoses,
case-sensitive, no further tokenization); sacreBLEU: the detokenized text against the raw references.
"""
import argparse
import gzip
import io
import json
import os
import sys
import tempfile
import time

import torch

LOSSES = {
    "CE": dict(label_smoothing=0.1, bonus_rho=0.0),
    "EL": dict(label_smoothing=0.1, log_end=0.5, bonus_label_smoothing=0.1),
}
PAD, EOS, UNK = 0, 1, 2  # sentencepiece ids; the decoder starts from PAD, as Marian's does


def fail(message):
    sys.exit(f"hf_multi30k: {message}")


def read_lines(raw_dir, split, lang):
    for name in (f"{split}.{lang}.gz", f"{split}.{lang}"):
        path = os.path.join(raw_dir, name)
        if os.path.exists(path):
            with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else
                  open(path, encoding="utf-8")) as f:
                return [line.rstrip("\n") for line in f]
    fail(f"--raw-dir {raw_dir!r} has no {split}.{lang}.gz or {split}.{lang}")


def read_pairs(raw_dir, split, src, tgt, limit=None):
    """(source, target) sentence pairs of a split, the first `limit` of them."""
    source, target = read_lines(raw_dir, split, src), read_lines(raw_dir, split, tgt)
    if len(source) != len(target):
        fail(f"{split}.{src} has {len(source)} lines but {split}.{tgt} has {len(target)}: they must be line-aligned")
    return list(zip(source, target))[:limit]


def train_sentencepiece(pairs, vocab_size):
    """A joint unigram sentencepiece model of both sides of the training pairs (in memory)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s for pair in pairs for s in pair]), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode(sp, pairs, max_len):
    """Examples for Trainer: source ids and target ids, each ending in EOS, truncated to max_len tokens."""
    def ids(text):
        return sp.encode(text)[: max_len - 1] + [EOS]

    return [{"input_ids": ids(s), "labels": ids(t)} for s, t in pairs]


def pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def collate(examples):
    """Right-padded batch: encoder ids and mask, labels (-100 on padding), decoder inputs (labels shifted
    right, starting from PAD). compute_loss_func takes the labels away from the model, so the decoder
    inputs are given here rather than made by the model from its labels."""
    src, tgt = [e["input_ids"] for e in examples], [e["labels"] for e in examples]
    input_ids, labels = pad(src, PAD), pad(tgt, -100)
    decoder_input_ids = pad([[PAD] + t[:-1] for t in tgt], PAD)
    return {"input_ids": input_ids, "attention_mask": input_ids.ne(PAD).long(),
            "decoder_input_ids": decoder_input_ids, "labels": labels}


def build_model(vocab_size, args):
    import transformers

    config = transformers.MarianConfig(
        vocab_size=vocab_size, decoder_vocab_size=vocab_size, d_model=args.d_model, encoder_layers=args.layers,
        decoder_layers=args.layers, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=4 * args.d_model, decoder_ffn_dim=4 * args.d_model, dropout=args.dropout,
        attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=args.max_len + 2,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, forced_eos_token_id=EOS,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    return transformers.MarianMTModel(config)


def translate(model, sp, sources, args):
    model.eval()
    hypotheses = []
    with torch.no_grad():
        for i in range(0, len(sources), args.eval_batch):
            input_ids = pad([e["input_ids"] for e in encode(sp, [(s, "") for s in sources[i: i + args.eval_batch]],
                                                            args.max_len)], PAD)
            out = model.generate(input_ids=input_ids, attention_mask=input_ids.ne(PAD).long(),
                                 num_beams=args.beam, max_new_tokens=args.max_len, do_sample=False)
            hypotheses += [sp.decode([t for t in row.tolist() if t not in (PAD, EOS)]) for row in out]
    return hypotheses


def bleu(hypotheses, references, lang):
    """(tokenized BLEU, sacreBLEU, sacreBLEU's signature); see the module docstring."""
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesTokenizer

    mt = MosesTokenizer(lang=lang)
    tok = lambda texts: [mt.tokenize(t, escape=False, return_str=True) for t in texts]  # noqa: E731
    tokenized = BLEU(tokenize="none", force=True).corpus_score(tok(hypotheses), [tok(references)]).score
    metric = BLEU()
    sacre = metric.corpus_score(hypotheses, [references]).score
    return round(tokenized, 2), round(sacre, 2), str(metric.get_signature())


def run(loss_name, data, sp, args, work_dir):
    import transformers

    from el_fairseq.hf import compute_loss_func

    train, valid, test = data
    transformers.set_seed(args.seed)
    model = build_model(len(sp), args)
    targs = transformers.TrainingArguments(
        output_dir=os.path.join(work_dir, loss_name), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch, num_train_epochs=args.epochs, learning_rate=args.lr,
        lr_scheduler_type="inverse_sqrt", warmup_steps=args.warmup, adam_beta2=0.98, weight_decay=1e-4,
        max_grad_norm=1.0, seed=args.seed, use_cpu=True, report_to="none", save_strategy="no",
        eval_strategy="no", logging_strategy="epoch", disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=encode(sp, train, args.max_len),
                                   data_collator=collate, compute_loss_func=compute_loss_func(**LOSSES[loss_name]))
    start = time.time()
    result = trainer.train()
    train_s = time.time() - start
    # The same yardstick for both runs: the validation cross-entropy (nats per target token, no smoothing).
    trainer.compute_loss_func = compute_loss_func(bonus_rho=0.0)
    valid_ce = trainer.evaluate(encode(sp, valid, args.max_len))["eval_loss"]
    start = time.time()
    hypotheses = translate(model, sp, [s for s, _ in test], args)
    tokenized, sacre, signature = bleu(hypotheses, [t for _, t in test], args.tgt)
    return {"loss": loss_name, "options": LOSSES[loss_name], "train_seconds": round(train_s, 1),
            "updates": result.global_step, "train_loss": round(result.training_loss, 4),
            "valid_ce": round(valid_ce, 4), "decode_seconds": round(time.time() - start, 1),
            "tokenized_bleu": tokenized, "sacrebleu": sacre, "signature": signature,
            "examples": hypotheses[:3]}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", required=True, help="Multi30k raw text (train/valid/test .SRC/.TGT[.gz])")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--valid", default="val", help="validation split (default val)")
    p.add_argument("--test", default="test_2016_flickr", help="test split (default test_2016_flickr)")
    p.add_argument("--train-size", type=int, default=4000, help="first N training pairs (default 4000; 0: all)")
    p.add_argument("--test-size", type=int, default=500, help="first N test sentences (default 500; 0: all)")
    p.add_argument("--valid-size", type=int, default=500, help="first N validation pairs (default 500; 0: all)")
    p.add_argument("--losses", default="CE,EL", help="comma-separated, of CE, EL (default CE,EL)")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=64, help="tokens per sentence, EOS included")
    p.add_argument("--epochs", type=float, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    names = args.losses.split(",")
    bad = [n for n in names if n not in LOSSES]
    if bad or not names:
        p.error(f"--losses {args.losses!r}: allowed a comma-separated list of {', '.join(LOSSES)}")
    for name in ("train_size", "test_size", "valid_size"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0 (0: all)")
    if not os.path.isdir(args.raw_dir):
        p.error(f"--raw-dir {args.raw_dir!r} is not a directory")
    args.losses = names
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    size = lambda n: n or None  # noqa: E731  (0: all)
    train = read_pairs(args.raw_dir, "train", args.src, args.tgt, size(args.train_size))
    valid = read_pairs(args.raw_dir, args.valid, args.src, args.tgt, size(args.valid_size))
    test = read_pairs(args.raw_dir, args.test, args.src, args.tgt, size(args.test_size))
    sp = train_sentencepiece(train, args.vocab_size)
    print(f"{args.src}-{args.tgt}: {len(train)} training pairs, {len(valid)} validation, {len(test)} test "
          f"({args.test}); joint sentencepiece vocabulary {len(sp)}; {args.threads} thread(s)", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as work_dir:
        for name in args.losses:
            r = run(name, (train, valid, test), sp, args, work_dir)
            results.append(r)
            print(f"{name}: {r['updates']} updates in {r['train_seconds']:.0f} s, train loss {r['train_loss']:.3f}, "
                  f"valid CE {r['valid_ce']:.3f}; tokenized BLEU {r['tokenized_bleu']:.2f}, "
                  f"sacreBLEU {r['sacrebleu']:.2f} ({r['decode_seconds']:.0f} s to translate)", flush=True)
    print(f"sacreBLEU signature: {results[0]['signature']}")
    if args.json:
        import transformers

        report = {"command": " ".join(["python", "examples/hf_multi30k.py"] + (argv or sys.argv[1:])),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "transformers": transformers.__version__, "torch": torch.__version__,
                  "train_pairs": len(train), "test_sentences": len(test), "vocab": len(sp),
                  "args": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        os.replace(tmp, args.json)  # no half-written file that looks done
    return results


if __name__ == "__main__":
    main()

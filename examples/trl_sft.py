"""NLL vs DFT vs EL in TRL's SFTTrainer: a small Llama fine-tuned to translate Multi30k De-En as a
prompt-completion task (prompt: the German sentence, completion: the English one, loss on the completion
only), three loss types x several seeds, sacreBLEU of greedy completions with the two-level interval over
seeds and sentences, and each loss's training tokens/s. Nothing is downloaded: the tokenizer and the base
model are trained here first.

    python examples/trl_sft.py --raw-dir DIR --out OUT [--seeds 1,2,3] [--losses nll,dft,el]

About 18 minutes on one CPU thread with the defaults (a 2.2M-parameter Llama, 12,000 pairs of pretraining,
3 losses x 3 seeds of 3,000 pairs, 1,000 test sentences); docs/RESULTS.md has the figures.

DIR holds Multi30k's raw text, one sentence per line, line-aligned: train.de(.gz), train.en(.gz) and the
--test split (test_2016_flickr). The steps, each saved under OUT so that a rerun skips what is done:
1. base/: a unigram (sentencepiece) tokenizer of --vocab-size trained on both sides of the training pairs
   used below, and a Llama built from a config and pretrained briefly on the task's text (the --base-size
   training pairs after the first --train-size, as plain running text "German<2en>English</s>", loss on
   every token), so that fine-tuning starts from a model that already gives the English tokens some
   probability, as a downloaded base model would (DFT rescales each token's gradient by that probability).
   base/test.json: the base model's test NLL and sacreBLEU before fine-tuning, measured as the runs are.
2. runs/{loss}_seed{N}.json and .hyp: SFTTrainer on the first --train-size pairs as a prompt-completion
   dataset {"prompt": German + "<2en>", "completion": English} (TRL appends "</s>" and masks the prompt), the
   same base model for every run (the seed sets the data order); then greedy completions of the --test
   prompts (batched, KV cache), scored with sacreBLEU against the raw references.
   nll: SFTConfig(loss_type="nll"), TRL's own loss.
   dft: SFTConfig(loss_type="dft"), TRL's own: each completion token's NLL weighted by its detached p_y.
   el:  EncouragingSFTTrainer(el_options=EL_OPTIONS) (el_fairseq.hf.trl, the same SFTConfig, loss_type
        "nll"): el_fairseq's encouraging loss, per completion token -log p_y + rho log(1 - p_y), the bonus
        continued along its tangent beyond p_y = log_end, summed and divided by TRL's token count.
3. speed.json: training tokens/s of the losses side by side (`speed`: a few steps of each, rotated, repeated).
4. report.json: per loss the sacreBLEU of each seed, their mean and standard deviation, tokens/s; Δ of every
   pair of losses over the seeds with el_fairseq.pipeline.significance.hierarchical_bootstrap (seeds and
   test sentences resampled; 95% interval, two-sided p).
Tokens/s: TRL's `num_tokens` (the tokens of every training sequence, prompt and completion, no padding)
over Trainer's train_runtime; on a shared machine only runs side by side compare.
"""
import argparse
import gzip
import json
import os
import statistics
import sys
import time

import torch

LOSSES = ("nll", "dft", "el")
# The library's (and the paper's) default end of the log bonus, rho = 1, and no smoothing: TRL's NLL and DFT
# carry none, so EL differs from NLL by the bonus alone.
EL_OPTIONS = {"log_end": 0.75, "bonus_rho": 1.0}
PAD, EOS, UNK, SEP = "<pad>", "</s>", "<unk>", "<2en>"  # SEP ends the prompt on a token boundary


def fail(message):
    sys.exit(f"trl_sft: {message}")


def read_lines(raw_dir, split, lang):
    for name in (f"{split}.{lang}.gz", f"{split}.{lang}"):
        path = os.path.join(raw_dir, name)
        if os.path.exists(path):
            with (gzip.open(path, "rt", encoding="utf-8") if name.endswith(".gz") else
                  open(path, encoding="utf-8")) as f:
                return [line.rstrip("\n") for line in f]
    fail(f"--raw-dir {raw_dir!r} has no {split}.{lang}.gz or {split}.{lang}")


def read_pairs(raw_dir, split, src, tgt):
    source, target = read_lines(raw_dir, split, src), read_lines(raw_dir, split, tgt)
    if len(source) != len(target):
        fail(f"{split}.{src} has {len(source)} lines but {split}.{tgt} has {len(target)}: they must be line-aligned")
    return list(zip(source, target))


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)  # no half-written file that looks done


def write_lines(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line.replace("\n", " ") + "\n" for line in lines)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- base model

def train_tokenizer(texts, vocab_size):
    """A unigram tokenizer of `texts` set up as sentencepiece's (its NMT-NFKC normalisation, "▁" for spaces,
    prepended to every word), as a transformers tokenizer with PAD, EOS, UNK and the prompt separator SEP as
    special tokens (never split, never made from text pieces)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK, SEP],
                                                           unk_token=UNK, show_progress=False))
    # The trainer finds the same pieces every time, but numbers them in no fixed order: their scores differ in
    # the last digits (sums in no fixed order), and the characters it adds last to cover the text get scores
    # by the order it met them in. Rounded, those characters ordered by code point below every other piece,
    # and all renumbered (special tokens first, then by score and piece), the same text always makes the same
    # tokenizer and so the same model.
    pieces = [(piece, round(score, 8)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]
              if piece not in (PAD, EOS, UNK, SEP)]
    floor = min(score for piece, score in pieces if len(piece) > 1)
    added = sorted(piece for piece, score in pieces if len(piece) == 1 and score < floor)
    pieces = [p for p in pieces if p[0] not in added] + [(c, floor - 1.0 - 1e-3 * i) for i, c in enumerate(added)]
    specials = [(t, 0.0) for t in (PAD, EOS, UNK, SEP)]
    rest = sorted(pieces, key=lambda p: (-p[1], p[0]))
    tok.model = models.Unigram(specials + rest, unk_id=2, byte_fallback=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                                extra_special_tokens=[SEP])


def build_model(tokenizer, args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=3 * args.hidden, max_position_embeddings=2 * args.max_len,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def sft_config(args, out_dir, **overrides):
    """SFTConfig for a CPU run: the trainer's defaults except what a one-thread CPU run needs (float32, no
    gradient checkpointing, no saving, no reporting) and the schedule below; `overrides` last."""
    from trl import SFTConfig

    return SFTConfig(**{"output_dir": out_dir, "per_device_train_batch_size": args.batch_size, "weight_decay": 0.0,
                        "lr_scheduler_type": "cosine", "warmup_steps": args.warmup, "max_length": args.max_len,
                        "bf16": False, "gradient_checkpointing": False, "use_cpu": True, "report_to": "none",
                        "save_strategy": "no", "eval_strategy": "no", "logging_steps": args.log_every,
                        "disable_tqdm": True, "dataloader_num_workers": 0, "dataset_num_proc": None, **overrides})


def progress(label):
    """A TrainerCallback printing one line per Trainer log: step, loss, token accuracy, elapsed time."""
    import transformers

    class _Progress(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"  {label}: step {state.global_step}/{state.max_steps}, loss {logs['loss']:.4f}, "
                      f"token accuracy {logs.get('mean_token_accuracy', float('nan')):.3f}, "
                      f"{time.time() - self.start:.0f} s", flush=True)

    return _Progress()


def trained_tokens(trainer):
    """TRL's `num_tokens` at the end of training: the tokens of every training sequence, padding left out."""
    counts = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    return int(counts[-1]) if counts else None


def loss_curve(trainer):
    """[[step, training loss averaged since the previous log], ...] from Trainer's log history."""
    return [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]


def pretrain_base(pairs, args, base_dir):
    """Tokenizer and base model (step 1 of the module docstring), saved in base_dir; returns its record."""
    import datasets
    import transformers
    from trl import SFTTrainer

    train, base = pairs[: args.train_size], pairs[args.train_size: args.train_size + args.base_size]
    tokenizer = train_tokenizer([s for pair in train + base for s in pair], args.vocab_size)
    transformers.set_seed(0)
    model = build_model(tokenizer, args)
    text = datasets.Dataset.from_dict({"text": [f"{de}{SEP}{en}" for de, en in base]})
    config = sft_config(args, os.path.join(base_dir, "trainer"), learning_rate=args.base_lr,
                        num_train_epochs=args.base_epochs, seed=0, loss_type="nll")
    trainer = SFTTrainer(model=model, args=config, train_dataset=text, processing_class=tokenizer,
                         callbacks=[progress("base")])
    trainer.remove_callback(transformers.PrinterCallback)  # our progress lines instead of its log dicts
    result = trainer.train()
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    record = {"made_by": base_args(args), "pairs": len(base), "vocab": len(tokenizer),
              "parameters": sum(p.numel() for p in model.parameters()),
              "updates": result.global_step, "train_loss": round(result.training_loss, 4),
              "train_seconds": round(result.metrics["train_runtime"], 1),
              "train_tokens": trained_tokens(trainer), "loss_curve": loss_curve(trainer)}
    write_json(os.path.join(base_dir, "base.json"), record)
    return record


BASE_ARGS = ("raw_dir", "src", "tgt", "train_size", "base_size", "vocab_size", "hidden", "layers", "max_len",
             "base_epochs", "base_lr", "batch_size", "warmup")


def base_args(args):
    """The arguments that make the base model (what a rerun must repeat to reuse it)."""
    return {name: getattr(args, name) for name in BASE_ARGS}


def load_base(base_dir):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return tokenizer, model


# ---------------------------------------------------------------------------------------------- fine-tuning

def make_trainer(loss, model, tokenizer, dataset, args, seed, out_dir, label=None, **config):
    """The trainer for `loss` (module docstring) and the options that define it. config: SFTConfig overrides."""
    from trl import SFTTrainer

    config = sft_config(args, out_dir, **{"learning_rate": args.lr, "num_train_epochs": args.epochs, "seed": seed,
                                          "completion_only_loss": True, **config,
                                          "loss_type": "dft" if loss == "dft" else "nll"})
    common = dict(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                  callbacks=[progress(label or f"{loss} seed {seed}")])
    if loss != "el":
        trainer, options = SFTTrainer(**common), {"trainer": "SFTTrainer", "loss_type": loss}
    else:
        from el_fairseq.hf.trl import EncouragingSFTTrainer

        trainer = EncouragingSFTTrainer(**common, el_options=dict(EL_OPTIONS))
        options = {"trainer": "EncouragingSFTTrainer", "el_options": EL_OPTIONS}
    import transformers

    trainer.remove_callback(transformers.PrinterCallback)  # our progress lines instead of its log dicts
    return trainer, options


def prompt_dataset(pairs):
    import datasets

    return datasets.Dataset.from_dict({"prompt": [de + SEP for de, _ in pairs], "completion": [en for _, en in pairs]})


def greedy(model, tokenizer, sources, args):
    """Greedy completions of the prompts of `sources`, in their order: batches of prompts of similar length,
    left-padded, KV cache, at most --max-new-tokens each, stopped at EOS."""
    model.eval()
    prompts = [tokenizer(s + SEP, add_special_tokens=False)["input_ids"][: args.max_len] for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), args.eval_batch):
            batch = order[start: start + args.eval_batch]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in batch])
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch])
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(batch, gen[:, width:].tolist()):
                out[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return out


def sacrebleu(hypotheses, references):
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    return round(metric.corpus_score(hypotheses, [references]).score, 2), str(metric.get_signature())


def completion_nll(model, tokenizer, pairs, args):
    """Mean NLL (nats per completion token, EOS included) of the references given their prompts: one yardstick
    for every loss."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), args.eval_batch):
            rows, labels = [], []
            for de, en in pairs[start: start + args.eval_batch]:
                p = tokenizer(de + SEP, add_special_tokens=False)["input_ids"]
                c = tokenizer(en + EOS, add_special_tokens=False)["input_ids"]
                ids = (p + c)[: args.max_len]
                rows.append(ids)
                labels.append(([-100] * len(p) + c)[: args.max_len])
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            lab = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits
            target = lab[:, 1:]
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int(target.ne(-100).sum())
    return total / max(count, 1)


def run(loss, seed, pairs, test, args, out):
    import transformers

    base_dir = os.path.join(out, "base")
    tokenizer, model = load_base(base_dir)
    transformers.set_seed(seed)
    trainer, options = make_trainer(loss, model, tokenizer, prompt_dataset(pairs[: args.train_size]), args, seed,
                                    os.path.join(out, "trainer", f"{loss}_seed{seed}"))
    result = trainer.train()
    tokens = trained_tokens(trainer)
    train_s = result.metrics["train_runtime"]
    start = time.time()
    hypotheses = greedy(model, tokenizer, [s for s, _ in test], args)
    decode_s = time.time() - start
    score, signature = sacrebleu(hypotheses, [t for _, t in test])
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    return {"loss": loss, "seed": seed, "options": options, "updates": result.global_step,
            "train_loss": round(result.training_loss, 4), "train_seconds": round(train_s, 1),
            "train_tokens": tokens, "tokens_per_s": round(tokens / train_s, 1) if tokens else None,
            "last_log": {k: last[k] for k in ("loss", "entropy", "mean_token_accuracy") if k in last},
            "loss_curve": loss_curve(trainer),
            "test_nll": round(completion_nll(model, tokenizer, test, args), 4),
            "decode_seconds": round(decode_s, 1), "sacrebleu": score, "signature": signature,
            "examples": hypotheses[:3]}, hypotheses


def evaluate_base(base_dir, test, args):
    """The base model before fine-tuning, measured as the runs are: the yardstick that fine-tuning moves."""
    tokenizer, model = load_base(base_dir)
    hypotheses = greedy(model, tokenizer, [s for s, _ in test], args)
    score, signature = sacrebleu(hypotheses, [t for _, t in test])
    return {"test_nll": round(completion_nll(model, tokenizer, test, args), 4), "sacrebleu": score,
            "signature": signature, "examples": hypotheses[:3]}


def speed(losses, pairs, args, out):
    """Training tokens/s of every loss side by side: --speed-rounds rounds, each training every loss for
    --speed-steps steps from the base model on the same batches (seed 1), the order of the losses rotated from
    round to round; per loss the median over rounds, and per round each loss's tokens/s over NLL's."""
    base_dir = os.path.join(out, "base")
    rows = []
    for round_ in range(args.speed_rounds):
        for loss in losses[round_ % len(losses):] + losses[: round_ % len(losses)]:
            tokenizer, model = load_base(base_dir)
            trainer, _ = make_trainer(loss, model, tokenizer, prompt_dataset(pairs[: args.train_size]), args, 1,
                                      os.path.join(out, "trainer", f"speed_{loss}"), label=f"speed {loss}",
                                      max_steps=args.speed_steps, logging_steps=args.speed_steps)
            seconds = trainer.train().metrics["train_runtime"]
            tokens = trained_tokens(trainer)
            rows.append({"round": round_ + 1, "loss": loss, "tokens": tokens, "seconds": round(seconds, 2),
                         "tokens_per_s": round(tokens / seconds, 1)})
            print(f"speed round {round_ + 1}: {loss} {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    median = {loss: statistics.median(r["tokens_per_s"] for r in rows if r["loss"] == loss) for loss in losses}
    ratios = {}
    if "nll" in losses:
        for loss in losses:
            ratios[f"{loss}/nll"] = [round(a["tokens_per_s"] / b["tokens_per_s"], 3)
                                     for a in rows if a["loss"] == loss
                                     for b in rows if b["loss"] == "nll" and b["round"] == a["round"]]
    return {"steps": args.speed_steps, "rounds": args.speed_rounds, "runs": rows,
            "median_tokens_per_s": {k: round(v, 1) for k, v in median.items()}, "ratio_per_round": ratios,
            "median_ratio": {k: round(statistics.median(v), 3) for k, v in ratios.items()}}


# ---------------------------------------------------------------------------------------------- report

def report(results, test, hyp_dir, samples):
    """Per loss: sacreBLEU per seed, mean, standard deviation, tokens/s; Δ of every pair of losses over the seeds
    both have, with the two-level bootstrap (significance.hierarchical_bootstrap)."""
    from sacrebleu.metrics import BLEU

    from el_fairseq.pipeline import significance

    metric, references = BLEU(), [t for _, t in test]
    stats, per_loss = {}, {}
    for r in results:
        with open(os.path.join(hyp_dir, f"{r['loss']}_seed{r['seed']}.hyp"), encoding="utf-8") as f:
            hyps = f.read().split("\n")[:-1]
        stats[(r["loss"], r["seed"])] = significance.sentence_stats(metric, hyps, references)
        per_loss.setdefault(r["loss"], {})[r["seed"]] = r
    losses = [loss for loss in LOSSES if loss in per_loss]
    summary = {}
    for loss in losses:
        runs = [per_loss[loss][s] for s in sorted(per_loss[loss])]
        bleu = [r["sacrebleu"] for r in runs]
        rates = [r["tokens_per_s"] for r in runs if r["tokens_per_s"]]
        summary[loss] = {"seeds": sorted(per_loss[loss]), "sacrebleu": bleu, "mean": round(statistics.mean(bleu), 2),
                         "sd": round(statistics.stdev(bleu), 2) if len(bleu) > 1 else None, "tokens_per_s": rates,
                         "mean_tokens_per_s": round(statistics.mean(rates), 1) if rates else None,
                         "test_nll": [r["test_nll"] for r in runs]}
    deltas = {}
    for i, a in enumerate(losses):
        for b in losses[i + 1:]:
            seeds = sorted(set(per_loss[a]) & set(per_loss[b]))
            if not seeds:
                continue
            pairs = [(stats[(a, s)], stats[(b, s)]) for s in seeds]
            over = significance.hierarchical_bootstrap(metric, pairs, samples, significance.rng())
            deltas[f"{b}-{a}"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in over.items()}
            deltas[f"{b}-{a}"]["delta_ci95"] = [round(v, 3) for v in over["delta_ci95"]]
    return {"signature": str(metric.get_signature()), "test_sentences": len(references), "losses": summary,
            "deltas": deltas, "bootstrap": {"samples": samples, "rng_seed": significance.RNG_SEED,
                                            "method": "significance.hierarchical_bootstrap"}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", required=True, help="Multi30k raw text (train and --test .SRC/.TGT[.gz])")
    p.add_argument("--out", required=True, help="results folder (base/, runs/, report.json); a rerun resumes")
    p.add_argument("--src", default="de")
    p.add_argument("--tgt", default="en")
    p.add_argument("--test", default="test_2016_flickr", help="test split (default test_2016_flickr)")
    p.add_argument("--train-size", type=int, default=3000, help="first N training pairs to fine-tune on")
    p.add_argument("--base-size", type=int, default=12000,
                   help="the next N training pairs, the base model's pretraining text (0: all the rest)")
    p.add_argument("--test-size", type=int, default=0, help="first N test sentences (default 0: all)")
    p.add_argument("--losses", default="nll,dft,el", help="comma-separated, of nll, dft, el (el runs last)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated fine-tuning seeds (default 1,2,3)")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--max-len", type=int, default=96, help="tokens per training sequence, prompt included")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--base-epochs", type=float, default=1)
    p.add_argument("--base-lr", type=float, default=2e-3)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50, help="Trainer logging_steps (progress lines)")
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.add_argument("--speed-rounds", type=int, default=5, help="rounds of the side-by-side tokens/s (0: none)")
    p.add_argument("--speed-steps", type=int, default=20, help="training steps per loss and round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    names = args.losses.split(",")
    if not set(names) <= set(LOSSES):
        p.error(f"--losses {args.losses!r}: allowed a comma-separated list of {', '.join(LOSSES)}")
    args.losses = sorted(set(names), key=LOSSES.index)  # el last
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: allowed a comma-separated list of integers")
    for name in ("train_size", "test_size", "base_size", "speed_rounds", "speed_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    for name in ("train_size", "speed_steps"):
        if getattr(args, name) == 0:
            p.error(f"--{name.replace('_', '-')} 0: must be > 0")
    if not os.path.isdir(args.raw_dir):
        p.error(f"--raw-dir {args.raw_dir!r} is not a directory")
    return args


def quiet():
    """Progress lines of our own only: no progress bars from datasets and transformers, no Trainer log dicts."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs = read_pairs(args.raw_dir, "train", args.src, args.tgt)
    test = read_pairs(args.raw_dir, args.test, args.src, args.tgt)[: args.test_size or None]
    if args.base_size == 0:
        args.base_size = len(pairs) - args.train_size
    if args.train_size + args.base_size > len(pairs) or args.base_size <= 0:
        fail(f"--train-size {args.train_size} + --base-size {args.base_size}: the training split has "
             f"{len(pairs)} pairs; fine-tuning and base pairs must both fit in it")
    base_dir, run_dir = os.path.join(args.out, "base"), os.path.join(args.out, "runs")
    base = None
    if os.path.exists(os.path.join(base_dir, "base.json")):  # checked first: a mismatch fails at once
        with open(os.path.join(base_dir, "base.json"), encoding="utf-8") as f:
            base = json.load(f)
        differ = [f"--{k.replace('_', '-')} {v!r} (base: {base['made_by'].get(k)!r})"
                  for k, v in base_args(args).items() if base["made_by"].get(k) != v]
        if differ:
            fail(f"{base_dir} was made with other arguments: {'; '.join(differ)}; use another --out or the "
                 "same arguments")
    quiet()
    os.makedirs(run_dir, exist_ok=True)
    started = time.time()
    if base is not None:
        print(f"base model: {base_dir} (done)", flush=True)
    else:
        print(f"base model: pretraining on {args.base_size} pairs", flush=True)
        base = pretrain_base(pairs, args, base_dir)
    print(f"base model: {base['parameters']:,} parameters, vocabulary {base['vocab']}, {base['updates']} updates "
          f"in {base['train_seconds']:.0f} s, loss {base['train_loss']:.3f}", flush=True)
    base_eval_path = os.path.join(base_dir, "test.json")
    if not os.path.exists(base_eval_path):
        write_json(base_eval_path, evaluate_base(base_dir, test, args))
    with open(base_eval_path, encoding="utf-8") as f:
        base["test"] = json.load(f)
    print(f"base model, not fine-tuned: test NLL {base['test']['test_nll']:.3f}, sacreBLEU "
          f"{base['test']['sacrebleu']:.2f}", flush=True)
    results = []
    for loss in args.losses:
        for seed in args.seeds:
            path = os.path.join(run_dir, f"{loss}_seed{seed}")
            if os.path.exists(path + ".json"):
                with open(path + ".json", encoding="utf-8") as f:
                    results.append(json.load(f))
                print(f"{loss} seed {seed}: done (sacreBLEU {results[-1]['sacrebleu']:.2f})", flush=True)
                continue
            print(f"{loss} seed {seed}: fine-tuning on {args.train_size} pairs", flush=True)
            r, hypotheses = run(loss, seed, pairs, test, args, args.out)
            write_lines(path + ".hyp", hypotheses)
            write_json(path + ".json", r)  # last: the .hyp it names exists
            results.append(r)
            print(f"{loss} seed {seed}: {r['updates']} updates in {r['train_seconds']:.0f} s "
                  f"({r['tokens_per_s']:.0f} tokens/s), train loss {r['train_loss']:.3f}, test NLL "
                  f"{r['test_nll']:.3f}; sacreBLEU {r['sacrebleu']:.2f} ({r['decode_seconds']:.0f} s to decode)",
                  flush=True)
    speed_path = os.path.join(args.out, "speed.json")
    if os.path.exists(speed_path):
        with open(speed_path, encoding="utf-8") as f:
            side_by_side = json.load(f)
    elif args.speed_rounds:
        side_by_side = speed(args.losses, pairs, args, args.out)
        write_json(speed_path, side_by_side)
    else:
        side_by_side = None
    if side_by_side:
        print(f"tokens/s side by side (median of {side_by_side['rounds']} rounds): " + ", ".join(
            f"{k} {v:.0f}" for k, v in side_by_side["median_tokens_per_s"].items()) + "; over NLL's, per round: "
            + ", ".join(f"{k} {v:.3f}" for k, v in side_by_side["median_ratio"].items()), flush=True)
    summary = report(results, test, run_dir, args.bootstrap_samples)
    for loss, s in summary["losses"].items():
        sd = f" ± {s['sd']:.2f}" if s["sd"] is not None else ""
        print(f"{loss}: sacreBLEU {s['mean']:.2f}{sd} (seeds {s['seeds']}: {s['sacrebleu']}), "
              f"{s['mean_tokens_per_s']} tokens/s", flush=True)
    for name, d in summary["deltas"].items():
        print(f"{name}: Δ {d['delta']:+.2f} [{d['delta_ci95'][0]:+.2f}, {d['delta_ci95'][1]:+.2f}] over "
              f"{d['seeds']} seed(s) and the sentences, p = {d['p_value']:.3f} (two-sided)", flush=True)
    print(f"sacreBLEU signature: {summary['signature']}")
    import transformers
    import trl

    write_json(os.path.join(args.out, "report.json"), {
        "command": " ".join(["python", "examples/trl_sft.py"] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
        "transformers": transformers.__version__, "trl": trl.__version__, "threads": args.threads,
        "wall_seconds_this_invocation": round(time.time() - started, 1),
        "train_pairs": args.train_size, "base_pairs": args.base_size, "test": args.test,
        "args": {k: v for k, v in vars(args).items()}, "el_options": EL_OPTIONS, "base": base,
        "runs": results, "speed": side_by_side, **summary})
    return summary


if __name__ == "__main__":
    main()

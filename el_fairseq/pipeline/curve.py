"""BLEU against training time for one run: how a recipe's schedule is chosen.

    python -m el_fairseq.pipeline.curve SAVE_DIR DATA_BIN [--subset valid] [--remove-bpe '@@ '] [--cpu]
                                        [--out SAVE_DIR/curve.json]

Every epoch checkpoint SAVE_DIR/checkpointN.pt (fairseq keeps them all unless --keep-last-epochs
is positive) is decoded on SUBSET with beam 5 and scored with fairseq's tokenized BLEU; beside it
stand the epoch's updates, validation NLL and the run's wall clock at the end of that epoch, read
from fairseq's json log SAVE_DIR/train.log (written by el_fairseq.pipeline.train). The subset is
the validation set by default, so choosing a schedule never looks at a test set; the validation
set has no raw references, hence tokenized BLEU only (the paper's metric; the same for every row).
Writes a JSON file (via a temporary name) and prints a table as each checkpoint is scored.
"""
import argparse
import json
import os
import re
import sys

from .evaluate import generate, write_atomic
from .provenance import epoch_records, training_seconds

CHECKPOINT = re.compile(r"checkpoint(\d+)\.pt$")


def epoch_checkpoints(save_dir):
    """[(epoch, path)] of SAVE_DIR's checkpointN.pt, by epoch."""
    found = [(int(m.group(1)), os.path.join(save_dir, name))
             for name in os.listdir(save_dir) if (m := CHECKPOINT.match(name))]
    return sorted(found)


def curve(save_dir, data_bin, subset="valid", remove_bpe="@@ ", cpu=False, beam=5, on_row=None):
    """[{epoch, updates, wall_s, train_wall_s, valid_nll, bleu}] for every epoch checkpoint; wall_s is the
    run's wall clock at the end of the epoch (validation and saving included), train_wall_s the time
    spent in training steps up to then."""
    log = os.path.join(save_dir, "train.log")
    if not os.path.exists(log):
        raise FileNotFoundError(f"{log} not found: train with el_fairseq.pipeline.train, which writes it")
    checkpoints = epoch_checkpoints(save_dir)
    if not checkpoints:
        raise FileNotFoundError(f"{save_dir} has no checkpointN.pt: train with --keep-last-epochs 0 to keep them")
    train, valid = epoch_records(log, "train"), epoch_records(log, "valid")
    rows = []
    for epoch, path in checkpoints:
        if epoch not in train:
            raise ValueError(f"{log} has no end-of-epoch record for epoch {epoch} (of {path})")
        rec = train[epoch]
        _, _, _, bleu = generate(path, data_bin, subset, remove_bpe, cpu, beam)
        row = {"epoch": epoch, "updates": int(rec["train_num_updates"]), "wall_s": float(rec["train_wall"]),
               "train_wall_s": training_seconds(train, epoch),
               "valid_nll": float(valid[epoch]["valid_nll_loss"]) if epoch in valid else None,
               "bleu": bleu}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def format_row(row):
    nll = f"{row['valid_nll']:.3f}" if row["valid_nll"] is not None else "-"
    return (f"{row['epoch']:>5} {row['updates']:>7} {row['wall_s'] / 60:>8.1f} {row['train_wall_s'] / 60:>9.1f} "
            f"{nll:>9} {row['bleu']:>6.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_dir")
    parser.add_argument("data_bin")
    parser.add_argument("--subset", default="valid", help="fairseq subset to decode (default valid)")
    parser.add_argument("--remove-bpe", default="@@ ", help="'@@ ' (subword-nmt), sentencepiece, or '' for none")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--out", help="JSON output (default SAVE_DIR/curve.json)")
    args = parser.parse_args(argv)
    if args.beam < 1:
        parser.error(f"--beam {args.beam}: must be >= 1")
    print(f"{'epoch':>5} {'updates':>7} {'wall_min':>8} {'train_min':>9} {'valid_nll':>9} {'BLEU':>6}"
          f"   (tokenized BLEU on {args.subset})")
    try:
        rows = curve(args.save_dir, args.data_bin, args.subset, args.remove_bpe, args.cpu, args.beam,
                     on_row=lambda row: print(format_row(row), flush=True))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        sys.exit(f"curve: error: {err}")
    out = args.out or os.path.join(args.save_dir, "curve.json")
    write_atomic(out, json.dumps({"save_dir": os.path.abspath(args.save_dir), "data": os.path.abspath(args.data_bin),
                                  "subset": args.subset, "beam": args.beam, "metric": "tokenized BLEU (fairseq)",
                                  "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

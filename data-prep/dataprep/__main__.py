"""python -m dataprep iwslt14|iwslt17|multi30k [options]  (the data-prep/*.sh scripts call this)."""
import argparse
import os

from .common import PrepError, fail, log
from .corpora import prepare_iwslt14, prepare_iwslt17, prepare_multi30k


def positive(value):
    n = int(value)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: a positive integer")
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(prog="prepare", description=__doc__)
    sub = parser.add_subparsers(dest="corpus", required=True)
    for name, bpe_default in (("iwslt14", 10000), ("iwslt17", 16000)):
        p = sub.add_parser(name)
        p.add_argument("--archive", help="local official archive (default: download it)")
        p.add_argument("--bpe-size", type=positive, default=bpe_default)
    p = sub.add_parser("multi30k")
    p.add_argument("--src", default="de", help="de or fr (the target is en)")
    p.add_argument("--raw-dir", help="folder with train/val/test_2016_flickr .{de,en,fr}.gz (default: download)")
    p.add_argument("--bpe-size", type=positive, default=10000)
    for p in sub.choices.values():
        p.add_argument("--dest", default="data")
        p.add_argument("--workers", type=positive, default=min(2, os.cpu_count() or 1))
        p.add_argument("--force", action="store_true", help="redo finished stages")
    args = parser.parse_args(argv)
    try:
        if args.corpus == "iwslt14":
            counts, data_bin = prepare_iwslt14(args.archive, args.dest, args.bpe_size, args.workers, args.force)
        elif args.corpus == "iwslt17":
            counts, data_bin = prepare_iwslt17(args.archive, args.dest, args.bpe_size, args.workers, args.force)
        else:
            counts, data_bin = prepare_multi30k(args.src, args.raw_dir, args.dest, args.bpe_size, args.workers,
                                                args.force)
    except PrepError as err:
        fail(err)
    log(f"done: {data_bin}  (" + " / ".join(f"{split} {n:,}" for split, n in counts.items()) + ")")


if __name__ == "__main__":
    main()

"""`make demo`: the whole CE-vs-EL pipeline on CPU in minutes, no network.

Generates the toy parallel corpus (el_fairseq.pipeline.synthetic), binarises it with fairseq-preprocess,
then runs el_fairseq.pipeline.reproduce (train CE and EL per seed, average the last epoch checkpoints,
generate, score, report) into OUT (default results/demo): RESULTS.md, results.json, PNG plots.
"""
import argparse
import os
import time

from .reproduce import execute, parse_seeds, plan
from .synthetic import binarize, write_corpus


def prepare(out):
    data_bin = os.path.join(out, "data-bin")
    if os.path.exists(os.path.join(data_bin, "testsets.json")):
        print(f"[demo] data: {data_bin} exists, skipped")
        return data_bin
    raw = write_corpus(os.path.join(out, "raw"), sizes=(("train", 4000), ("valid", 200), ("test", 300)))
    print(f"[demo] data: generated 4000/200/300 sentence pairs in {raw}", flush=True)
    binarize(raw, data_bin, workers=2)
    return data_bin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/demo")
    parser.add_argument("--seeds", default="1-3")
    args, extra = parser.parse_known_args(argv)
    # Same seed, same machine, same thread count -> the same numbers, run after run (fairseq on the
    # CPU is deterministic then); a different thread count changes float reductions, so fix it.
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    start = time.time()
    data_bin = prepare(args.out)
    execute(plan("demo", parse_seeds(args.seeds), data_bin, args.out, cpu=True, extra=extra))
    print(f"[demo] done in {time.time() - start:.0f} s: {os.path.join(args.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()

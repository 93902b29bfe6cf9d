"""`make demo`: the whole CE-vs-EL pipeline on CPU in minutes, no network.

Generates the toy parallel corpus (el_fairseq.synthetic), binarises it with fairseq-preprocess,
then runs el_fairseq.reproduce (train CE and EL per seed, average the last epoch checkpoints,
generate, score, report) into OUT (default results/demo): RESULTS.md, results.json, PNG plots.
"""
import argparse
import os
import subprocess
import time

from .evaluate import fairseq_tool
from .reproduce import execute, parse_seeds, plan
from .synthetic import write_corpus


def prepare(out):
    data_bin = os.path.join(out, "data-bin")
    if os.path.exists(os.path.join(data_bin, "dict.tgt.txt")):
        print(f"[demo] data: {data_bin} exists, skipped")
        return data_bin
    raw = write_corpus(os.path.join(out, "raw"), sizes=(("train", 4000), ("valid", 200), ("test", 300)))
    print(f"[demo] data: generated 4000/200/300 sentence pairs in {raw}", flush=True)
    tmp = data_bin + ".tmp"
    subprocess.run(fairseq_tool("fairseq-preprocess") + [
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", os.path.join(raw, "train"),
        "--validpref", os.path.join(raw, "valid"), "--testpref", os.path.join(raw, "test"),
        "--destdir", tmp, "--workers", "2"], check=True, capture_output=True)
    os.replace(tmp, data_bin)
    return data_bin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/demo")
    parser.add_argument("--seeds", default="1-3")
    args, extra = parser.parse_known_args(argv)
    start = time.time()
    data_bin = prepare(args.out)
    execute(plan("demo", parse_seeds(args.seeds), data_bin, args.out, cpu=True, avg_last=5, extra=extra))
    print(f"[demo] done in {time.time() - start:.0f} s: {os.path.join(args.out, 'RESULTS.md')}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Margins, energy and p_y of checkpoints on a subset (teacher forcing); JSON and PNG histograms.

    python scripts/analyze_margins.py --path ce/avg.pt:CE,el/avg.pt:EL --data DATA_BIN [--subset test] --out DIR
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from el_fairseq.pipeline.analysis import analyze, parse_paths  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="CKPT[:LABEL][,CKPT2[:LABEL2]...]")
    parser.add_argument("--data", required=True, help="fairseq data-bin folder")
    parser.add_argument("--subset", default="test")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        parser.error(f"--data: no such folder {args.data}")
    try:
        paths = parse_paths(args.path)
    except FileNotFoundError as err:
        parser.error(str(err))
    result, pngs = analyze(paths, args.data, args.subset, args.out, cpu=args.cpu)
    for label, stats in result["checkpoints"].items():
        print(f"{label}: {stats['tokens']} tokens, margin {stats['margin']['mean']:.3f}, "
              f"energy {stats['energy']['mean']:.3f}, p_y {stats['p_y']['mean']:.3f}, "
              f"well-classified {stats['well_classified_pct']:.1f}%")
    print(f"wrote {os.path.join(args.out, 'margins.json')} and {len(pngs)} PNG histograms")


if __name__ == "__main__":
    main()

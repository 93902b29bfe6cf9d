"""Average fairseq checkpoints (the last N epoch or update checkpoints), like fairseq's
scripts/average_checkpoints.py, which the pip wheels do not ship; loads with torch >= 2.6 through
el_fairseq.safe_loading (weights_only, the globals fairseq checkpoints contain; EL_FAIRSEQ_TRUST_CHECKPOINT).

    el-fairseq-average-checkpoints --inputs RUN_DIR --num-epoch-checkpoints 5 --output avg.pt
    python -m el_fairseq.pipeline.checkpoints ...   (the same)
"""
import argparse
import collections
import os
import re
import sys

import torch

from .. import safe_loading


def last_checkpoints(folder, num, by="epoch"):
    """Paths of the last `num` checkpoint{E}.pt (by="epoch") or checkpoint_{E}_{U}.pt (by="update")."""
    pattern = re.compile(r"checkpoint(\d+)\.pt$" if by == "epoch" else r"checkpoint_\d+_(\d+)\.pt$")
    found = []
    for name in os.listdir(folder):
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    if len(found) < num:
        raise ValueError(f"{folder}: found {len(found)} {by} checkpoints, need {num}")
    return [path for _, path in sorted(found)[-num:]]


def average_checkpoints(paths):
    """A checkpoint state whose model parameters are the mean of those in `paths` (float32 sums)."""
    params = collections.OrderedDict()
    new_state = None
    for path in paths:
        state = safe_loading.load(path, map_location="cpu")
        if new_state is None:
            new_state = state
        model = state["model"]
        if params and set(model) != set(params):
            raise ValueError(f"{path}: its parameters differ from those of {paths[0]}")
        for key, value in model.items():
            value = value.float() if value.is_floating_point() else value
            params[key] = value.clone() if key not in params else params[key] + value
    for key, value in params.items():
        if value.is_floating_point():
            params[key] = value / len(paths)
        else:
            params[key] = torch.div(value, len(paths), rounding_mode="floor")
    new_state["model"] = params
    return new_state


def save_atomically(state, output):
    tmp = output + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, output)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Average fairseq checkpoints (parameters only).")
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="checkpoint files, or one folder with --num-epoch-checkpoints/--num-update-checkpoints")
    parser.add_argument("--output", required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--num-epoch-checkpoints", type=int)
    group.add_argument("--num-update-checkpoints", type=int)
    args = parser.parse_args(argv)
    try:
        if args.num_epoch_checkpoints or args.num_update_checkpoints:
            if len(args.inputs) != 1:
                parser.error(f"with --num-*-checkpoints, --inputs is one folder, got {len(args.inputs)} paths")
            if not os.path.isdir(args.inputs[0]):
                parser.error(f"--inputs {args.inputs[0]}: no such folder")
            by = "epoch" if args.num_epoch_checkpoints else "update"
            paths = last_checkpoints(args.inputs[0], args.num_epoch_checkpoints or args.num_update_checkpoints, by)
        else:
            paths = args.inputs
        for path in paths:
            if not os.path.isfile(path):
                parser.error(f"--inputs: no such checkpoint {path}")
        save_atomically(average_checkpoints(paths), args.output)
    except safe_loading.UntrustedCheckpointError as err:
        sys.exit(f"{parser.prog}: error: {err}")
    except ValueError as err:
        parser.error(str(err))
    print(f"averaged {len(paths)} checkpoints into {args.output}: " + " ".join(os.path.basename(p) for p in paths))


if __name__ == "__main__":
    main()

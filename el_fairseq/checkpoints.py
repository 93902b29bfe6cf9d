"""Average fairseq checkpoints (the last N epoch or update checkpoints), like fairseq's
scripts/average_checkpoints.py, which the pip wheels do not ship; loads with torch >= 2.6."""
import collections
import os
import re

import torch

from .compat import trusted_torch_load


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
        state = trusted_torch_load(path)
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


if __name__ == "__main__":
    from .cli import average_checkpoints as _cli

    _cli()

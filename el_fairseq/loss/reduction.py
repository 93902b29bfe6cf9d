"""torch's "mean" reduction, total / count, with a zero gradient where nothing was counted.

torch's cross-entropy over zero counted targets (all ignored, an empty batch) returns nan and leaves
every gradient zero: its backward writes only at counted targets. A plain `total / count` gives the
same nan but a gradient of 1 / 0 = inf for `total`, which times the zero gradients of the ignored
tokens is nan: one such micro-batch (a prompt-only batch in fine-tuning) and every parameter is nan
after the optimizer step. Here the quotient is taken only where count != 0 (the other branch of
`torch.where` carries no gradient), so the value is torch's and the gradient exactly zero. Plain
tensor ops, no device sync: differentiable twice, and traceable.
"""
import torch


def mean_over_count(total, count):
    """total / count (nan when count == 0), whose gradient w.r.t. total is 1 / count, or 0 when count == 0.
    count: a tensor or a number (a count of targets, a sum of class weights, Trainer's num_items_in_batch)."""
    count = torch.as_tensor(count, device=total.device)
    nothing = count == 0
    quotient = total / torch.where(nothing, torch.ones_like(count), count)
    return torch.where(nothing, torch.full_like(quotient, float("nan")), quotient)

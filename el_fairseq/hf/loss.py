"""`compute_loss_func` for transformers' Trainer: the encouraging loss of the model's logits.

    loss = sum_{t: label_t != -100} EL(z_t, label_t) / num_items_in_batch

num_items_in_batch is Trainer's count of labels != -100 over the whole accumulated batch (all
micro-batches of one optimizer step, all devices when `average_tokens_across_devices`), so the
gradient of a step does not depend on how it is split: Trainer divides neither this loss nor its
gradient by the accumulation steps. Without it (a direct call, or a Trainer that does not count) the
loss is the mean over the non-ignored labels, as in transformers' `fixed_cross_entropy`.
With `causal_lm=True` the logits at position t predict the label at t + 1 (labels shifted left, padded
with -100), as transformers' `ForCausalLMLoss`; with the bonus off (`bonus_rho=0`) the result is the
model's own loss.
"""
import inspect
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..loss.api import encouraging_loss
from ..loss.reduction import mean_over_count

IGNORE_INDEX = -100  # what Trainer counts in num_items_in_batch, and transformers' models ignore
# Set here, by the num_items_in_batch rule and Trainer's count, not by the user; the projection's arguments
# (encouraging_linear_loss) come from the model.
FIXED = ("input", "target", "reduction", "ignore_index", "linear_weight", "linear_bias")


def el_option_names(loss=encouraging_loss):
    """The keyword options of `loss` (encouraging_loss or encouraging_linear_loss) a Trainer loss can take."""
    return tuple(n for n in inspect.signature(loss).parameters if n not in FIXED)


def check_el_options(el_options, loss=encouraging_loss, probe=None):
    """One-line ValueError for an option `loss` does not take, one fixed here, or a bad value; `probe`: the
    positional arguments of a tiny call of `loss` that checks the values now, not at the first step."""
    probe = probe or (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    allowed = el_option_names(loss)
    for name in el_options:
        if name in ("reduction", "ignore_index"):
            raise ValueError(f"{name} is fixed in a Trainer loss: the sum over labels != {IGNORE_INDEX} divided by "
                             f"Trainer's num_items_in_batch (mask a label with {IGNORE_INDEX} to ignore it)")
        if name not in allowed:
            raise ValueError(f"{name!r} is not an option of {loss.__name__}: allowed {', '.join(allowed)}")
    # Tensor options (a class weight) need the real number of classes: checked at the first call.
    loss(*probe, **{k: v for k, v in el_options.items() if not torch.is_tensor(v)})


def shift_labels(labels):
    """Labels for the next-token prediction at each position: labels[:, 1:], padded with -100."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def normalise(loss_sum, num_items_in_batch, count):
    """Sum / num_items_in_batch (Trainer's rule), or / the batch's own count of targets without it. A
    divisor of 0 (nothing to count: every label -100) gives transformers' nan loss, with a zero gradient
    (reduction.mean_over_count): the optimizer step leaves the parameters as they are."""
    divisor = count if num_items_in_batch is None else num_items_in_batch
    return mean_over_count(loss_sum, divisor)


def trainer_loss(logits, labels, num_items_in_batch=None, *, causal_lm=False, **el_options):
    """The encouraging loss of `logits` (..., C) for `labels` (...) under Trainer's rule (module docstring)."""
    if labels is None:
        raise ValueError("labels is None: the encouraging loss needs the batch's labels (-100 where ignored)")
    if causal_lm:
        labels = shift_labels(labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}: "
                         f"expected {tuple(logits.shape[:-1])}")
    # float32 logits, as transformers' losses: a sum over many tokens in bf16 would lose its low digits.
    target = labels.reshape(-1).to(logits.device)
    loss_sum = encouraging_loss(logits.float().reshape(-1, logits.size(-1)), target, ignore_index=IGNORE_INDEX,
                                reduction="sum", **el_options)
    return normalise(loss_sum, num_items_in_batch, target.ne(IGNORE_INDEX).sum())


def model_logits(outputs):
    """The logits of a model's output (a ModelOutput, a dict, or a tuple led by the logits)."""
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]


def compute_loss_func(*, causal_lm=False, **el_options):
    """The function for `Trainer(compute_loss_func=...)`: the encouraging loss of the model's logits.

    causal_lm: True for decoder-only LMs whose labels are their input ids (logits at t predict label t + 1);
    False for seq2seq models (labels aligned with the decoder's logits) and classifiers.
    el_options: any option of `el_fairseq.encouraging_loss` (log_end, bonus, bonus_rho, bonus_label_smoothing,
    bonus_gamma, bonus_start, label_smoothing, weight, impl), checked now; reduction and ignore_index are
    fixed (the sum over labels != -100 over Trainer's num_items_in_batch; with a class `weight`, the sum of
    the weighted losses over that count, not torch's weighted mean, so that accumulation leaves it alone).
    """
    check_el_options(el_options)

    def encouraging_loss_func(outputs, labels, num_items_in_batch=None):
        return trainer_loss(model_logits(outputs), labels, num_items_in_batch, causal_lm=causal_lm, **el_options)

    return encouraging_loss_func

"""The encouraging loss for any PyTorch model, shaped like `torch.nn.functional.cross_entropy`.

    loss_i = CE_ls(z_i, y_i) + rho * [ (1 - eps_b) * b(p_y) + eps_b / C * sum_j b(p_j) ]

with CE_ls torch's label-smoothed cross-entropy, `(1 - eps) * -log p_y + eps / C * sum_j -log p_j`
(eps = `label_smoothing`, so that with the bonus off, `bonus_rho=0`, this *is* `F.cross_entropy`),
and b the bonus of el_fairseq/loss/bonus.py: log(1 - p) up to p = `log_end`, its tangent beyond.
The defaults are those of the authors' `EncouragingLoss.py` (log bonus, `log_end=0.75`, no bonus
smoothing, no label smoothing, mean over the targets), so replacing their module gives their numbers.

fairseq's criterion puts its smoothing mass eps on the other V - 1 classes instead, eps/(V-1) each.
Both are `w_nll * -log p_y + u * sum_j -log p_j` with u = (1 - w_nll) / V: torch's eps is fairseq's
eps * V / (V - 1) (`fairseq_epsilon`), so both conventions run through the same kernels.
"""
import re

import torch

from .bonus import BonusSpec, EncouragingLossOptionError
from .dispatch import IMPLS
from .dispatch import encouraging_loss as _per_token

REDUCTIONS = ("mean", "sum", "none")


def fairseq_epsilon(label_smoothing: float, num_classes: int) -> float:
    """fairseq's smoothing eps (mass off the target, eps/(C-1) per other class) that gives torch's
    `label_smoothing` (eps/C on every class, the target included)."""
    return label_smoothing * (num_classes - 1) / num_classes


def _python_names(err):
    # The shared option checks name the fairseq flags (--log-end); here the arguments are log_end.
    return ValueError(re.sub(r"--([a-z-]+)", lambda m: m.group(1).replace("-", "_"), str(err)))


def check_options(label_smoothing, reduction, impl):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not known: allowed {', '.join(REDUCTIONS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing {label_smoothing!r} is out of range: allowed 0 <= label_smoothing < 1")
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not known: allowed {', '.join(IMPLS)}")


def make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho) -> BonusSpec:
    try:
        return BonusSpec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    except EncouragingLossOptionError as err:
        raise _python_names(err) from None


def encouraging_loss(input, target, *, log_end=0.75, bonus="log", bonus_rho=1.0, bonus_label_smoothing=0.0,
                     bonus_gamma=1.0, bonus_start=0.0, label_smoothing=0.0, ignore_index=-100, reduction="mean",
                     impl="auto"):
    """The encouraging loss of logits `input` (N, C) or (N, C, d1, ...) and class indices `target`
    (N) or (N, d1, ...), as `torch.nn.functional.cross_entropy` takes them.

    log_end: LE in (0, 1]; the log bonus continues along its tangent beyond p = LE (1: plain log bonus).
    bonus: "log" (log(1 - p)), "power" (-p^gamma, gamma = bonus_gamma >= 1), "cosine" (cos(pi p) - 1).
    bonus_rho: weight of the bonus (>= 0; 0 = F.cross_entropy exactly).
    bonus_label_smoothing: eps_b in [0, 1), the share of the bonus spread over all classes.
    bonus_start: s in [0, 1); the bonus counts from p = s (b(p) - b(s) above, 0 below).
    label_smoothing, ignore_index, reduction ("mean" over non-ignored targets, "sum", "none"): as in torch.
    impl: "auto" (the fused native kernel for float32 CPU logits, Triton for CUDA logits, fused torch
    ops elsewhere), "native", "triton", "chunked" or "reference" (plain torch, autograd).
    A value out of range raises ValueError naming it.
    """
    check_options(label_smoothing, reduction, impl)
    spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    return _loss(input, target, spec, label_smoothing, ignore_index, reduction, impl)


def _loss(input, target, spec, label_smoothing, ignore_index, reduction, impl):
    if input.dim() < 2:
        raise ValueError(f"input must be (N, C) or (N, C, d1, ...), got shape {tuple(input.shape)}")
    num_classes = input.size(1)
    expected = (input.size(0), *input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)}: "
                         f"expected {expected}")
    logits = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, num_classes)
    flat = target.reshape(-1)
    kept = flat.ne(ignore_index)
    bad = flat[kept]
    if bad.numel() and (int(bad.min()) < 0 or int(bad.max()) >= num_classes):
        raise ValueError(f"target values must be in [0, {num_classes}) or ignore_index {ignore_index}, "
                         f"got {int(bad.min())}..{int(bad.max())}")
    loss, _ = _per_token(logits, flat, fairseq_epsilon(label_smoothing, num_classes), spec,
                         ignore_index=ignore_index, reduce=False, impl=impl)
    loss = loss.to(input.dtype) if input.dtype in (torch.float16, torch.bfloat16) else loss
    if reduction == "none":
        return loss.reshape(target.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / kept.sum()  # like torch: the mean over non-ignored targets (nan if none)


class EncouragingLoss(torch.nn.Module):
    """`nn.CrossEntropyLoss`-like module of `encouraging_loss` (see there for every argument).

    Defaults of the authors' EncouragingLoss.py: log bonus, log_end=0.75, reduction="mean".
        criterion = EncouragingLoss()            # or EncouragingLoss(log_end=0.5, label_smoothing=0.1)
        loss = criterion(model(x), y)
    """

    def __init__(self, log_end=0.75, reduction="mean", *, bonus="log", bonus_rho=1.0, bonus_label_smoothing=0.0,
                 bonus_gamma=1.0, bonus_start=0.0, label_smoothing=0.0, ignore_index=-100, impl="auto"):
        super().__init__()
        check_options(label_smoothing, reduction, impl)
        self.spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
        self.label_smoothing, self.ignore_index, self.reduction, self.impl = label_smoothing, ignore_index, reduction, impl

    def forward(self, input, target):
        return _loss(input, target, self.spec, self.label_smoothing, self.ignore_index, self.reduction, self.impl)

    def extra_repr(self):
        s = self.spec
        return (f"bonus={s.kind!r}, log_end={s.log_end}, bonus_rho={s.rho}, bonus_label_smoothing={s.epsilon}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, impl={self.impl!r}")

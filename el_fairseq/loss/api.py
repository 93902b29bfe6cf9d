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
import importlib
import operator
import re
import sys

import torch
import torch.nn.functional as F

from . import autocast, ops
from .bonus import BonusSpec, EncouragingLossOptionError
from .chunked import compute_dtype
from .dispatch import IMPLS
from .dispatch import encouraging_loss as _per_token
from .reduction import mean_over_count
from .reference import class_weighted_loss

REDUCTIONS = ("mean", "sum", "none")


class TorchRangeError(ValueError, RuntimeError):
    """A value torch's cross-entropy refuses with RuntimeError: a ValueError here (as every bad option of
    this package), and a RuntimeError, so that code written for torch catches it too."""


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
    if not 0.0 <= label_smoothing <= 1.0:  # torch's range, and torch's exception type too (TorchRangeError)
        raise TorchRangeError(f"label_smoothing {label_smoothing!r} is out of range: allowed 0 <= label_smoothing <= 1")
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} is not known: allowed {', '.join(IMPLS)}")


def make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho) -> BonusSpec:
    try:
        return BonusSpec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    except EncouragingLossOptionError as err:
        raise _python_names(err) from None


def encouraging_loss(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                     log_end=0.75, bonus="log", bonus_rho=1.0, bonus_label_smoothing=0.0, bonus_gamma=1.0,
                     bonus_start=0.0, impl="auto"):
    """The encouraging loss of logits `input` (N, C) or (N, C, d1, ...) (or (C,) unbatched), with `target`
    class indices (N) or (N, d1, ...) (or ()), or class probabilities shaped like `input`: `torch.nn.functional.cross_entropy`'s
    arguments in its order (without its deprecated size_average and reduce), then the EL options by keyword.

    weight (C,): per-class weights w, as torch applies them. With t the target's one-hot (or its probabilities),
    q = (1 - eps) t + eps / C (eps = label_smoothing) and qb = (1 - eps_b) t + eps_b / C (eps_b =
    bonus_label_smoothing), each target row costs

        loss = sum_j w_j [ q_j (-log p_j) + rho * qb_j * b(p_j) ]

    so the bonus is weighted per class exactly like torch's cross-entropy term (for an index y:
    (1 - eps_b) w_y b(p_y) + eps_b / C sum_j w_j b(p_j)). "mean" divides the summed loss by sum w_y over
    the non-ignored targets (their count without weight); for probability targets by the number of rows
    N * d1 * ..., as torch does (ignore_index does not apply to them: one >= 0 raises RuntimeError, as
    torch's does). A smoothed one-hot as a probability
    target is the paper's bonus smoothing.
    log_end: LE in (0, 1]; the log bonus continues along its tangent beyond p = LE (1: plain log bonus).
    bonus: "log" (log(1 - p)), "power" (-p^gamma, gamma = bonus_gamma >= 1), "cosine" (cos(pi p) - 1).
    bonus_rho: rho, the weight of the bonus (>= 0; 0 = F.cross_entropy exactly).
    bonus_label_smoothing: eps_b in [0, 1), the share of the bonus spread over all classes.
    bonus_start: s in [0, 1); the bonus counts from p = s (b(p) - b(s) above, 0 below).
    impl: "auto" (the fused native kernel for float32 CPU logits, Triton for CUDA logits, fused torch
    ops elsewhere; "reference" for float64 logits, probability targets and weights with label smoothing),
    "native", "triton", "chunked" (fused: loss and gradient in one pass, once differentiable, class
    indices; weight only without label smoothing) or "reference" (plain torch, autograd: double backward,
    gradcheck). DTensor logits sharded on the classes (Shard(1), a 1-D mesh) run the vocabulary-parallel loss
    under "auto" (el_fairseq.parallel: no logits gathered), plain torch on the gathered logits under "reference".
    A value out of range raises ValueError naming it.
    """
    check_options(label_smoothing, reduction, impl)
    spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    return _loss(input, target, weight, ignore_index, reduction, label_smoothing, spec, impl)


def _check_weight(weight, num_classes=None):
    """None, or a floating-point tensor of shape (C,) (any C when num_classes is None)."""
    if weight is None:
        return None
    # `==`, not `in (None, numel)`: under torch.compile(dynamic=True) numel is symbolic, and no tuple member
    shape_ok = torch.is_tensor(weight) and weight.dim() == 1 and (num_classes is None or weight.numel() == num_classes)
    if not (shape_ok and weight.is_floating_point()):
        shown = f"{weight.dtype} {tuple(weight.shape)}" if torch.is_tensor(weight) else type(weight).__name__
        raise ValueError(f"weight {shown} is not allowed: expected a floating-point tensor of shape "
                         f"({num_classes or 'C'},), one weight per class")
    return weight


def check_targets(flat, num_classes, ignore_index, kept=None):
    """The class indices of `flat` other than ignore_index (the mask `kept` where the caller has it) lie
    in [0, num_classes): one min/max pass, one device sync; else a one-line ValueError naming the range
    found. Returns the indices with the ignored ones set to 0.

    It runs as the operator el_fairseq::checked_targets (ops.py), so that torch.compile keeps it in the
    graph without a guard on the targets' values and torch.func.vmap checks the whole batch; a tensor
    subclass (a DTensor's targets) runs the same check with plain torch ops."""
    if type(flat) is torch.Tensor:
        return ops.checked_targets(flat, num_classes, ignore_index, kept)
    safe = flat if ignore_index is None else flat.masked_fill(flat.eq(ignore_index) if kept is None else ~kept, 0)
    ops.raise_out_of_range(safe, num_classes, ignore_index)
    return safe


def _unfused(impl, what):
    """The plain-torch path for what the fused kernels do not take; an explicit fused impl is refused."""
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl {impl!r} does not take {what}: allowed impl='auto' or impl='reference'")
    return "reference"


def _loss(input, target, weight, ignore_index, reduction, label_smoothing, spec, impl):
    if autocast.active(input):  # as torch's autocast runs cross_entropy: in float32, a float32 loss
        with autocast.suspended(input):
            input, target, weight = autocast.float32(input, target, weight)
            return _loss(input, target, weight, ignore_index, reduction, label_smoothing, spec, impl)
    if input.dim() == 1 and target.dim() in (0, 1):  # unbatched, as torch takes it: input (C,), target () or (C,)
        out = _loss(input.unsqueeze(0), target.unsqueeze(0), weight, ignore_index, reduction, label_smoothing, spec,
                    impl)
        return out.squeeze(0) if reduction == "none" else out
    sharded = _class_sharded(input, target, weight, ignore_index, reduction, label_smoothing, spec, impl)
    if sharded is not None:
        return sharded
    if input.dim() < 2:
        raise ValueError(f"input must be (C,), (N, C) or (N, C, d1, ...), got shape {tuple(input.shape)}")
    # a constant of the graph under torch.compile(dynamic=True) (operator.index specialises it): the
    # smoothing eps and the kernel choice below are plain floats and strings, the rows stay dynamic
    num_classes = operator.index(input.size(1))
    weight = _check_weight(weight, num_classes)
    if impl == "auto" and input.dtype == torch.float64:
        impl = "reference"  # float64 is for checking (gradcheck, gradgradcheck): the twice-differentiable path
    logits = input if input.dim() == 2 else input.movedim(1, -1).reshape(-1, num_classes)
    rows_shape = (input.size(0), *input.shape[2:])
    if tuple(target.shape) == tuple(input.shape):  # class probabilities, as torch tells them apart
        if not target.is_floating_point():
            raise ValueError(f"target shaped like input {tuple(input.shape)} holds class probabilities and must "
                             f"be floating point, got {target.dtype}")
        if ignore_index >= 0:  # as torch: a negative one (the default -100) is unused, any other refused
            raise TorchRangeError(f"ignore_index is not supported for floating point target (class probabilities), "
                                  f"got ignore_index={ignore_index}: allowed a negative value, as the default -100")
        _unfused(impl, "probability targets")
        probs = target if target.dim() == 2 else target.movedim(1, -1).reshape(-1, num_classes)
        loss = _plain_torch(logits, probs, weight, label_smoothing, spec)
        count = logits.size(0)
    else:
        if tuple(target.shape) != rows_shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)}: "
                             f"expected {rows_shape} (class indices) or {tuple(input.shape)} (probabilities)")
        if target.is_floating_point():
            raise ValueError(f"target of class indices must be an integer tensor, got {target.dtype}")
        flat = target.reshape(-1)
        kept = flat.ne(ignore_index)
        safe = check_targets(flat, num_classes, ignore_index, kept)  # ignored targets as class 0
        # Without smoothing a class weight scales the whole token loss, w_y (CE + rho b(p_y)): the fused
        # kernels' per-token loss times w_y is exact. Smoothing weights each class j: plain torch.
        smoothed = label_smoothing > 0.0 or (spec.active and spec.epsilon > 0.0)
        if weight is not None and smoothed:
            impl = _unfused(impl, "weight with label_smoothing or bonus_label_smoothing")
        if impl == "reference" and weight is not None:
            loss = _plain_torch(logits, safe, weight, label_smoothing, spec).masked_fill(~kept, 0.0)
        else:
            loss, _ = _per_token(logits, flat, fairseq_epsilon(label_smoothing, num_classes), spec,
                                 ignore_index=ignore_index, reduce=False, impl=impl)
            if weight is not None:
                loss = loss * weight.to(loss.dtype)[safe]  # 0 stays 0 at ignored targets
        count = kept.sum() if weight is None else weight.to(loss.dtype)[safe].masked_fill(~kept, 0.0).sum()
    # loss is float32 for half-precision input (float64 for float64): reduced in that precision and then
    # rounded to the input's dtype, as torch accumulates; fp16 per-token values summed in fp16 overflow.
    if reduction == "none":
        return loss.to(input.dtype).reshape(rows_shape)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    # like torch: the mean over non-ignored targets, weighted by w_y with weights (nan if none, zero gradient)
    return mean_over_count(loss.sum(), count).to(input.dtype)


def _class_sharded(input, target, weight, ignore_index, reduction, label_smoothing, spec, impl):
    """impl "auto" on DTensor logits sharded on the class dimension: the vocabulary-parallel loss (a Replicate
    DTensor; el_fairseq/parallel/dtensor.py), else None."""
    hook = parallel_hook("class_sharded_loss", input) if impl == "auto" else None
    return None if hook is None else hook(input, target, weight, ignore_index, reduction, label_smoothing, spec)


def parallel_hook(name, tensor):
    """el_fairseq/parallel/dtensor.py's function `name` when `tensor` is a DTensor, else None. That package sits
    above this one (it imports these checks), so it is imported by name, and only once a DTensor exists: without
    one, nothing of torch.distributed is loaded. (linear.py's hooks use it too.)"""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(tensor, dtensor.DTensor):
        return None
    return getattr(importlib.import_module("el_fairseq.parallel.dtensor"), name)


def _plain_torch(logits, target, weight, label_smoothing, spec):
    """Per-row loss from reference.class_weighted_loss, computed in float32 (float64 for float64 logits)."""
    dtype = compute_dtype(logits.dtype)
    lprobs = F.log_softmax(logits.to(dtype), dim=-1)
    target = target.to(dtype) if target.is_floating_point() else target
    weight = weight.to(device=logits.device, dtype=dtype) if weight is not None else None
    return class_weighted_loss(lprobs, target, weight, label_smoothing, spec)


class EncouragingLoss(torch.nn.Module):
    """`nn.CrossEntropyLoss`-like module of `encouraging_loss` (see there for every argument): torch's
    arguments in torch's order, then the EL options by keyword; `weight` is a buffer, as in torch.

    Defaults of the authors' EncouragingLoss.py: log bonus, log_end=0.75, reduction="mean".
        criterion = EncouragingLoss()            # or EncouragingLoss(class_weights, label_smoothing=0.1, log_end=0.5)
        loss = criterion(model(x), y)
    """

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, log_end=0.75,
                 bonus="log", bonus_rho=1.0, bonus_label_smoothing=0.0, bonus_gamma=1.0, bonus_start=0.0,
                 impl="auto"):
        super().__init__()
        check_options(label_smoothing, reduction, impl)
        self.spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
        self.register_buffer("weight", _check_weight(weight))
        self.label_smoothing, self.ignore_index, self.reduction, self.impl = label_smoothing, ignore_index, reduction, impl

    def forward(self, input, target):
        return _loss(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing, self.spec,
                     self.impl)

    def extra_repr(self):
        s = self.spec
        return (f"bonus={s.kind!r}, log_end={s.log_end}, bonus_rho={s.rho}, bonus_label_smoothing={s.epsilon}, "
                f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, impl={self.impl!r}")

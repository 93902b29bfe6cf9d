"""The encouraging loss of logits sharded on the class dimension across a process group (vocabulary
parallelism, a tensor-parallel output layer), equal on every rank to `encouraging_loss` on the gathered logits.

Convention (Megatron's vocab-parallel cross-entropy, Apple's Cut Cross-Entropy): rank r holds the logits
(..., V_r) of the classes [vocab_start, vocab_start + V_r); the shards tile [0, C) in any sizes (uneven,
empty); `target` (...) holds global class indices and `weight` the full (C,) class weights, both the same
on every rank (so w_y and the mean's sum of w_y are known without communicating). C = sum_r V_r: the
class count of torch's label smoothing eps/C, of the whole vocabulary (Megatron's vocab-parallel CE takes
the smoothing sum and the class count of the local shard: wrong under tensor parallelism).

Per row, with m = max_j z_j, e_j = exp(z_j - m), S = sum_j e_j, p_j = e_j / S, W = sum_j w_j (w = 1
without weight), eps = label_smoothing, eps_b = bonus_label_smoothing, all sums over the C classes:

    loss = (1 - eps) w_y (log S - (z_y - m)) + eps / C (W log S - sum_j w_j (z_j - m))
         + rho [ (1 - eps_b) w_y b(p_y) + eps_b / C sum_j w_j b(p_j) ]

api.py's formula. Communicated per row, never the logits:
  1. MAX all-reduce of the local maxima (N,);
  2. SUM all-reduce of [sum_{z_j < m} e_j, K = #{j: z_j = m}, z_y - m (from the rank owning y, 0
     elsewhere), and with eps > 0 sum_j w_j (z_j - m)] (N, 3 or 4);
  3. only with bonus smoothing (eps_b > 0, rho > 0): SUM of [sum_j w_j b(p_j), sum_j w_j b'(p_j) p_j] (N, 2).
S = K + sum_{z_j < m} e_j, and 1 - p at a top class (z_j = m) is (K - 1 + sum_{z_j < m} e_j) / S: exact
for p_y -> 1, where S - 1 in float32 loses it (the other classes have p <= 1/2). Each collective carries a
few numbers of the call too (see exchange_max, _exchange_sums), which check that the shards tile the
vocabulary and let one rank's refusal stop every rank instead of leaving the others waiting.

Backward communicates nothing: from the saved row statistics each rank computes the gradient of its shard,

    dL/dz_k = p_k (Q - T - d p_y + a w_k b'(p_k)) - eps / C w_k                        (k != y)
    dL/dz_y = -(1 - eps) w_y (1 - p_y) + eps / C (p_y W - w_y) + p_y (a w_y b'(p_y) - T + d (1 - p_y))

with Q = (1 - eps) w_y + eps W / C, d = rho (1 - eps_b) w_y b'(p_y), a = rho eps_b / C and
T = a sum_j w_j b'(p_j) p_j, recomputing p_k chunk by chunk from the logits (no (N, V_r) tensor kept).
Computed in float32 for 16-bit logits (float64 for float64); loss and gradient in the logits' dtype.
"""
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..loss.api import _check_weight, check_options, check_targets, make_spec
from ..loss.bonus import BonusSpec, bonus_grad, bonus_value
from ..loss.chunked import chunk_rows, compute_dtype
from ..loss.fused import refuse_double_backward
from ..loss.reduction import mean_over_count


def vocab_parallel_encouraging_loss(logits, target, *, group, vocab_start, weight=None, ignore_index=-100,
                                    reduction="mean", label_smoothing=0.0, log_end=0.75, bonus="log", bonus_rho=1.0,
                                    bonus_label_smoothing=0.0, bonus_gamma=1.0, bonus_start=0.0):
    """The encouraging loss of this rank's logits shard (..., V_r), classes [vocab_start, vocab_start + V_r),
    the same value on every rank of `group` (a ProcessGroup; None: the default group): `encouraging_loss`'s
    options and conventions (see el_fairseq/loss/api.py) on the logits gathered along the class dimension.

    target (...): global class indices (or ignore_index), the same on every rank. weight (C,): the full class
    weights, the same on every rank (each rank takes its slice). reduction: "mean" (over the non-ignored
    targets, weighted by w_y; nan with a zero gradient when nothing counts), "sum" or "none" (target's shape).
    Every rank must call it (it runs two or three all-reduces of O(1) numbers per row); its backward
    communicates nothing and is once differentiable. A bad value raises ValueError on every rank.
    """
    check_options(label_smoothing, reduction, "auto")
    spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    return sharded_loss(logits, target, group, vocab_start, weight, ignore_index, reduction, label_smoothing, spec)


@dataclass(frozen=True)
class _Call:
    """What a call fixes besides the shard: the group, where the shard starts, the targets (N,) and options."""

    group: object
    vocab_start: int
    target: torch.Tensor  # (N,) global class indices, ignore_index included
    kept: torch.Tensor  # (N,) bool: target != ignore_index
    weight: Optional[torch.Tensor]  # (C,) full class weights, or None
    label_smoothing: float
    spec: BonusSpec
    ignore_index: int


def sharded_loss(logits, target, group, vocab_start, weight, ignore_index, reduction, label_smoothing,
                 spec: BonusSpec):
    """vocab_parallel_encouraging_loss with its options checked (the DTensor path, dtensor.py, enters here)."""
    check_index_target(target)
    weight = _check_weight(weight)
    problem = _local_problem(logits, target, vocab_start, weight)
    flat = target.reshape(-1)
    if problem is not None:  # every rank takes part in the first collective, then raises
        exchange_max(_refusal_payload(logits, flat), 0, 0, True, group)
        raise ValueError(problem)
    z = logits.reshape(flat.numel(), logits.size(-1))  # (N, V_r); V_r may be 0
    call = make_call(group, vocab_start, flat, weight, label_smoothing, spec, ignore_index, z.device)
    loss = _ShardedLoss.apply(z, call)  # (N,), 0 at ignored targets, in the compute dtype
    if reduction == "none":
        return loss.to(logits.dtype).reshape(target.shape)
    if reduction == "sum":
        return loss.sum().to(logits.dtype)
    return mean_over_count(loss.sum(), mean_count(call, loss.dtype)).to(logits.dtype)


def check_index_target(target):
    """target holds class indices: an integer tensor (the same on every rank, so every rank raises alike)."""
    if not torch.is_tensor(target) or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        shown = target.dtype if torch.is_tensor(target) else type(target).__name__
        raise ValueError(f"target of class indices must be an integer tensor, got {shown}")


def make_call(group, vocab_start, flat, weight, label_smoothing, spec, ignore_index, device):
    """The _Call of checked inputs: flat (N,) targets, the full class weights (or None) moved to `device`."""
    weight = None if weight is None else weight.to(device=device)
    return _Call(group, int(vocab_start), flat, flat.ne(ignore_index), weight, label_smoothing, spec, ignore_index)


def mean_count(call, dtype):
    """The divisor of reduction "mean": the number of non-ignored targets, or the sum of their weights w_y."""
    return call.kept.sum() if call.weight is None else _target_weights(call, dtype).sum()


def _refusal_payload(logits, target):
    """Row maxima of zeros standing in for a refused shard's, in the dtype and on the device the others use."""
    if torch.is_tensor(logits) and logits.is_floating_point():
        return torch.zeros(target.numel(), dtype=compute_dtype(logits.dtype), device=logits.device)
    return torch.zeros(target.numel(), dtype=torch.float32, device=target.device)


def _local_problem(logits, target, vocab_start, weight):
    """What is wrong with this rank's own inputs (one line), or None. Only this rank sees it: the caller still
    joins the first collective, which tells the other ranks to stop too."""
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        shown = logits.dtype if torch.is_tensor(logits) else type(logits).__name__
        return f"logits must be a floating-point tensor, got {shown}"
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(target.shape):
        return (f"target shape {tuple(target.shape)} does not match the logits shard {tuple(logits.shape)}: "
                f"expected target {tuple(logits.shape[:-1])} (the shard's shape without its class dimension, last)")
    return range_problem(vocab_start, logits.size(-1), logits.dtype, weight, "logits")


def range_problem(vocab_start, size, dtype, weight, what):
    """What is wrong with this rank's class range [vocab_start, vocab_start + size) of `what` (the logits, a
    projection) in `dtype` against the full class weights (or None), in one line; or None."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, numbers.Integral) or vocab_start < 0:
        return f"vocab_start {vocab_start!r} is out of range: allowed an int >= 0, the first class of this shard"
    end = vocab_start + size
    if weight is not None and end > weight.numel():
        return (f"the {what} shard of classes [{vocab_start}, {end}) does not fit weight ({weight.numel()},): "
                f"allowed the full weight vector of all classes on every rank")
    if compute_dtype(dtype) == torch.float32 and end > 2 ** 24:  # the class counts travel in float32
        return f"vocab_start + V_r = {end} classes is out of range for {dtype} {what}: allowed at most 2**24"
    return None


def exchange_max(row_max, vocab_start, local_size, refused, group):
    """Collective 1, MAX: the rows' maxima and three numbers of the call: the shard's end, minus its start
    (the vocabulary then starts at 0 and ends at C), and this rank + 1 where it refused its inputs (else 0).
    Returns (m, first class, C, the highest refusing rank or -1)."""
    flag = dist.get_rank(group) + 1 if refused else 0
    payload = torch.cat([row_max, row_max.new_tensor([vocab_start + local_size, -vocab_start, flag])])
    dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    end, minus_start, flag = (int(v) for v in payload[-3:].tolist())
    return payload[:-3], -minus_start, end, flag - 1


def check_refusal(refused):
    """Raise on a rank whose inputs were fine where exchange_max reported a refusing rank (>= 0)."""
    if refused >= 0:
        raise ValueError(f"rank {refused} of the group refused its inputs to the vocabulary-parallel loss "
                         f"(its error names the value)")


def _exchange_sums(row_sums, local_size, group):
    """Collective 2 or 3, SUM: per-row sums (N, k), and the shards' sizes (their sum: C when they tile)."""
    payload = torch.cat([row_sums.reshape(-1), row_sums.new_tensor([local_size])])
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    return payload[:-1].view_as(row_sums), int(payload[-1])


def _row_chunks(n_rows, size):
    step = chunk_rows(size)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _weighted_sum(values, weight):
    """sum_j w_j values_j per row (w = 1 for None); a zero weight counts 0 also at a masked class (-inf)."""
    if weight is None:
        return values.sum(-1)
    return (values.masked_fill((weight == 0) & values.isinf(), 0.0) * weight).sum(-1)


def _target_weights(call, dtype):
    """w_y per row (0 at ignored targets): the weight is replicated, so every rank reads it directly."""
    safe = call.target.masked_fill(~call.kept, 0)
    return call.weight.to(dtype)[safe].masked_fill(~call.kept, 0.0)


@dataclass
class _Rows:
    """The statistics of the rows over the whole vocabulary, the same on every rank, and this rank's place."""

    classes: int
    m: torch.Tensor  # (N,) max_j z_j
    log_s: torch.Tensor  # (N,) log S, S = sum_j exp(z_j - m)
    omp_top: torch.Tensor  # (N,) 1 - p at a top class (z_j = m)
    local_y: torch.Tensor  # (N,) y - vocab_start, clamped into the shard
    own: torch.Tensor  # (N,) bool: this shard holds a (non-ignored) y
    weight: Optional[torch.Tensor]  # (V_r,) this shard's class weights, or None
    coef: Optional[torch.Tensor] = None  # (N,) Q - T - d p_y, the p_k factor of the gradient at k != y
    grad_y: Optional[torch.Tensor] = None  # (N,) dL/dz_y
    slope: float = 0.0  # a = rho eps_b / C


def _probabilities(z, rows, r, complement=True):
    """p and 1 - p (None without `complement`) of a chunk z (rows r) of the shard: exp(log p_j), and
    1 - p_j = -expm1(log p_j) but at a top class (z_j = m: the only ones that can be near 1) the exact omp_top."""
    log_p = z - rows.m[r, None]
    top = log_p == 0 if complement else None
    log_p.sub_(rows.log_s[r, None])  # in place, as below: a chunk's temporaries are the memory above the shard
    if not complement:
        return log_p.exp_(), None
    return log_p.exp(), torch.where(top, rows.omp_top[r, None], -torch.expm1(log_p))


def _local_sums(z, m, call, local_y, own, weight, dtype):
    """This shard's part of collective 2, per row: [sum_{z_j < m} e_j, #{j: z_j = m}, z_y - m where the shard
    holds y (else 0), and with label smoothing sum_j w_j (z_j - m)]."""
    n, size = z.shape
    sums = torch.zeros(n, 4 if call.label_smoothing > 0.0 else 3, dtype=dtype, device=z.device)
    for r in _row_chunks(n, size):
        shifted = z[r].to(dtype) - m[r, None]
        top = shifted == 0
        sums[r, 0] = shifted.exp().masked_fill_(top, 0.0).sum(-1)
        sums[r, 1] = top.sum(-1).to(dtype)
        if size:
            picked = shifted.gather(-1, local_y[r, None]).squeeze(-1)
            sums[r, 2] = torch.where(own[r], picked, torch.zeros_like(picked))
        if call.label_smoothing > 0.0:
            sums[r, 3] = _weighted_sum(shifted, weight)
    return sums


def _smoothing_sums(z, rows, spec, dtype):
    """This shard's part of collective 3, per row: [sum_j w_j b(p_j), sum_j w_j b'(p_j) p_j]."""
    n, size = z.shape
    sums = torch.zeros(n, 2, dtype=dtype, device=z.device)
    for r in _row_chunks(n, size):
        p, one_minus_p = _probabilities(z[r].to(dtype), rows, r)
        sums[r, 0] = _weighted_sum(bonus_value(p, one_minus_p, spec), rows.weight)
        sums[r, 1] = _weighted_sum(bonus_grad(p, one_minus_p, spec) * p, rows.weight)
    return sums


def _check_vocabulary(first, classes, sizes, call):
    """After collective 2: the shards tile [0, C) (they start at class 0, and their sizes add up to C, the
    last shard's end), and weight and targets fit the C classes. The same verdict on every rank: all from
    reduced or replicated values."""
    if first != 0 or sizes != classes:
        raise ValueError(f"the logits shards do not tile the vocabulary: their sizes add up to {sizes} classes, "
                         f"they span classes {first} to {classes}: allowed each rank's vocab_start = the sum of "
                         f"the shard sizes before it")
    if call.weight is not None and call.weight.numel() != classes:
        raise ValueError(f"weight ({call.weight.numel()},) does not match the {classes} classes of the shards: "
                         f"allowed the full weight vector ({classes},) on every rank")
    check_targets(call.target, classes, call.ignore_index, call.kept)


def shard_forward(z, call):
    """Per-row loss (N,) (0 at ignored targets) and the _Rows that backward needs: the two or three collectives."""
    n, size = z.shape
    dtype = compute_dtype(z.dtype)
    local_max = z.amax(-1).to(dtype) if size else torch.full((n,), float("-inf"), dtype=dtype, device=z.device)
    m, first, classes, refused = exchange_max(local_max, call.vocab_start, size, False, call.group)
    check_refusal(refused)
    local_y = call.target.masked_fill(~call.kept, 0) - call.vocab_start
    own = call.kept & (local_y >= 0) & (local_y < size)
    local_y = local_y.clamp(0, max(size - 1, 0))
    weight = None if call.weight is None else call.weight[call.vocab_start:call.vocab_start + size].to(dtype)
    sums, sizes = _exchange_sums(_local_sums(z, m, call, local_y, own, weight, dtype), size, call.group)
    _check_vocabulary(first, classes, sizes, call)
    rest, ties, shifted_y = sums[:, 0], sums[:, 1], sums[:, 2]
    top_rest = ties - 1.0 + rest  # S - 1: the other classes' share, without S's rounding
    rows = _Rows(classes, m, torch.log1p(top_rest), top_rest / (ties + rest), local_y, own, weight)
    smoothing = None
    if call.spec.active and call.spec.epsilon > 0.0:
        smoothing, _ = _exchange_sums(_smoothing_sums(z, rows, call.spec, dtype), size, call.group)
    loss = _row_terms(rows, shifted_y, sums[:, 3] if sums.size(1) > 3 else None, smoothing, call, dtype)
    return loss.masked_fill(~call.kept, 0.0), rows


def _row_terms(rows, shifted_y, logit_sum, smoothing, call, dtype):
    """The loss of each row from the reduced statistics, and the gradient's per-row factors into `rows`."""
    eps, spec, classes = call.label_smoothing, call.spec, rows.classes
    p_y = (shifted_y - rows.log_s).exp()
    one_minus_p_y = torch.where(shifted_y == 0, rows.omp_top, 1.0 - p_y)  # p_y <= 1/2 where y is not a top class
    if call.weight is None:
        w_y, total_weight = torch.ones_like(p_y), float(classes)
    else:
        w_y, total_weight = _target_weights(call, dtype), call.weight.to(dtype).sum()
    loss = (1.0 - eps) * w_y * (rows.log_s - shifted_y)
    coef = (1.0 - eps) * w_y + eps / classes * total_weight
    grad_y = -(1.0 - eps) * w_y * one_minus_p_y + eps / classes * (p_y * total_weight - w_y)
    if eps > 0.0:
        loss = loss + eps / classes * (total_weight * rows.log_s - logit_sum)
    if spec.active:
        slope_y = bonus_grad(p_y, one_minus_p_y, spec)
        d = spec.rho * (1.0 - spec.epsilon) * w_y * slope_y
        loss = loss + spec.rho * (1.0 - spec.epsilon) * w_y * bonus_value(p_y, one_minus_p_y, spec)
        coef = coef - d * p_y
        grad_y = grad_y + p_y * d * one_minus_p_y
        if smoothing is not None:
            rows.slope = spec.rho * spec.epsilon / classes
            spread = rows.slope * smoothing[:, 1]  # T
            loss = loss + rows.slope * smoothing[:, 0]
            coef = coef - spread
            grad_y = grad_y + p_y * (rows.slope * w_y * slope_y - spread)
    rows.coef, rows.grad_y = coef, grad_y
    return loss


def shard_grad(z, grad_rows, rows, call):
    """d(sum_i g_i loss_i)/dz of this shard, g = grad_rows (0 at ignored targets), chunk by chunk; no collective."""
    n, size = z.shape
    dtype = compute_dtype(z.dtype)
    scale = grad_rows.to(dtype).masked_fill(~call.kept, 0.0)
    eps_c = call.label_smoothing / rows.classes
    grad = torch.empty_like(z)
    columns = torch.arange(size, device=z.device)
    for r in _row_chunks(n, size):
        p, one_minus_p = _probabilities(z[r].to(dtype), rows, r, complement=bool(rows.slope))
        g = p * rows.coef[r, None]
        if rows.slope:
            slopes = bonus_grad(p, one_minus_p, call.spec).mul_(rows.slope)
            g.add_(p * (slopes if rows.weight is None else slopes.mul_(rows.weight)))
        if eps_c:
            g.sub_(eps_c * (1.0 if rows.weight is None else rows.weight))
        at_y = (columns == rows.local_y[r, None]) & rows.own[r, None]
        g = torch.where(at_y, rows.grad_y[r, None], g)
        grad[r] = g.mul_(scale[r, None]).masked_fill_(~call.kept[r, None], 0.0)
    return grad


class _ShardedLoss(torch.autograd.Function):
    """Per-row loss of a logits shard (N, V_r); backward recomputes the shard's gradient from the saved row
    statistics and the logits (saved, not copied), scaled by the rows' grad_output: no collective."""

    @staticmethod
    def forward(ctx, z, call):
        loss, rows = shard_forward(z.detach(), call)
        ctx.save_for_backward(z)
        ctx.call, ctx.rows = call, rows
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        refuse_double_backward("vocabulary-parallel losses (el_fairseq.parallel)")
        (z,) = ctx.saved_tensors
        return shard_grad(z.detach(), grad_rows, ctx.rows, ctx.call), None

"""The vocabulary-parallel encouraging loss of a linear projection, without the logits: a tensor-parallel output
layer (Megatron's ColumnParallelLinear, a vocab-parallel embedding) fused with the loss, equal on every rank to
`encouraging_linear_loss(input, W, target, linear_bias=b, ...)` of the full weight W (C, D).

Rank r holds the rows W_r (V_r, D) of classes [vocab_start, vocab_start + V_r) and its bias b_r (V_r,) (any
sizes that tile [0, C), uneven or empty); input x (N, D) (or (..., D)) and the target's global class ids are
the same on every rank. Over chunks of c rows, as the one-process fused linear loss (el_fairseq/loss/linear.py,
whose chunk loop and autograd Functions run here on the shard, with a per-chunk kernel of vocab_parallel.py):

    z_c = x_c W_r^T + b_r                       (c, V_r): the chunk's logits of this shard, never (N, V_r)
    loss_c, rows_c = shard_forward(z_c)         the vocabulary-parallel row statistics (vocab_parallel.py): a MAX
                                                all-reduce of c + 3 numbers and a SUM of 3c + 1 (4c + 1 with
                                                label smoothing), a second SUM of 2c + 1 with bonus smoothing
    g_c = dL/dz_c = shard_grad(z_c, rows_c)     this shard's logit gradient, no collective
    grad_x_c = g_c W_r,  grad_W_r += g_c^T x_c,  grad_b_r += sum_rows g_c

grad_x_c is this shard's term of the one-process input gradient g_c W = sum_r g_c^(r) W_r: the input enters
through _ReplicatedInput, the identity whose backward all-reduces (SUM) the (N, D) input gradient over the
group (Megatron's copy_to_tensor_model_parallel_region), so that every rank gets the one-process gradient;
the weight and bias gradients are the shard's own, the rank's slice of the full ones.

Collectives of one call, k = ceil(N / c) chunks:
    forward   1 + 2k all-reduces (1 + 3k with bonus smoothing, eps_b > 0 and rho > 0). The first, a MAX of 6
              numbers (_agree_on_chunks), lets one rank's refusal of its inputs stop every rank and fixes c on
              every rank: chunk_size, or default_chunk_size(C), the one-process loss's chunk of the whole
              vocabulary (so the (c, V_r) buffers are 1/TP of its (c, C) ones);
    backward  1: the all-reduce of the (N, D) input gradient; none when the input does not require grad.
For reduction "mean"/"sum" the shard's gradients are computed in the forward and scaled in backward (linear.py's
_SummedLinearLoss, once differentiable); for "none" the forward keeps each chunk's row statistics (O(c) numbers)
and the backward recomputes the chunk's logits and gradient from them (_PerTokenLinearLoss), with no other
collective. Per token the forward sends O(1) numbers whatever V (4 to 7 of the compute dtype), the backward D.
Computed in float32 (float64 for float64 input) as linear.py does; every rank must call it, with the same
input, target, options and requires_grad of the input.
"""
import collections
import dataclasses
import math

import torch
import torch.distributed as dist

from ..loss import autocast
from ..loss.api import _check_weight, check_options, make_spec
from ..loss.bonus import BonusSpec
from ..loss.linear import _chunked, default_chunk_size
from ..loss.reduction import mean_over_count
from .vocab_parallel import (check_index_target, check_refusal, exchange_max, make_call, mean_count, range_problem,
                             shard_forward, shard_grad)


def vocab_parallel_encouraging_linear_loss(input, linear_weight, target, *, group, vocab_start, linear_bias=None,
                                           weight=None, log_end=0.75, bonus="log", bonus_rho=1.0,
                                           bonus_label_smoothing=0.0, bonus_gamma=1.0, bonus_start=0.0,
                                           label_smoothing=0.0, ignore_index=-100, reduction="mean",
                                           chunk_size=None):
    """`encouraging_linear_loss(input, W, target, linear_bias=b, ...)` of the full projection W (C, D), b (C,),
    from this rank's rows linear_weight W_r (V_r, D) and linear_bias b_r (V_r,) (or None) of the classes
    [vocab_start, vocab_start + V_r): the same loss on every rank of `group` (a ProcessGroup; None: the default
    group), the one-process gradient of `input` on every rank, and the rank's slice of the weight and bias
    gradients.

    input (..., D) and target (...) (global class indices, or ignore_index; None is -100, torch's default) are
    the same on every rank; weight (C,): the full class weights, on every rank. Options as in
    encouraging_linear_loss (el_fairseq/loss/linear.py); no probability targets. reduction: "mean" (over the
    non-ignored targets, weighted by w_y), "sum", "none" (target's shape). chunk_size: rows per chunk (default:
    64 MiB of float32 logits of the whole vocabulary, default_chunk_size(C)). The forward runs 1 + 2k
    all-reduces of O(1) numbers per row (1 + 3k with bonus smoothing; k chunks), the backward one of the (N, D)
    input gradient; never the logits. Once differentiable. A bad value raises ValueError on every rank.
    """
    check_options(label_smoothing, reduction, "auto")
    spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    return sharded_linear_loss(input, linear_weight, linear_bias, target, group, vocab_start, weight, ignore_index,
                               reduction, label_smoothing, spec, chunk_size)


def sharded_linear_loss(input, weight, bias, target, group, vocab_start, class_weight, ignore_index, reduction,
                        label_smoothing, spec: BonusSpec, chunk_size):
    """vocab_parallel_encouraging_linear_loss with its options checked (the DTensor path, dtensor.py, enters here)."""
    check_index_target(target)
    class_weight = _check_weight(class_weight)
    ignore_index = -100 if ignore_index is None else ignore_index
    problem = _local_problem(input, weight, bias, target, vocab_start, class_weight, chunk_size)
    step = _agree_on_chunks(input, weight, target, vocab_start, chunk_size, problem, group)
    x, flat = input.reshape(-1, input.size(-1)), target.reshape(-1)
    call = make_call(group, vocab_start, flat, class_weight, label_smoothing, spec, ignore_index, x.device)
    kernel = _ShardKernel(call, keep_rows=reduction == "none")
    loss = _chunked(_ReplicatedInput.apply(x, group), weight, bias, flat, 0.0, spec, ignore_index, kernel,
                    reduction != "none", step)[0]
    if reduction == "none":
        loss = loss.reshape(target.shape)
    elif reduction == "mean":  # as torch: nan where nothing counts, with a zero gradient
        loss = mean_over_count(loss, mean_count(call, loss.dtype))
    # computed in float32 for 16-bit input: returned in its dtype, but in float32 under autocast (torch's policy)
    return loss.to(input.dtype) if input.dtype in autocast.HALF and not autocast.active(input) else loss


def _local_problem(input, weight, bias, target, vocab_start, class_weight, chunk_size):
    """What is wrong with this rank's own inputs (one line), or None; the caller tells the other ranks."""
    if not torch.is_tensor(input) or not input.is_floating_point() or input.dim() < 1:
        shown = f"{input.dtype} {tuple(input.shape)}" if torch.is_tensor(input) else type(input).__name__
        return f"input {shown} is not allowed: a floating-point tensor (..., D)"
    if not torch.is_tensor(weight) or not weight.is_floating_point() or weight.dim() != 2 \
            or weight.size(1) != input.size(-1):
        shown = f"{weight.dtype} {tuple(weight.shape)}" if torch.is_tensor(weight) else type(weight).__name__
        return (f"linear_weight {shown} does not match input {tuple(input.shape)}: allowed this rank's rows "
                f"(V_r, {input.size(-1)}) of the projection, floating point")
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (weight.size(0),)):
        shown = tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__
        return f"linear_bias {shown} does not match linear_weight {tuple(weight.shape)}: expected ({weight.size(0)},)"
    if tuple(target.shape) != tuple(input.shape[:-1]):
        return (f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)}: expected "
                f"{tuple(input.shape[:-1])} (class indices)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        return f"chunk_size {chunk_size!r} is not allowed: a positive number of rows, or None"
    return range_problem(vocab_start, weight.size(0), input.dtype, class_weight, "projection")


def _agree_on_chunks(input, weight, target, vocab_start, chunk_size, problem, group):
    """The first collective, exchange_max of [chunk_size or 0, N, -N] and the call's numbers: every rank raises
    if one refused its inputs (`problem`, its own) or the ranks' inputs differ in rows; else all return the same
    chunk rows: the largest chunk_size given, else default_chunk_size(C) of the whole vocabulary C."""
    fine = problem is None
    rows = math.prod(input.shape[:-1]) if fine else 0
    device = input.device if torch.is_tensor(input) else target.device
    asked = torch.tensor([(chunk_size or 0) if fine else 0, rows, -rows], dtype=torch.float64, device=device)
    values, _, classes, refused = exchange_max(asked, vocab_start if fine else 0, weight.size(0) if fine else 0,
                                               not fine, group)
    if not fine:
        raise ValueError(problem)
    check_refusal(refused)
    step, most, minus_fewest = (int(v) for v in values.tolist())
    if most != -minus_fewest:
        raise ValueError(f"the ranks' inputs hold {-minus_fewest} to {most} rows: allowed the same input (N, D) and "
                         f"target on every rank")
    return step or default_chunk_size(classes)


class _ReplicatedInput(torch.autograd.Function):
    """The replicated input into this rank's shard: the identity in forward; backward all-reduces (SUM) its
    (N, D) gradient, each rank's g W_r, into the one-process gradient g W (the one collective of backward)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _ShardKernel:
    """linear.py's per-chunk kernel (dispatch.KERNELS' interface) on this rank's shard of the logits: loss_c
    and the row statistics from shard_forward (its 2 or 3 all-reduces), the logit gradient from shard_grad (none).
    With keep_rows, the statistics of a pass without gradient (reduction "none"'s forward) are kept, in chunk
    order, for the next pass with gradient (its backward), which then communicates nothing. nll and the
    [z_y, margin] stats are not computed (zeros): the vocabulary-parallel losses return the loss only."""

    def __init__(self, call, keep_rows):
        self.call, self.keep_rows = call, keep_rows
        self.kept = collections.deque()

    def __call__(self, z, target, epsilon, spec, ignore_index, need_grad=True):
        call = dataclasses.replace(self.call, target=target, kept=target.ne(ignore_index))
        if need_grad and self.kept:
            loss, rows = self.kept.popleft()
        else:
            loss, rows = shard_forward(z, call)
            if self.keep_rows and not need_grad:
                self.kept.append((loss, rows))
        grad = shard_grad(z, torch.ones_like(loss), rows, call) if need_grad else None
        return loss, torch.zeros_like(loss), loss.new_zeros(loss.size(0), 2, dtype=torch.float32), grad

"""The encouraging loss of a linear projection's output, without the (N, V) logits: a fused output
projection + EL, shaped like torch's `F.linear_cross_entropy` / `nn.LinearCrossEntropyLoss`.

    loss = encouraging_loss(F.linear(input, linear_weight, linear_bias), target, ...)   (see api.py)

computed over chunks of C token rows. Per chunk, with x_c (C, D) its inputs and W (V, D):

    z_c = x_c W^T + b                          one matmul, (C, V) float32
    loss_c, g_c = dL/dz_c                      the device's fused kernel (dispatch.checked_path: native
                                               for float32 CPU, Triton for CUDA, chunked elsewhere, with
                                               the first-use self-check and its fallback)
    grad_x_c = g_c W,  grad_W += g_c^T x_c,  grad_b += sum_rows g_c

so only (C, V) buffers ever exist, never (N, V). For reduction "sum"/"mean" the gradients are
computed in the forward (the backward multiplies them by the scalar grad_output, in place, as the
logits path does; a second backward raises). For reduction "none" the upstream gradient is one value
per token, which cannot be applied to the accumulated grad_W afterwards: the forward computes the
loss only and the backward recomputes each chunk's logits and kernel gradient, scales its rows by
grad_output and accumulates (one more matmul per chunk, still no (N, V) buffer). Under torch.no_grad
(or when nothing requires a gradient) only the loss is computed. A probability target that requires
grad gets grad_t_c = dL/dt_c from the same chunk pass (class_weighted_kernel).

The chunk passes are torch.library operators (linear_ops.py): el_fairseq::linear_loss_summed for "sum"/"mean"
(the gradients in the forward), el_fairseq::linear_loss_per_token and its backward operator for "none", as torch's
own chunked linear_cross_entropy is built. torch.compile(fullgraph=True) traces a call as one node (its fake
implementation), with no graph break and no data-dependent Python (the target check is an operator too, "mean"'s
count a tensor); a compiled backward scales the kept gradients out of place (a compiled graph cannot keep the
in-place rule's one-backward guard; torch's op does the same). The per-chunk kernel is resolved in eager Python
(dispatch.checked_path) and passed by name; a traced graph passes the impl asked for and the operator resolves
it when it runs. Under torch.func transforms impl "auto" takes the full logits with plain torch ops (grad, vmap,
vmap(grad), jacrev, jacfwd, as torch's linear_cross_entropy without options); a fused impl named explicitly
runs under vmap alone, through the operators' vmap rules, and is refused under grad. Double backward needs
impl="reference" (the fused backward says so).

Not chunked (the full logits, plain torch, `_full_logits_loss`): torch's K-dimensional loss, weight
(C, d1, ..., dK, D), whose softmax runs over C at each position, across rows of W; one class;
impl="reference"; impl "auto" under a torch.func transform. A DTensor weight sharded on the classes
(Shard(0), a 1-D mesh) with a replicated input runs the vocabulary-parallel linear loss under impl="auto"
(el_fairseq.parallel, `_class_sharded`).

Precision: every chunk is computed in float32 (float64 stays float64): 16-bit weights are upcast once
per call (a V x D float32 copy, the size of the float32 weight-gradient accumulator); the gradients
are accumulated in float32, multiplied by grad_output in float32 and rounded to the parameters'
dtype once (fairseq's fp16 loss scale is applied before that rounding, as on the logits path).

Chunk size: DEFAULT_CHUNK_BYTES (64 MiB) of float32 logits per chunk, C = 2^24 / V rows (524 rows at
V = 32,000, 130 at V = 128,256); the kernel's gradient buffer is as large again.
"""
import math

import torch
import torch.nn.functional as F
from torch._functorch import pyfunctorch

from . import autocast, dispatch, linear_ops
from .api import (TorchRangeError, _check_weight, _loss as _logits_loss, _unfused, check_options, check_targets,
                  fairseq_epsilon, make_spec, parallel_hook)
from .bonus import BonusSpec
from .chunked import compute_dtype
from .fused import refuse_double_backward
from .linear_ops import NO_GRADIENT, chunk_pass as _chunk_pass, class_weighted_kernel  # noqa: F401 (re-exported)
from .reduction import mean_over_count

DEFAULT_CHUNK_BYTES = 64 << 20


def default_chunk_size(num_classes: int) -> int:
    """Rows per chunk whose float32 logits take DEFAULT_CHUNK_BYTES."""
    return max(1, DEFAULT_CHUNK_BYTES // (4 * max(1, num_classes)))


class LinearInputError(TorchRangeError):
    """An input, weight or target shape (or dtype) encouraging_linear_loss does not take, in one line: a
    ValueError, as every argument check here, and a RuntimeError, what torch's linear_cross_entropy raises."""


def target_shapes(input, weight):
    """(class-index shape, probability shape) of the target of `input` and `linear_weight`: torch's
    (N, d1, ..., dK) and (N, C, d1, ..., dK) for a K-dimensional weight (C, d1, ..., dK, D), else
    (...) and (..., V) for input (..., D) (torch's (N,) / (N, V) and unbatched () / (V,) among them)."""
    batch, out_features = tuple(input.shape[:-1]), tuple(weight.shape[1:-1])
    if out_features:
        return (*batch, *out_features), (*batch, weight.size(0), *out_features)
    return batch, (*batch, weight.size(0))


def _check_out_features(out_features):
    """torch's out_features (d1, ..., dK) of a K-dimensional loss: positive ints; () for none."""
    dims = tuple(out_features) if isinstance(out_features, (tuple, list, torch.Size)) else None
    if dims is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"out_features {out_features!r} is not allowed: a tuple of positive ints (d1, ..., dK), "
                         f"or () for none")
    return dims


def _check_shapes(input, weight, bias, target, chunk_size):
    if weight.dim() > 2:  # torch's K-dimensional loss: batched input only
        if input.dim() != 2 or input.size(1) != weight.size(-1):
            raise LinearInputError(f"linear_weight {tuple(weight.shape)} (C, d1, ..., dK, D), a K-dimensional loss, "
                                   f"takes input (N, {weight.size(-1)}), got input {tuple(input.shape)}")
    elif input.dim() < 1 or weight.dim() != 2 or input.size(-1) != weight.size(1):
        raise LinearInputError(f"input (..., D) and linear_weight (V, D) do not match: input {tuple(input.shape)}, "
                               f"linear_weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:-1]):
        raise LinearInputError(f"linear_bias shape {tuple(bias.shape)} does not match linear_weight "
                               f"{tuple(weight.shape)}: expected {tuple(weight.shape[:-1])}")
    indices, probabilities = target_shapes(input, weight)
    if target.is_floating_point() and tuple(target.shape) == probabilities:
        pass  # class probabilities, as torch takes them
    elif tuple(target.shape) != indices:
        raise LinearInputError(f"target shape {tuple(target.shape)} does not match input {tuple(input.shape)} and "
                               f"linear_weight {tuple(weight.shape)}: expected {indices} (class indices) or "
                               f"{probabilities} (probabilities)")
    elif target.is_floating_point() or target.is_complex():
        raise LinearInputError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if not input.is_floating_point():
        raise LinearInputError(f"input must be floating point, got {input.dtype}")
    if weight.size(0) < 1:
        raise LinearInputError(f"need at least 1 class, got linear_weight {tuple(weight.shape)}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size {chunk_size!r} is not allowed: a positive number of rows, or None")


def _needs(ctx, bias):
    """Which of (x, w, b, target) an autograd Function's backward must return a gradient for."""
    wanted = ctx.needs_input_grad
    return wanted[0], wanted[1], bias is not None and wanted[2], wanted[3]


def _rounded(grads, like):
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like))


class _SummedLinearLoss(torch.autograd.Function):
    """Summed loss; the gradients are computed in the forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, x, w, b, target, epsilon, spec, ignore_index, kernel, step):
        loss, nll, stats, grads = _chunk_pass(x, w, b, target, epsilon, spec, ignore_index, kernel, step,
                                              _needs(ctx, b))
        ctx.save_for_backward(*grads)
        ctx.dtypes = (x.dtype, w.dtype, b.dtype if b is not None else None, target.dtype)
        ctx.used = False
        ctx.mark_non_differentiable(nll, stats)
        return loss.sum(), nll, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_stats):
        refuse_double_backward("encouraging_linear_loss's fused chunks")
        if ctx.used:
            raise RuntimeError("el_fairseq: encouraging_linear_loss keeps its gradients from the forward and "
                               "scales them in place, so it allows one backward per forward: compute the loss again")
        ctx.used = True
        out = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            out.append(None if g is None else g.mul_(grad_loss.to(g.dtype)).to(dtype))
        return (*out, None, None, None, None, None)


class _PerTokenLinearLoss(torch.autograd.Function):
    """Per-token loss; backward recomputes the chunks with the per-token grad_output (see above)."""

    @staticmethod
    def forward(ctx, x, w, b, target, epsilon, spec, ignore_index, kernel, step):
        loss, nll, stats, _ = _chunk_pass(x, w, b, target, epsilon, spec, ignore_index, kernel, step, NO_GRADIENT)
        ctx.save_for_backward(x, w, b, target)
        ctx.options = (epsilon, spec, ignore_index, kernel, step)
        ctx.mark_non_differentiable(nll, stats)
        return loss, nll, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_stats):
        refuse_double_backward("encouraging_linear_loss's fused chunks")
        x, w, b, target = ctx.saved_tensors
        _, _, _, grads = _chunk_pass(x, w, b, target, *ctx.options, _needs(ctx, b), row_scale=grad_loss)
        return (*_rounded(grads, (x, w, b if b is not None else x, target)), None, None, None, None, None)


def fused_linear_encouraging_loss(input, weight, bias, target, epsilon, spec: BonusSpec, ignore_index=None,
                                  reduce=True, impl="auto", chunk_size=None, check_spec=None):
    """(loss, nll, stats) of logits F.linear(input, weight, bias), input (..., D), weight (V, D),
    target (...), never materialising them: epsilon is fairseq's label smoothing (as in
    dispatch.encouraging_loss); loss summed when reduce, else per token (N,) like nll; stats
    (N, 2) float32 [z_y, margin], zeros at ignored tokens. impl "reference": the full logits with
    autograd (for tests). check_spec: the run's configured options, for the per-chunk kernel's
    first-use self-check (dispatch.checked_path; a bonus schedule's rho is 0 at update 0; where the
    kernel is resolved inside the operator, under torch.compile or vmap, its rho is what is passed).

    The chunks run as the operators of linear_ops.py: one node of a compiled graph, no data-dependent
    Python on the way (the target check is the operator el_fairseq::checked_targets)."""
    _check_shapes(input, weight, bias, target, chunk_size)
    x = input.reshape(-1, input.size(-1))
    flat = target.reshape(-1)
    tensors = {"input": input, "linear_weight": weight, "linear_bias": bias, "target": target}
    # the operators take what a compiled graph traces, and a named fused impl's vmap-batched tensors
    impl = dispatch.fused_or_reference(impl, tensors, weight.size(0))
    if impl == "reference":
        loss, nll, stats = dispatch.encouraging_loss(F.linear(x, weight, bias), flat, epsilon, spec, ignore_index,
                                                     reduce=False, impl=impl, with_stats=True)
        return (loss.sum() if reduce else loss), nll, stats.float()
    vocab = weight.size(0)
    check_targets(flat, vocab, ignore_index)
    kernel = _kernel_name(x, vocab, impl, epsilon, spec, ignore_index, check_spec)
    check_rho = None if check_spec is None or check_spec == spec else check_spec.rho
    options = linear_ops.Options(epsilon, 0.0, spec, ignore_index, kernel, chunk_size or default_chunk_size(vocab),
                                 check_rho)
    return _operator_loss(x, weight, bias, flat, None, options, reduce)


def _transformed():
    """Whether a torch.func transform (grad, vmap, jvp, functionalize) is active (in eager Python: a compiled
    graph's tensors are plain when it runs)."""
    return not torch.compiler.is_compiling() and bool(pyfunctorch.retrieve_all_functorch_interpreters())


def _kernel_name(x, vocab, impl, epsilon, spec, ignore_index, check_spec):
    """The per-chunk kernel the operators run: resolved here, in eager Python, where the self-check can run
    (dispatch.checked_path: its warnings come from this call); the impl asked for where it cannot, in a traced
    graph or under vmap (the operator resolves it when it runs, on plain tensors)."""
    if torch.compiler.is_compiling() or _transformed():
        return impl
    return dispatch.checked_path(x.new_empty(0, vocab, dtype=compute_dtype(x.dtype)), impl, epsilon, spec,
                                 ignore_index, check_spec)


def _operator_loss(x, weight, bias, target, class_weight, options, reduce):
    """(loss, nll, stats) of the rows x (N, D) from linear_ops' operators: the summed one (gradients in the
    forward, for those tensors that require one) when reduce, else the per-token one."""
    if not reduce:
        return linear_ops.linear_loss_per_token(x, weight, bias, target, class_weight, *options.args())
    grad = torch.is_grad_enabled()
    needs = [grad and t is not None and t.requires_grad for t in (x, weight, bias, target)]
    # In place in eager (one (V, D) buffer less); a compiled graph cannot keep the one-backward guard.
    in_place = not torch.compiler.is_compiling()
    loss, nll, stats, *_ = linear_ops.linear_loss_summed(x, weight, bias, target, class_weight, *options.args(),
                                                         in_place, needs)
    return loss, nll, stats


def _chunked(x, weight, bias, target, epsilon, spec, ignore_index, kernel, reduce, chunk_size):
    """(loss, nll, stats) over row chunks of x (N, D) with a callable `kernel` (dispatch.KERNELS' interface;
    the vocabulary-parallel shard kernel, which holds a process group and state, is no operator argument)."""
    step = chunk_size or default_chunk_size(weight.size(0))
    grad_wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                  for t in (x, weight, bias, target))
    if not grad_wanted:  # validation, torch.no_grad: the loss only, no gradient work
        loss, nll, stats, _ = _chunk_pass(x, weight, bias, target, epsilon, spec, ignore_index, kernel, step,
                                          NO_GRADIENT)
        return (loss.sum() if reduce else loss), nll, stats
    function = _SummedLinearLoss if reduce else _PerTokenLinearLoss
    return function.apply(x, weight, bias, target, epsilon, spec, ignore_index, kernel, step)


def encouraging_linear_loss(input, linear_weight, target, *, linear_bias=None, weight=None, log_end=0.75,
                            bonus="log", bonus_rho=1.0, bonus_label_smoothing=0.0, bonus_gamma=1.0, bonus_start=0.0,
                            label_smoothing=0.0, ignore_index=-100, reduction="mean", impl="auto",
                            chunk_size=None):
    """`encouraging_loss(F.linear(input, linear_weight, linear_bias), target, ...)` without the logits,
    the arguments of `torch.nn.functional.linear_cross_entropy` (its `options`, a chunking strategy, is
    `chunk_size` here), then the EL options.

    input (..., D), linear_weight (V, D), linear_bias (V,) or None, target (...) class indices or (..., V)
    class probabilities (torch's input (N, D) or unbatched (D,) among them; more leading dimensions, the
    tokens of a (B, T, D) hidden state, are an extension). torch's K-dimensional loss: linear_weight
    (C, d1, ..., dK, D) and linear_bias (C, d1, ..., dK) with input (N, D) give the logits
    F.linear(input, W.reshape(-1, D), b.reshape(-1)).reshape(N, C, d1, ..., dK), the softmax over C at
    each position, target (N, d1, ..., dK) or probabilities (N, C, d1, ..., dK): those, one class (V = 1),
    and impl="reference" are computed from the full logits (encouraging_loss, plain torch), not in row
    chunks. ignore_index: None (torch's default) is -100 for class indices; with probability targets only
    None or the default -100 is allowed (another raises RuntimeError, as torch's does for any value).
    weight (V,): per-class weights, as encouraging_loss applies them. Without label smoothing a weight
    scales the token's loss, w_y (CE + rho b(p_y)): the fused kernel's per-token loss times w_y (its
    backward recomputes each chunk, as for "none"); with smoothing, and for probability targets, each
    chunk runs class_weighted_kernel (plain torch) instead of a fused kernel; a probability target that
    requires grad gets d loss / d target from it, chunk by chunk.
    Every option is encouraging_loss's (api.py): log_end, bonus, bonus_rho, bonus_label_smoothing,
    bonus_gamma, bonus_start, label_smoothing, ignore_index, reduction ("mean" over non-ignored
    targets, "sum", "none": shape of target), impl (the per-chunk kernel: "auto", "native", "triton",
    "chunked"; "reference" = full logits and autograd). chunk_size: token rows per chunk (default
    default_chunk_size(V): 64 MiB of float32 logits). Memory: two (chunk_size, V) buffers, the float32
    gradient accumulators (input and weight sized), never (N, V).
    """
    check_options(label_smoothing, reduction, impl)
    spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
    return _linear_loss(input, linear_weight, linear_bias, target, spec, label_smoothing, ignore_index,
                        reduction, impl, chunk_size, weight)


def _torch_ignore_index(ignore_index, probabilities):
    """linear_cross_entropy's ignore_index: None is -100 for class indices; with probability targets only
    None or our default -100 (torch's linear_cross_entropy refuses any value, F.cross_entropy one >= 0)."""
    if probabilities and ignore_index not in (None, -100):
        raise TorchRangeError(f"ignore_index cannot be specified when target contains probabilities, got "
                              f"ignore_index={ignore_index}: allowed None or the default -100")
    return -100 if ignore_index is None else ignore_index


def _full_logits_loss(input, weight, bias, target, class_weight, spec, label_smoothing, ignore_index, reduction,
                      impl):
    """encouraging_loss (api.py) of the whole logits, autograd through F.linear: torch's K-dimensional loss,
    logits F.linear(input, W.reshape(-1, D), b.reshape(-1)).reshape(N, C, d1, ..., dK) (the softmax runs over C
    at each position, across rows of W: not a row-chunk kernel's), one class, impl="reference". For input
    (..., D) and W (V, D) the loss of the (M, V) rows of its M tokens, shaped like the target's tokens."""
    classes, features = weight.size(0), weight.size(-1)
    logits = F.linear(input, weight.reshape(-1, features), None if bias is None else bias.reshape(-1))
    if weight.dim() > 2:
        logits = logits.reshape(input.size(0), *weight.shape[:-1])
        return _logits_loss(logits, target, class_weight, ignore_index, reduction, label_smoothing, spec, impl)
    soft = target.is_floating_point()
    flat = target.reshape(-1, classes) if soft else target.reshape(-1)
    out = _logits_loss(logits.reshape(-1, classes), flat, class_weight, ignore_index, reduction, label_smoothing,
                       spec, impl)
    return out.reshape(target.shape[:-1] if soft else target.shape) if reduction == "none" else out


def _linear_loss(input, weight, bias, target, spec, label_smoothing, ignore_index, reduction, impl, chunk_size,
                 class_weight=None):
    if autocast.active(input):  # as torch's autocast runs cross-entropy: logits and loss in float32
        with autocast.suspended(input):
            input, weight, bias, target, class_weight = autocast.float32(input, weight, bias, target, class_weight)
            return _linear_loss(input, weight, bias, target, spec, label_smoothing, ignore_index, reduction, impl,
                                chunk_size, class_weight)
    _check_shapes(input, weight, bias, target, chunk_size)
    class_weight = _check_weight(class_weight, weight.size(0))
    soft = target.is_floating_point()
    ignore_index = _torch_ignore_index(ignore_index, soft)
    sharded = _class_sharded(input, weight, bias, target, class_weight, spec, label_smoothing, ignore_index, reduction,
                             impl, chunk_size)
    if sharded is not None:
        return sharded
    if impl == "reference" or weight.dim() > 2 or weight.size(0) == 1 or (impl == "auto" and _transformed()):
        return _full_logits_loss(input, weight, bias, target, class_weight, spec, label_smoothing, ignore_index,
                                 reduction, impl)
    if class_weight is None and not soft:
        epsilon = fairseq_epsilon(label_smoothing, weight.size(0))
        loss, _, _ = fused_linear_encouraging_loss(input, weight, bias, target, epsilon, spec, ignore_index,
                                                   reduce=reduction != "none", impl=impl, chunk_size=chunk_size)
        loss = loss.to(input.dtype) if input.dtype in (torch.float16, torch.bfloat16) else loss
        if reduction == "none":
            return loss.reshape(target.shape)
        if reduction == "sum":
            return loss
        # like torch: the mean over non-ignored targets (nan if none, with a zero gradient)
        return mean_over_count(loss, target.ne(ignore_index).sum())
    return _torch_semantics_loss(input, weight, bias, target, class_weight, spec, label_smoothing, ignore_index,
                                 reduction, impl, chunk_size)


def _class_sharded(input, weight, bias, target, class_weight, spec, label_smoothing, ignore_index, reduction, impl,
                   chunk_size):
    """impl "auto" on a DTensor weight sharded on the classes (Shard(0), a vocabulary-parallel projection): the
    vocabulary-parallel linear loss (a Replicate DTensor; el_fairseq/parallel/dtensor.py), else None."""
    hook = parallel_hook("class_sharded_linear_loss", weight) if impl == "auto" else None
    if hook is None:
        return None
    return hook(input, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing, spec, chunk_size)


def _tensor_parallel_input(linear, input):
    """A plain input of a module whose projection is a DTensor (tensor-parallel) as el_fairseq/parallel's
    tensor_parallel_input makes it (a Replicate DTensor on the weight's mesh); else `input` as it is."""
    hook = parallel_hook("tensor_parallel_input", linear.weight)
    return input if hook is None else hook(linear, input)


def _torch_semantics_loss(input, weight, bias, target, class_weight, spec, label_smoothing, ignore_index, reduction,
                          impl, chunk_size):
    """Class weights and probability targets (encouraging_loss's semantics, api.py), over chunks."""
    vocab, soft = weight.size(0), target.is_floating_point()
    rows_shape = target.shape[:-1] if soft else target.shape
    x = input.reshape(-1, input.size(-1))
    flat = target.reshape(-1, vocab) if soft else target.reshape(-1)
    smoothed = label_smoothing > 0.0 or (spec.active and spec.epsilon > 0.0)
    reduce = reduction != "none"
    if soft or smoothed:
        _unfused(impl, "probability targets" if soft else "weight with label_smoothing or bonus_label_smoothing")
        if not soft:
            check_targets(flat, vocab, ignore_index)
        options = linear_ops.Options(0.0, label_smoothing, spec, ignore_index, linear_ops.CLASS_WEIGHTED,
                                     chunk_size or default_chunk_size(vocab))
        loss = _operator_loss(x, weight, bias, flat, class_weight, options, reduce)[0]
    else:  # a weight without smoothing scales the fused per-token loss: w_y (CE + rho b(p_y))
        loss = fused_linear_encouraging_loss(x, weight, bias, flat, 0.0, spec, ignore_index, reduce=False, impl=impl,
                                             chunk_size=chunk_size)[0]
        loss = loss * class_weight.to(loss.dtype)[flat.masked_fill(flat.eq(ignore_index), 0)]  # 0 at ignored
        loss = loss.sum() if reduce else loss
    if soft:
        count = flat.size(0)  # torch: the mean over rows
    else:
        kept = flat.ne(ignore_index)
        w_y = class_weight.to(loss.dtype)[flat.masked_fill(~kept, 0)]
        count = w_y.masked_fill(~kept, 0.0).sum()
    if reduction == "none":
        out = loss.reshape(rows_shape)
    else:
        out = loss if reduction == "sum" else mean_over_count(loss, count)
    return out.to(input.dtype) if input.dtype in (torch.float16, torch.bfloat16) else out


class EncouragingLinearLoss(torch.nn.Module):
    """`nn.LinearCrossEntropyLoss`-like module: owns the projection (self.linear, an nn.Linear
    in_features -> num_classes * prod(out_features)) and returns the encouraging loss of its output without
    the logits.

        head = EncouragingLinearLoss(512, 32000, log_end=0.75)
        loss = head(hidden, target)            # hidden (..., 512), target (...)

    out_features (d1, ..., dK): torch's K-dimensional loss, self.linear's weight and bias read as
    (C, d1, ..., dK, D) and (C, d1, ..., dK) (see encouraging_linear_loss). Options as in
    encouraging_linear_loss (defaults of the authors' EncouragingLoss.py).
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 weight=None, log_end=0.75, reduction="mean", bonus="log", bonus_rho=1.0, bonus_label_smoothing=0.0,
                 bonus_gamma=1.0, bonus_start=0.0, label_smoothing=0.0, ignore_index=-100, impl="auto",
                 chunk_size=None):
        super().__init__()
        check_options(label_smoothing, reduction, impl)
        self.spec = make_spec(bonus, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho)
        self.num_classes, self.out_features = num_classes, _check_out_features(out_features)
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)
        self.register_buffer("weight", _check_weight(weight, num_classes))  # class weights, as in torch
        self.label_smoothing, self.ignore_index, self.reduction = label_smoothing, ignore_index, reduction
        self.impl, self.chunk_size = impl, chunk_size

    def forward(self, input, target):
        input = _tensor_parallel_input(self.linear, input)
        shape = (self.num_classes, *self.out_features)
        weight = self.linear.weight.reshape(*shape, self.linear.in_features)
        bias = None if self.linear.bias is None else self.linear.bias.reshape(shape)
        return _linear_loss(input, weight, bias, target, self.spec, self.label_smoothing, self.ignore_index,
                            self.reduction, self.impl, self.chunk_size, self.weight)

    def extra_repr(self):
        s = self.spec
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"ignore_index={self.ignore_index}, bonus={s.kind!r}, log_end={s.log_end}, bonus_rho={s.rho}, "
                f"bonus_label_smoothing={s.epsilon}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, impl={self.impl!r}, chunk_size={self.chunk_size}")

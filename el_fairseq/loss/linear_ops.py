"""The fused linear loss's chunk pass and its `torch.library` operators, namespace `el_fairseq`: one per
reduction family, as torch's own chunked `linear_cross_entropy` (torch/nn/modules/linear_cross_entropy.py).

Per chunk of C rows, x_c (C, D), W (V, D) (linear.py's docstring):

    z_c = x_c W^T + b,   loss_c, g_c = kernel(z_c, target_c),   grad_x_c = g_c W,
    grad_W += g_c^T x_c,   grad_b += sum_rows g_c,   grad_t_c (probability targets: d loss_c / d t_c)

    el_fairseq::linear_loss_summed(...) -> (loss, nll, stats, grad_input, grad_weight, grad_bias, grad_target)
        reduction "sum"/"mean": sum_i loss_i, and the gradients of that sum computed in the same pass (those
        not asked for are empty); its backward only multiplies them by the scalar grad_output (in place in
        eager, as before the operators; out of place under torch.compile, which cannot keep the in-place
        rule's one-backward guard) and rounds them to each input's dtype.
    el_fairseq::linear_loss_per_token(...) -> (loss, nll, stats)
        reduction "none": loss_i per row, no gradient in the forward; its backward is
    el_fairseq::linear_loss_per_token_backward(grad_loss, ...) -> (grad_input, grad_weight, grad_bias, grad_target)
        the chunk pass again with each row's gradient scaled by grad_loss_i (one more matmul per chunk).

loss and nll are in the compute dtype (float32, float64 for float64 input), stats (N, 2) float32 [z_y, margin].
Each has a fake implementation (shapes and dtypes: what torch.compile traces), an autograd rule for the
forward ones (double backward refused: it needs impl="reference") and a vmap rule: the per-token one folds
the vmapped dimension into the rows when the projection is shared, the others run each sample in turn.

`kernel` names the per-chunk kernel: "class_weighted" (class_weighted_kernel with `class_weight` and
`label_smoothing`), or an impl of dispatch.py ("native", "triton", "chunked", or "auto"), resolved by
dispatch.checked_path inside the operator on the chunk logits' dtype and device (the first-use self-check,
cached per process: a name the caller has resolved already comes back unchanged). Eager callers pass the
resolved name; a compiled graph or a vmapped call, which cannot run the self-check while it is traced,
passes the impl asked for.
"""
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch._C import DispatchKey

from . import autocast, dispatch
from .bonus import BonusSpec
from .chunked import compute_dtype
from .diagnostics import token_stats_from_logits
from .fused import refuse_double_backward
from .ops import spec_from_args, spec_to_args
from .reference import class_weighted_loss

NO_GRADIENT = (False, False, False, False)
CLASS_WEIGHTED = "class_weighted"


# ---------------------------------------------------------------------------------------------------------
# The chunk pass (plain tensors: every operator's real implementation, and linear.py's autograd Functions
# for a callable kernel, the vocabulary-parallel one)


def chunk_pass(x, w, b, target, epsilon, spec, ignore_index, kernel, step, needs, row_scale=None):
    """One pass over the row chunks. Returns (loss, nll, stats, grads) with per-token loss/nll (N,),
    stats (N, 2) and grads = [grad_x, grad_w, grad_b, grad_target] in the compute dtype (None where not
    in `needs`, the flags of the same four; grad_target, d loss_i / d target_i (N, V), is for probability
    targets and a kernel that takes `target_grad_out`). row_scale (N,): multiplies each row's gradient."""
    with autocast.suspended(x):  # every op here in `work` (float32/64), also inside torch.autocast
        return _chunk_pass_in_work_dtype(x, w, b, target, epsilon, spec, ignore_index, kernel, step, needs,
                                         row_scale)


def accumulate_projection_grads(g, x_c, w, rows, grad_x, grad_w, grad_b):
    """One chunk's share of the projection's gradients, from g = dL/dz_c (C, V) for z_c = x_c W^T + b:
    grad_x[rows] = g W, grad_W += g^T x_c, grad_b += the column sums of g (each skipped where None)."""
    if grad_x is not None:
        torch.mm(g, w, out=grad_x[rows])
    if grad_w is not None:
        grad_w.addmm_(g.t(), x_c)
    if grad_b is not None:
        grad_b.add_(g.sum(0))


def _chunk_pass_in_work_dtype(x, w, b, target, epsilon, spec, ignore_index, kernel, step, needs, row_scale):
    n, vocab = x.size(0), w.size(0)
    work = compute_dtype(x.dtype)
    w_work = w.detach().to(work)
    b_work = b.detach().to(work) if b is not None else None
    loss = x.new_zeros(n, dtype=work)
    nll = torch.zeros_like(loss)
    stats = x.new_zeros(n, 2, dtype=torch.float32)
    want = any(needs[:3])  # a gradient through the logits
    grad_x = x.new_empty(x.shape, dtype=work) if needs[0] else None
    grad_w = torch.zeros_like(w_work) if needs[1] else None
    grad_b = w_work.new_zeros(vocab) if needs[2] else None
    grad_t = x.new_zeros(target.shape, dtype=work) if needs[3] else None
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        x_c = x[rows].detach().to(work)
        z = F.linear(x_c, w_work, b_work)
        out = {} if grad_t is None else {"target_grad_out": grad_t[rows]}
        loss_c, nll_c, stats_c, g = kernel(z, target[rows], epsilon, spec, ignore_index, need_grad=want, **out)
        del z
        loss[rows], nll[rows], stats[rows] = loss_c, nll_c, stats_c
        if grad_t is not None and row_scale is not None:
            grad_t[rows].mul_(row_scale[rows].to(work).unsqueeze(-1))
        if not want:
            continue
        if row_scale is not None:
            g.mul_(row_scale[rows].to(g.dtype).unsqueeze(-1))
        accumulate_projection_grads(g, x_c, w_work, rows, grad_x, grad_w, grad_b)
        del g  # before the next chunk's logits: two (chunk, V) buffers at a time, not three
    return loss, nll, stats, [grad_x, grad_w, grad_b, grad_t]


def class_weighted_kernel(class_weight, label_smoothing):
    """A per-chunk kernel (dispatch.KERNELS' interface) for what the fused kernels do not take: class
    weights with label smoothing, and probability targets. reference.class_weighted_loss on the chunk's
    logits (torch's conventions, `epsilon` unused), its gradient by autograd: a few (chunk, V) temporaries,
    still never (N, V). nll: -sum_j t_j log p_j; stats: [z_y, margin] for class indices, zeros for
    probabilities (no single target). target_grad_out (chunk, V), for probabilities: receives
    d loss_i / d t_ij = w_j [(1 - eps) (-log p_j) + rho (1 - eps_b) b(p_j)] (the loss is linear in t),
    by autograd w.r.t. the chunk's target too."""
    def kernel(z, target, epsilon, spec, ignore_index, need_grad=True, target_grad_out=None):
        soft = target.is_floating_point()
        kept = None if soft else target.ne(ignore_index)
        safe = target.detach().to(z.dtype) if soft else target.masked_fill(~kept, 0)
        w = None if class_weight is None else class_weight.to(device=z.device, dtype=z.dtype)
        with autograd_within_operator(), torch.enable_grad():
            z = z.detach().requires_grad_(need_grad)
            if target_grad_out is not None:
                safe = safe.detach().requires_grad_(True)
            lprobs = torch.log_softmax(z, dim=-1)
            loss = class_weighted_loss(lprobs, safe, w, label_smoothing, spec)
            if kept is not None:
                loss = loss.masked_fill(~kept, 0.0)
            wrt = [t for t, wanted in ((z, need_grad), (safe, target_grad_out is not None)) if wanted]
            grads = torch.autograd.grad(loss.sum(), wrt) if wrt else ()
        grad = grads[0] if need_grad else None
        if target_grad_out is not None:
            target_grad_out.copy_(grads[-1])
        with torch.no_grad():
            if soft:
                nll = class_weighted_loss(lprobs, safe, None, 0.0, BonusSpec(rho=0.0))
                stats = z.new_zeros(z.size(0), 2, dtype=torch.float32)
            else:
                nll = -lprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(~kept, 0.0)
                stats = token_stats_from_logits(z, target, ignore_index)
        return loss.detach(), nll, stats, grad
    return kernel


def autograd_within_operator():
    """A context in which autograd records again inside an operator's real implementation (below the
    Autograd dispatch keys, which the operator's autograd rule excludes), as torch's higher-order operators
    re-enter it: class_weighted_kernel differentiates its chunk's plain-torch loss there. Elsewhere a no-op."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (DispatchKey.AutogradFunctionality, DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def resolve_kernel(kernel, x, vocab, epsilon, spec, ignore_index, check_spec=None, class_weight=None,
                   label_smoothing=0.0):
    """The per-chunk kernel function named by `kernel` (module docstring) for input rows `x` (plain tensors)."""
    if kernel == CLASS_WEIGHTED:
        return class_weighted_kernel(class_weight, label_smoothing)
    proto = x.new_empty(0, vocab, dtype=compute_dtype(x.dtype))  # the chunk logits' dtype and device
    return dispatch.KERNELS[dispatch.checked_path(proto, kernel, epsilon, spec, ignore_index, check_spec)]()


# ---------------------------------------------------------------------------------------------------------
# The operators' arguments


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything an operator takes besides its tensors, as the schema spells it (`args()`, in order: kernel,
    bonus, coefficients, ignore_index, chunk_size, check_rho). The numbers travel as one list of floats,
    [epsilon, label_smoothing, log_end, bonus_gamma, bonus_start, bonus_label_smoothing, bonus_rho]: custom_op's
    autograd wrapper walks the schema once per argument per call, so a short schema is a cheaper eager call."""

    epsilon: float  # fairseq's smoothing (fused kernels); class_weighted: unused, 0
    label_smoothing: float  # torch's, for class_weighted
    spec: BonusSpec
    ignore_index: Optional[int]
    kernel: str
    chunk_size: int
    check_rho: Optional[float] = None  # the run's configured rho for the self-check (a bonus schedule's)

    def args(self):
        bonus, *numbers = spec_to_args(self.spec)
        coefficients = [float(self.epsilon), float(self.label_smoothing), *numbers]
        return self.kernel, bonus, coefficients, self.ignore_index, self.chunk_size, self.check_rho

    @classmethod
    def from_args(cls, kernel, bonus, coefficients, ignore_index, chunk_size, check_rho):
        epsilon, label_smoothing, *numbers = coefficients
        return cls(epsilon, label_smoothing, spec_from_args(bonus, *numbers), ignore_index, kernel, chunk_size,
                   check_rho)

    def check_spec(self):
        return None if self.check_rho is None else dataclasses.replace(self.spec, rho=self.check_rho)


NUM_OPTIONS = 6  # len(Options(...).args())


def _run_chunks(x, w, b, target, class_weight, options, needs, row_scale=None):
    kernel = resolve_kernel(options.kernel, x, w.size(0), options.epsilon, options.spec, options.ignore_index,
                            options.check_spec(), class_weight, options.label_smoothing)
    return chunk_pass(x, w, b, target, options.epsilon, options.spec, options.ignore_index, kernel,
                      options.chunk_size, needs, row_scale)


def _needs(bias, needs):
    """The four gradient flags [input, weight, bias, target] of a call, the bias's off where there is none."""
    return needs[0], needs[1], bias is not None and needs[2], needs[3]


def _gradients(grads, needs, input, weight, target, work):
    """The four gradients as operator outputs: those not asked for as empty tensors of their rank."""
    shapes = (input.shape, weight.shape, weight.shape[:1], target.shape)
    likes = (input, weight, weight, input)
    return tuple(g if wanted else _empty(like, len(shape), work)
                 for g, wanted, like, shape in zip(grads, needs, likes, shapes))


def _fake_gradients(needs, input, weight, target, work):
    shapes = (input.shape, weight.shape, weight.shape[:1], target.shape)
    likes = (input, weight, weight, input)
    return tuple(like.new_empty(tuple(shape), dtype=work) if wanted else _empty(like, len(shape), work)
                 for wanted, like, shape in zip(needs, likes, shapes))


def _empty(like, rank, dtype):
    return like.new_empty((0,) * rank, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# reduction "sum"/"mean": the gradients computed in the forward


@torch.library.custom_op("el_fairseq::linear_loss_summed", mutates_args=())
def linear_loss_summed(
        input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
        class_weight: Optional[torch.Tensor], kernel: str, bonus: str, coefficients: list[float],
        ignore_index: Optional[int], chunk_size: int, check_rho: Optional[float], in_place_backward: bool,
        needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_i loss_i, nll (N,), stats (N, 2), grad_input, grad_weight, grad_bias, grad_target) of input (N, D),
    weight (V, D), bias (V,) or None, target (N,) class indices or (N, V) probabilities: each gradient that of
    the summed loss, in the compute dtype, where `needs` [input, weight, bias, target] asks for it, else empty.
    in_place_backward: the backward scales the kept gradients in place (eager; one backward per forward)."""
    options = Options.from_args(kernel, bonus, coefficients, ignore_index, chunk_size, check_rho)
    needs = _needs(bias, needs)
    loss, nll, stats, grads = _run_chunks(input, weight, bias, target, class_weight, options, needs)
    return (loss.sum(), nll, stats, *_gradients(grads, needs, input, weight, target, loss.dtype))


@linear_loss_summed.register_fake
def _summed_fake(input, weight, bias, target, class_weight, kernel, bonus, coefficients, ignore_index, chunk_size,
                 check_rho, in_place_backward, needs):
    work, n = compute_dtype(input.dtype), input.size(0)
    return (input.new_empty((), dtype=work), input.new_empty(n, dtype=work),
            input.new_empty(n, 2, dtype=torch.float32), *_fake_gradients(_needs(bias, needs), input, weight, target,
                                                                         work))


def _summed_setup_context(ctx, inputs, output):
    input, weight, bias, target = inputs[:4]
    in_place, needs = inputs[-2:]
    # The gradients are forward outputs: kept detached (no reference cycle through the node, as torch's op).
    ctx.grads = [g.detach() if wanted else None for g, wanted in zip(output[3:], _needs(bias, needs))]
    ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype, target.dtype)
    ctx.in_place = in_place
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without gradient: (V, D) for grad_weight


def _summed_backward(ctx, grad_loss, *unused):
    refuse_double_backward("encouraging_linear_loss's fused chunks")
    if grad_loss is None:  # the loss is not what is differentiated (grads are not materialized)
        return (None,) * (5 + NUM_OPTIONS + 2)
    grads = ctx.grads
    if ctx.in_place:
        if grads is None:
            raise RuntimeError("el_fairseq: encouraging_linear_loss keeps its gradients from the forward and "
                               "scales them in place, so it allows one backward per forward: compute the loss again")
        # Handed over, not kept: the gradient that reaches a parameter's .grad is then referenced by autograd
        # alone, which takes it as the .grad instead of copying it (a (V, D) copy and its memory otherwise).
        ctx.grads = None
    out = []
    for g, dtype in zip(grads, ctx.dtypes):
        if g is None:
            out.append(None)
            continue
        scale = grad_loss.to(g.dtype)
        out.append((g.mul_(scale) if ctx.in_place else g * scale).to(dtype))
    del grads
    return (*out, *[None] * (1 + NUM_OPTIONS + 2))  # class_weight, the options, in_place_backward, needs


linear_loss_summed.register_autograd(_summed_backward, setup_context=_summed_setup_context)


# ---------------------------------------------------------------------------------------------------------
# reduction "none": the loss in the forward, the gradients recomputed in backward


@torch.library.custom_op("el_fairseq::linear_loss_per_token", mutates_args=())
def linear_loss_per_token(
        input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
        class_weight: Optional[torch.Tensor], kernel: str, bonus: str, coefficients: list[float],
        ignore_index: Optional[int], chunk_size: int, check_rho: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (N,), nll (N,), stats (N, 2)) per row of input (N, D), weight (V, D), bias, target (N,) or (N, V)."""
    options = Options.from_args(kernel, bonus, coefficients, ignore_index, chunk_size, check_rho)
    loss, nll, stats, _ = _run_chunks(input, weight, bias, target, class_weight, options, NO_GRADIENT)
    return loss, nll, stats


@linear_loss_per_token.register_fake
def _per_token_fake(input, weight, bias, target, class_weight, *options):
    work, n = compute_dtype(input.dtype), input.size(0)
    return input.new_empty(n, dtype=work), input.new_empty(n, dtype=work), input.new_empty(n, 2, dtype=torch.float32)


@torch.library.custom_op("el_fairseq::linear_loss_per_token_backward", mutates_args=())
def linear_loss_per_token_backward(
        grad_loss: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
        target: torch.Tensor, class_weight: Optional[torch.Tensor], kernel: str, bonus: str,
        coefficients: list[float], ignore_index: Optional[int], chunk_size: int, check_rho: Optional[float],
        needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of sum_i grad_loss_i loss_i (linear_loss_per_token's loss), in the compute dtype, each
    where `needs` [input, weight, bias, target] asks for it, else empty."""
    options = Options.from_args(kernel, bonus, coefficients, ignore_index, chunk_size, check_rho)
    needs = _needs(bias, needs)
    _, _, _, grads = _run_chunks(input, weight, bias, target, class_weight, options, needs, row_scale=grad_loss)
    return _gradients(grads, needs, input, weight, target, compute_dtype(input.dtype))


@linear_loss_per_token_backward.register_fake
def _per_token_backward_fake(grad_loss, input, weight, bias, target, class_weight, kernel, bonus, coefficients,
                             ignore_index, chunk_size, check_rho, needs):
    return _fake_gradients(_needs(bias, needs), input, weight, target, compute_dtype(input.dtype))


def _per_token_setup_context(ctx, inputs, output):
    input, weight, bias, target, class_weight, *options = inputs
    # Detached: the backward recomputes from the values, it does not differentiate through them (as torch's op).
    ctx.save_for_backward(input.detach(), weight.detach(), None if bias is None else bias.detach(), target.detach(),
                          None if class_weight is None else class_weight.detach())
    ctx.options = options
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _per_token_backward(ctx, grad_loss, grad_nll, grad_stats):
    refuse_double_backward("encouraging_linear_loss's fused chunks")
    if grad_loss is None:
        return (None,) * (5 + NUM_OPTIONS)
    input, weight, bias, target, class_weight = ctx.saved_tensors
    needs = _needs(bias, ctx.needs_input_grad[:4])
    grads = linear_loss_per_token_backward(grad_loss, input, weight, bias, target, class_weight, *ctx.options,
                                           list(needs))
    rounded = [g.to(t.dtype) if wanted else None for g, wanted, t in zip(grads, needs, (input, weight, bias, target))]
    return (*rounded, *[None] * (1 + NUM_OPTIONS))


linear_loss_per_token.register_autograd(_per_token_backward, setup_context=_per_token_setup_context)


# ---------------------------------------------------------------------------------------------------------
# vmap


def _per_sample(op, info, in_dims, args):
    """The vmap rule of any of the operators: `op` on each sample in turn, the outputs stacked (as torch's)."""
    moved = [a.movedim(d, 0) if d is not None and torch.is_tensor(a) else a for a, d in zip(args, in_dims)]
    outputs = [op(*[a[i] if d is not None and torch.is_tensor(a) else a for a, d in zip(moved, in_dims)])
               for i in range(info.batch_size)]
    return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])


@linear_loss_per_token.register_vmap
def _per_token_vmap(info, in_dims, input, weight, bias, target, class_weight, *options):
    """A shared projection (weight, bias, class weights not vmapped): the samples' rows are rows of one call,
    loss (B * N,) read back as (B, N); else each sample in turn."""
    args = (input, weight, bias, target, class_weight, *options)
    input_dim, target_dim = in_dims[0], in_dims[3]
    if any(d is not None for d in in_dims[1:3] + in_dims[4:]):
        return _per_sample(linear_loss_per_token, info, in_dims, args)
    size = info.batch_size
    input = input.movedim(input_dim, 0) if input_dim is not None else input.expand(size, *input.shape)
    target = target.movedim(target_dim, 0) if target_dim is not None else target.expand(size, *target.shape)
    rows = input.size(1)
    out = linear_loss_per_token(input.reshape(size * rows, input.size(-1)),
                                weight, bias, target.reshape(size * rows, *target.shape[2:]), class_weight, *options)
    return tuple(o.reshape(size, rows, *o.shape[1:]) for o in out), (0, 0, 0)


@linear_loss_summed.register_vmap
def _summed_vmap(info, in_dims, *args):
    return _per_sample(linear_loss_summed, info, in_dims, args)


@linear_loss_per_token_backward.register_vmap
def _per_token_backward_vmap(info, in_dims, *args):
    return _per_sample(linear_loss_per_token_backward, info, in_dims, args)

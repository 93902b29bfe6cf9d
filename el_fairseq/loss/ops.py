"""The fused kernels and the target check as `torch.library` operators, namespace `el_fairseq`.

An operator is what torch.compile, torch.func and torch.library.opcheck see of a kernel: a schema of
tensors and primitives, a real implementation (the kernel itself, unchanged), a fake one (shapes and
dtypes only, what a FakeTensor trace runs), an autograd rule and, where the loss is per row, a vmap rule.
The public functions (api.py, linear.py) call these instead of the kernels' Python entries, so that a
compiled graph holds each kernel as one node and no data-dependent Python runs while it is traced.

    el_fairseq::checked_targets(target, num_classes, ignore_index, kept) -> safe target
        the class indices with ignored ones set to 0; raises the one-line ValueError naming the bad
        target range when an index other than ignore_index lies outside [0, num_classes).

A BonusSpec crosses a schema as primitives: `spec_to_args` / `spec_from_args`.
"""
from typing import Optional

import torch

from . import chunked, fused, kernel_inputs, native, self_check, triton_kernel
from .bonus import BonusSpec

# BonusSpec's fields in the order that `spec_to_args` gives them and a schema takes them.
SPEC_FIELDS = ("kind", "log_end", "gamma", "start", "epsilon", "rho")


def spec_to_args(spec: BonusSpec) -> tuple:
    """(kind: str, log_end, gamma, start, epsilon, rho: float): a BonusSpec as a custom_op schema takes it."""
    return (str(spec.kind), float(spec.log_end), float(spec.gamma), float(spec.start), float(spec.epsilon),
            float(spec.rho))


def spec_from_args(kind, log_end, gamma, start, epsilon, rho) -> BonusSpec:
    """The BonusSpec of `spec_to_args`'s primitives (its option checks run again: a schema call can be made
    by hand)."""
    return BonusSpec(kind, log_end, gamma, start, epsilon, rho)


# ---------------------------------------------------------------------------------------------------------
# The target check


def raise_out_of_range(safe, num_classes, ignore_index):
    """The eager check: every index of `safe` (ignored ones already 0) lies in [0, num_classes); else the
    one-line ValueError with the range found. One min/max pass, one device sync (as before the operators)."""
    if safe.numel():
        low, high = (int(v) for v in torch.aminmax(safe))
        if low < 0 or high >= num_classes:
            raise ValueError(f"target values must be in [0, {num_classes}) or ignore_index {ignore_index}, "
                             f"got {low}..{high}")


def _safe_targets(target, ignore_index, kept):
    if ignore_index is None:
        return target.clone()  # an operator's output may not alias its input
    return target.masked_fill(target.eq(ignore_index) if kept is None else ~kept, 0)


@torch.library.custom_op("el_fairseq::checked_targets", mutates_args=())
def checked_targets(target: torch.Tensor, num_classes: int, ignore_index: Optional[int],
                    kept: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The class indices `target` with those equal to ignore_index (or outside the mask `kept` where the
    caller has it) set to 0, after checking that the others lie in [0, num_classes)."""
    safe = _safe_targets(target, ignore_index, kept)
    raise_out_of_range(safe, num_classes, ignore_index)
    return safe


@checked_targets.register_fake
def _checked_targets_fake(target, num_classes, ignore_index, kept=None):
    return torch.empty_like(target)


@checked_targets.register_vmap
def _checked_targets_vmap(info, in_dims, target, num_classes, ignore_index, kept=None):
    """The whole batch of targets at once (the check holds for every sample or the call fails), with the
    mask batched like them."""
    target_dim, kept_dim = in_dims[0], (in_dims[3] if len(in_dims) > 3 else None)
    if kept is not None and kept_dim != target_dim:  # line the two up: both batched on dim 0, or neither
        target = target if target_dim is None else target.movedim(target_dim, 0)
        kept = kept if kept_dim is None else kept.movedim(kept_dim, 0)
        size = info.batch_size
        target = target if target_dim is not None else target.expand(size, *target.shape)
        kept = kept if kept_dim is not None else kept.expand(size, *kept.shape)
        target_dim = 0
    return checked_targets(target, num_classes, ignore_index, kept), target_dim


# The check's output is used downstream where the caller uses it (api.py's safe targets); a caller that
# only checks (linear.py, vocab_parallel.py) drops it, and a compiled graph would drop the check with it
# (dead code): marked as having a side effect (raising), the graph keeps it.
torch.fx.node.has_side_effect(torch.ops.el_fairseq.checked_targets.default)


# ---------------------------------------------------------------------------------------------------------
# The fused kernels
#
#   el_fairseq::native_loss / chunked_loss / triton_loss(logits (N, V), target (N,), epsilon, ignore_index,
#       need_grad, kind, log_end, gamma, start, bonus_epsilon, rho) -> (loss (N,), nll (N,), stats (N, 2), grad)
#
# each the kernel of native.py / chunked.py / triton_kernel.py as it is: per-row loss, nll and stats and
# the gradient of the summed loss w.r.t. the logits, (N, V) (an empty (0, 0) tensor without need_grad).
# Their autograd rule (fused.py) keeps only that gradient and scales it by the incoming one; their vmap
# rule folds the vmapped dimension into the rows (the loss is per row).


def _grad_dtype(impl, logits):
    return torch.float32 if impl == "native" else chunked.gradient_dtype(logits.dtype)


def _stats_dtype(impl, logits):
    return chunked.compute_dtype(logits.dtype) if impl == "chunked" else torch.float32


def _outputs_like(impl, logits, need_grad):
    """Empty outputs with the shapes, dtypes and strides that `impl`'s kernel returns (the fake kernel)."""
    n = logits.size(0)
    dtype = _stats_dtype(impl, logits)
    loss = logits.new_empty(n, dtype=dtype)
    stats = logits.new_empty(n, 2, dtype=dtype)
    if not need_grad:
        grad = logits.new_empty(0, 0, dtype=_grad_dtype(impl, logits))
    elif impl == "chunked":  # zeros_like / empty_like of the logits: their strides where dense
        grad = torch.empty_like(logits, dtype=_grad_dtype(impl, logits))
    else:  # native: of contiguous logits; triton: of logits with unit column stride
        grad = torch.empty_like(logits if impl == "triton" and logits.stride(-1) == 1 else logits.contiguous(),
                                dtype=_grad_dtype(impl, logits))
    return loss, torch.empty_like(loss), stats, grad


KERNELS = {"native": lambda: native.forward, "chunked": lambda: chunked.forward, "triton": lambda: triton_kernel.forward}


def _run_kernel(impl, logits, target, epsilon, ignore_index, need_grad, spec_args):
    spec = spec_from_args(*spec_args)
    kernel = impl
    if impl != "chunked" and not kernel_inputs.traced(logits):
        # The first-use self-check (self_check.py), here on concrete values: eager calls made it already
        # (dispatch.checked_path, a cached lookup now), a compiled graph's options may have been symbols.
        # (A triton_op's kernel is also traced with FakeTensors: nothing to check then.)
        with torch._C._DisableFuncTorch():
            kernel = self_check.kernel_or_chunked(impl, KERNELS[impl](), logits, epsilon, spec, ignore_index)
    loss, nll, stats, grad = KERNELS[kernel]()(logits, target, epsilon, spec, ignore_index, need_grad=need_grad)
    if grad is None:
        grad = logits.new_empty(0, 0, dtype=_grad_dtype(impl, logits))
    if kernel != impl:  # the chunked fallback, in the dtypes of `impl`'s outputs (the fake kernel's)
        like = _outputs_like(impl, logits, need_grad)
        loss, nll, stats, grad = (t.to(w.dtype) for t, w in zip((loss, nll, stats, grad), like))
    return loss, nll, stats, grad


def _vmap_rows(op):
    """vmap rule of a per-row kernel operator: the vmapped dimension of logits (B, N, V) and target (B, N)
    becomes rows, (B N, V) and (B N,); outputs are split back, batched on dimension 0."""
    def rule(info, in_dims, logits, target, *rest):
        logits_dim, target_dim = in_dims[0], in_dims[1]
        size = info.batch_size
        logits = logits.movedim(logits_dim, 0) if logits_dim is not None else logits.expand(size, *logits.shape)
        target = target.movedim(target_dim, 0) if target_dim is not None else target.expand(size, *target.shape)
        rows, vocab = logits.size(1), logits.size(2)
        loss, nll, stats, grad = op(logits.reshape(size * rows, vocab), target.reshape(size * rows), *rest)
        grad = grad.reshape(size, rows, vocab) if grad.numel() or rows * vocab == 0 else grad.new_empty(size, 0, 0)
        return (loss.reshape(size, rows), nll.reshape(size, rows), stats.reshape(size, rows, 2), grad), (0, 0, 0, 0)
    return rule


def _register(op, impl):
    @op.register_fake
    def _fake(logits, target, epsilon, ignore_index, need_grad, *spec_args):
        return _outputs_like(impl, logits, need_grad)

    op.register_autograd(fused.backward, setup_context=fused.setup_context)
    op.register_vmap(_vmap_rows(op))
    return op


@torch.library.custom_op("el_fairseq::native_loss", mutates_args=())
def native_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: Optional[int],
                need_grad: bool, kind: str, log_end: float, gamma: float, start: float, bonus_epsilon: float,
                rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """native.forward (the C kernel, float32 CPU logits) as an operator."""
    return _run_kernel("native", logits, target, epsilon, ignore_index, need_grad,
                       (kind, log_end, gamma, start, bonus_epsilon, rho))


@torch.library.custom_op("el_fairseq::chunked_loss", mutates_args=())
def chunked_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: Optional[int],
                 need_grad: bool, kind: str, log_end: float, gamma: float, start: float, bonus_epsilon: float,
                 rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunked.forward (torch ops over row chunks, any device and float dtype) as an operator. Opaque to
    torch.compile: its chunk loop skips padding rows by their values, which a trace cannot."""
    return _run_kernel("chunked", logits, target, epsilon, ignore_index, need_grad,
                       (kind, log_end, gamma, start, bonus_epsilon, rho))


def _triton_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float, ignore_index: Optional[int],
                 need_grad: bool, kind: str, log_end: float, gamma: float, start: float, bonus_epsilon: float,
                 rho: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """triton_kernel.forward (the Triton kernel, launched through torch.library.wrap_triton) as an operator."""
    return _run_kernel("triton", logits, target, epsilon, ignore_index, need_grad,
                       (kind, log_end, gamma, start, bonus_epsilon, rho))


if triton_kernel.available() and not triton_kernel.interpreted() and torch.cuda.is_available():
    # A triton_op: torch.compile sees the kernel launch itself (inductor can schedule it), its fake kernel
    # is the function traced with FakeTensors. Only where CUDA is (Triton launches there): registering one
    # imports torch._dynamo, which a CPU-only process need not load to import the loss.
    triton_loss = torch.library.triton_op("el_fairseq::triton_loss", _triton_loss, mutates_args=())
    triton_loss.register_autograd(fused.backward, setup_context=fused.setup_context)
    triton_loss.register_vmap(_vmap_rows(triton_loss))
else:
    # Under Triton's CPU interpreter (TRITON_INTERPRET=1) @triton.jit gives an InterpretedFunction, which
    # torch.library.wrap_triton hands back unwrapped (it runs eagerly but cannot be traced: a FakeTensor has
    # no data pointer), so a triton_op's fake kernel, the function itself, cannot run. There, and where
    # triton or CUDA is missing, the kernel is an opaque custom_op with a fake kernel of its own.
    triton_loss = _register(torch.library.custom_op("el_fairseq::triton_loss", _triton_loss, mutates_args=()),
                            "triton")
_register(native_loss, "native")
_register(chunked_loss, "chunked")
OPERATORS = {"native": native_loss, "chunked": chunked_loss, "triton": triton_loss}


def fused_loss(impl, logits, target, epsilon, spec: BonusSpec, ignore_index, need_grad):
    """Per-row (loss, nll, stats) of `impl`'s kernel operator on logits (N, V); the loss differentiable
    through the kernel's own gradient when need_grad (nll and stats never are)."""
    loss, nll, stats, _ = OPERATORS[impl](logits, target, float(epsilon), ignore_index, bool(need_grad),
                                          *spec_to_args(spec))
    return loss, nll.detach(), stats.detach()

"""One entry point for every implementation of the encouraging loss, with input checks.

impl:
  "reference"  plain torch on log_softmax(logits) (reference.py), autograd backward;
  "chunked"    fused loss+gradient over row chunks with torch ops (chunked.py), any device/dtype;
  "native"     fused loss+gradient in compiled C/OpenMP (native_kernel.c), float32 CPU logits;
  "triton"     fused loss+gradient as a Triton kernel (triton_kernel.py), CUDA logits of any float dtype;
  "auto"       "native" on the CPU, "triton" on CUDA, where they apply; else "chunked".
Every option of the loss works on every path. "native"/"triton" fall back to "chunked", with a
one-time warning, where they cannot run, and where they fail their first-use self-check against
"chunked" (self_check.py).
"""
import os
import warnings

import torch
import torch.nn.functional as F

from .bonus import BonusSpec, EncouragingLossOptionError
from . import chunked
from .chunked import compute_dtype
from .diagnostics import token_stats_from_logits
from .reference import encouraging_nll_loss
from . import kernel_inputs, native, ops, self_check, triton_kernel

IMPLS = ("auto", "reference", "chunked", "native", "triton")
# Looked up at call time, so that a replaced module function (tests inject failures) is the one used.
KERNELS = {"native": lambda: native.forward, "triton": lambda: triton_kernel.forward, "chunked": lambda: chunked.forward}
_warned = set()


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise EncouragingLossOptionError(f"--el-impl {impl!r} is not known: allowed {', '.join(IMPLS)}")
    return impl


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def fused_or_reference(impl, tensors, classes):
    """`impl`, or "reference" where no fused kernel can take the tensors ({name: tensor or None}: a
    DTensor, a sparse tensor; under impl "auto" also a tensor wrapped by a torch.func transform) or
    `classes` < 2, for impl "auto" or "reference"; a fused impl named explicitly refuses them in one line
    (KernelInputError). The kernel operators (ops.py) take what torch.compile traces them with, and
    torch.func's wrappers through their autograd and vmap rules (a fused impl named explicitly)."""
    transforms = impl not in ("auto", "reference")
    unreadable = next((f"{name} {kernel_inputs.describe(t)}: the fused kernels read plain dense tensors"
                       for name, t in tensors.items()
                       if t is not None and not kernel_inputs.operator_input(t, transforms)), "")
    if not unreadable and classes < 2:
        unreadable = f"{classes} class: the fused kernels take at least 2"
    if not unreadable:
        return impl
    if impl in ("auto", "reference"):
        return "reference"
    raise kernel_inputs.KernelInputError(f"impl {impl!r} cannot take {unreadable}; impl='auto' or 'reference' "
                                         f"computes it with plain torch ops")


def path_for(logits, impl, target=None):
    """The implementation that will run for these logits ("auto" and fallbacks resolved). Tensors no
    kernel can read go to "reference", plain torch ops, which take them (fused_or_reference)."""
    if fused_or_reference(impl, {"logits": logits, "target": target}, logits.size(-1)) == "reference":
        return "reference"
    return _kernel_for(impl, logits.device.type, logits.dtype)


def _constant_result(fn):
    """torch.compiler.assume_constant_result(fn), which sets this one mark, without its import of torch._dynamo
    (~2 s): the plain loss does not load the compiler (tests/test_compile.py checks the mark is torch's)."""
    fn._dynamo_marked_constant = True
    return fn


# What runs on a device and dtype is a fact of the process (is triton installed, does the C kernel build):
# torch.compile takes this function's result as a constant of the graph instead of tracing its Python (a
# lock, ctypes, a warning) into graph breaks.
@_constant_result
def _kernel_for(impl, device_type, dtype):
    """path_for's choice for logits that a kernel can read."""
    if impl == "triton" or (impl == "auto" and device_type == "cuda"):
        # On CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
        runnable = device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        if triton_kernel.available() and runnable:
            return "triton"
        if impl == "triton":
            reason = "triton is not installed" if not triton_kernel.available() else "it needs CUDA logits"
            _warn_once(("triton", reason), f"el_fairseq: --el-impl triton unavailable ({reason}); using chunked")
        return "chunked"
    if impl in ("auto", "native"):
        supported = device_type == "cpu" and dtype == torch.float32  # native.supports, the tensor type checked
        if supported and native.available():
            return "native"
        if impl == "native" or (supported and native.error()):
            reason = native.error() or f"it takes float32 CPU logits, got {dtype} on {device_type}"
            _warn_once(("native", reason), f"el_fairseq: the native kernel is unavailable ({reason}); using chunked")
        return "chunked"
    return impl


def checked_path(logits, impl, epsilon, spec, ignore_index, check_spec=None, target=None):
    """path_for, then the first-use self-check of a compiled kernel (chunked if it fails), with `spec`
    and `check_spec`: the options of the whole run where they differ from this call's (a bonus
    schedule starts at rho = 0; self_check.verify). The fused linear loss (linear.py) selects its
    per-chunk kernel here too."""
    impl = path_for(logits, resolve_impl(impl), target)
    if impl in ("native", "triton"):
        if torch.compiler.is_compiling():
            # The options may be symbols of the graph (a float under dynamic=True): the operator runs the
            # check when it first runs, on concrete values (ops._run_kernel).
            return impl
        # Outside any torch.func transform of the caller's (vmap): the check runs the kernel on plain tensors.
        with torch._C._DisableFuncTorch():
            probe = torch.empty(0, logits.size(-1), dtype=logits.dtype, device=logits.device)
            impl = self_check.kernel_or_chunked(impl, KERNELS[impl](), probe, epsilon, spec, ignore_index,
                                                check_spec)
    return impl


def _check_inputs(logits, target, epsilon):
    if logits.dim() < 2:
        raise ValueError(f"logits must have a class dimension, got shape {tuple(logits.shape)}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if logits.size(-1) < 1 or (logits.size(-1) == 1 and epsilon > 0.0):  # fairseq's smoothing: eps/(V-1) each
        raise ValueError(f"need at least 1 class (2 with label smoothing), got {logits.size(-1)}")
    if not 0.0 <= epsilon < 1.0:
        raise EncouragingLossOptionError(f"--label-smoothing {epsilon!r} is out of range: allowed 0 <= eps < 1")


def encouraging_loss(logits, target, epsilon, spec: BonusSpec, ignore_index=None, reduce=True,
                     impl="auto", with_stats=False, check_spec=None):
    """(loss, nll_loss[, stats]) from logits (..., V) and target (...); sums when reduce.

    stats: per-token (N, 2) float32 [z_y, margin z_y - max_{j != y} z_j], zeros at padding.
    check_spec: the run's configured options, for the first-use self-check (checked_path).
    """
    _check_inputs(logits, target, epsilon)
    impl = checked_path(logits, impl, epsilon, spec, ignore_index, check_spec, target)
    logits = logits.reshape(-1, logits.size(-1))
    target = target.reshape(-1)
    if impl in ("chunked", "native", "triton"):
        # Without a gradient wanted (validation, torch.no_grad) the kernel builds no N x V gradient buffer.
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        loss, nll, stats = ops.fused_loss(impl, logits, target, epsilon, spec, ignore_index, need_grad)
        if reduce:
            loss, nll = loss.sum(), nll.sum()
    else:
        lprobs = F.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=-1)
        loss, nll = encouraging_nll_loss(lprobs, target, epsilon, spec, ignore_index, reduce)
        stats = token_stats_from_logits(logits.detach(), target, ignore_index) if with_stats else None
    return (loss, nll, stats) if with_stats else (loss, nll)

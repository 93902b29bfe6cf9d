"""The compiled CPU path: native_kernel.c built with the system C compiler on first use, loaded
with ctypes. float32 CPU logits only; anything else goes to the chunked torch path.

Build cache: $EL_FAIRSEQ_CACHE or ~/.cache/el_fairseq, keyed by the source, the flags and the
CPU's feature flags (the build uses -march=native); the library gets the umask's mode (0755 by
default) so a shared cache serves a team, and an unwritable cache means a private build in a
temporary folder. If no compiler is found or the build fails,
`available()` is False and the dispatcher falls back to "chunked" with a one-time warning.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import torch

from . import kernel_inputs
from .bonus import BonusSpec, _scalar_bonus

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native_kernel.c")
# -ffast-math defines __FAST_MATH__, under which glibc declares the SIMD (libmvec) variants of
# expf/logf/powf/cosf: gcc then vectorises the row loops. Its finite-math-only part may drop any test
# for inf or nan, so the kernel makes none: a masked class (logit -inf) goes through expf (0) and the
# sums (-inf) by plain IEEE arithmetic, and the one 0 * inf it could meet is skipped by a flag.
# It is a compile flag only: the link step must not see it, because gcc (and clang) then link
# crtfastmath.o, whose constructor turns on flush-to-zero / denormals-are-zero for the whole
# process when the library is loaded, changing every later float computation of the user's.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c"]
LINK_FLAGS = ["-shared", "-fPIC", "-fopenmp"]
FLAGS = COMPILE_FLAGS + LINK_FLAGS  # the cache key
KINDS = {"log": 0, "power": 1, "cosine": 2}

_lib = None
_error = None
_lock = threading.Lock()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build():
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler (gcc/cc) found")
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    name = f"el_native_{key}.so"
    cache = cache_dir()
    path = os.path.join(cache, name) if cache else None
    if path is None or not os.path.exists(path):
        # An unwritable shared cache: build for this process only, in a private temporary folder.
        folder = cache or tempfile.mkdtemp(prefix="el_fairseq_")
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        obj = tmp[:-3] + ".o"
        proc = subprocess.run([compiler, *COMPILE_FLAGS, SOURCE, "-o", obj], capture_output=True, text=True)
        if proc.returncode == 0:
            proc = subprocess.run([compiler, *LINK_FLAGS, obj, "-o", tmp, "-lm"], capture_output=True, text=True)
        if os.path.exists(obj):
            os.remove(obj)
        if proc.returncode != 0:
            os.remove(tmp)
            raise RuntimeError(f"compiling {SOURCE} failed: {proc.stderr.strip()[-500:]}")
        # mkstemp made it 0600: give it the mode of an ordinary build output (0755 under umask 022),
        # so a cache shared by a team (EL_FAIRSEQ_CACHE) serves everyone.
        os.chmod(tmp, 0o777 & ~_umask())
        path = os.path.join(folder, name)
        os.replace(tmp, path)  # atomic: concurrent workers never load a half-written library
    lib = ctypes.CDLL(path)
    f32, i64, i32, ptr = ctypes.c_float, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.el_forward.argtypes = [ptr, ptr, i64, i64, i64, i32, f32, i32, f32, f32, i32, f32, f32, f32, f32,
                               ptr, ptr, ptr, ptr, i32]
    lib.el_forward.restype = i32
    return lib


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cache_dir():
    """$EL_FAIRSEQ_CACHE or ~/.cache/el_fairseq when it can be created and written, else None."""
    cache = os.environ.get("EL_FAIRSEQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "el_fairseq")
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:
        return None
    return cache if os.access(cache, os.W_OK | os.X_OK) else None


def library_path():
    """The file of the loaded library (None before a successful load)."""
    return getattr(_lib, "_name", None)


def load():
    """The loaded library, or None (the reason in `error()`)."""
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except (RuntimeError, OSError) as err:
                _error = str(err)
    return _lib


def available():
    return load() is not None


def error():
    return _error


def supports(logits):
    """float32 logits on the CPU, in a plain dense tensor (kernel_inputs.plain_dense): what the C code reads."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and kernel_inputs.plain_dense(logits)


def forward(logits, target, epsilon, spec: BonusSpec, ignore_index, need_grad=True):
    """(loss, nll, stats, grad) for float32 CPU logits (N, V); grad is (N, V) float32, or None
    without need_grad (then no N x V buffer is allocated). Anything else raises KernelInputError."""
    kernel_inputs.check("native", logits, target, (torch.float32,), ("cpu",))
    lib = load()
    if lib is None:
        raise RuntimeError(f"el_fairseq native kernel unavailable: {error()}")
    logits = logits.detach().contiguous()
    target = target.contiguous().to(torch.int64)
    n, vocab = logits.shape
    keep = target if ignore_index is None else target[target != ignore_index]
    if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= vocab):  # the C code indexes with them
        raise ValueError(f"target ids must be in [0, {vocab}) or the padding index, "
                         f"got {int(keep.min())}..{int(keep.max())}")
    loss = torch.empty(n, dtype=torch.float32)
    nll = torch.empty(n, dtype=torch.float32)
    stats = torch.empty(n, 2, dtype=torch.float32)
    grad = torch.empty_like(logits) if need_grad else None
    b_start = _scalar_bonus(spec.start, spec) if spec.start > 0 else 0.0
    _check_buffers(n, vocab, logits, target, loss, nll, stats, grad)
    failed = lib.el_forward(
        logits.data_ptr(), target.data_ptr(), n, vocab, -1 if ignore_index is None else int(ignore_index),
        int(ignore_index is not None), float(epsilon), int(epsilon > 0.0), float(spec.epsilon), float(spec.rho),
        KINDS[spec.kind],
        float(spec.log_end), float(spec.gamma), float(spec.start), float(b_start),
        loss.data_ptr(), nll.data_ptr(), stats.data_ptr(), grad.data_ptr() if need_grad else None,
        torch.get_num_threads())
    if failed:
        raise MemoryError("el_fairseq native kernel: could not allocate its scratch row")
    return loss, nll, stats, grad


def _check_buffers(n, vocab, logits, target, loss, nll, stats, grad):
    """The last gate before C: every buffer it reads or writes is a plain contiguous CPU tensor of the
    dtype and of the size that the call tells it (n rows of vocab classes)."""
    expected = [("logits", logits, torch.float32, (n, vocab)), ("target", target, torch.int64, (n,)),
                ("loss", loss, torch.float32, (n,)), ("nll", nll, torch.float32, (n,)),
                ("stats", stats, torch.float32, (n, 2))]
    if grad is not None:
        expected.append(("grad", grad, torch.float32, (n, vocab)))
    for name, tensor, dtype, shape in expected:
        if not (kernel_inputs.plain_dense(tensor) and tensor.device.type == "cpu" and tensor.dtype == dtype
                and tuple(tensor.shape) == shape and tensor.is_contiguous() and (tensor.data_ptr() or not n)):
            raise kernel_inputs.KernelInputError(f"the native kernel cannot take {name} "
                                                 f"{kernel_inputs.describe(tensor)}: allowed a contiguous "
                                                 f"{dtype} {shape} CPU tensor")

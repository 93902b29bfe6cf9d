"""A compiled kernel must not silently break training: the first time a process would use the native
or the Triton kernel for a dtype and device, it runs once on a small batch shaped like the run's
(its vocabulary, its options, a padded row) and is compared with the chunked torch path, loss and
gradient; with the run's configured options too where they differ from the first call's (a bonus
schedule's rho is 0 at update 0, where the kernels skip the bonus, which later updates use). If it raises (does not compile, fails to launch) or disagrees beyond the tolerance, the
dispatcher warns once with the reason and uses the chunked path for the rest of the process.

(A kernel that kills the process, e.g. an illegal instruction, cannot be caught here; the native
build cache is keyed by the CPU's feature flags so that a library is only loaded where it was built.)
"""
import dataclasses
import warnings

import torch

from . import chunked

ROWS = 8
# Relative to the largest |value|: the kernels compute in float32 like the chunked path and agree to
# ~1e-6 there; fp16/bf16 gradients are stored in their own precision.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}

_results = {}
_warned = set()


def _batch(vocab, dtype, device, ignore_index):
    g = torch.Generator().manual_seed(20211012)
    logits = torch.randn(ROWS, vocab, generator=g) * 4
    target = torch.randint(0, vocab, (ROWS,), generator=g)
    logits[0, target[0]] += 30.0  # a confident row: p_y near 1, where the bonus's precision matters
    if ignore_index is not None:
        target[target == ignore_index] = (ignore_index + 1) % vocab
        target[-1] = ignore_index  # a padded row
    return logits.to(device=device, dtype=dtype), target.to(device)


def _difference(got, want):
    scale = want.abs().max().clamp(min=1e-12)
    return float((got.float() - want.float()).abs().max() / scale)


def specs_to_check(spec, check_spec=None):
    """The options the check runs with: this call's `spec`, and the run's configured `check_spec`
    where it differs. A bonus schedule starts at rho = 0, where the kernels skip the bonus: without
    a configured spec, a bonus-free spec is also checked with rho = 1, so that the bonus path a
    later update takes is checked too."""
    if check_spec is None and not spec.active:
        check_spec = dataclasses.replace(spec, rho=1.0)
    return [spec] if check_spec is None or check_spec == spec else [spec, check_spec]


def _compare(kernel, z, t, epsilon, spec, ignore_index, tol):
    """'' when `kernel` agrees with the chunked path on (z, t) under `spec`, else why not."""
    got = kernel(z, t, epsilon, spec, ignore_index)
    want = chunked.forward(z, t, epsilon, spec, ignore_index)
    if not all(bool(torch.isfinite(g).all()) for g in got):
        return "non-finite output on the check batch"
    errors = {name: _difference(g, w) for name, g, w in zip(("loss", "nll", "stats", "gradient"), got, want)}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        return ("disagrees with the chunked path: " + ", ".join(f"{k} off by {v:.2g} of its scale" for k, v in
                                                                bad.items()) + f" (tolerance {tol:g})")
    return ""


def verify(impl, kernel, logits, epsilon, spec, ignore_index, check_spec=None):
    """(ok, reason) for `kernel` on this run's vocabulary, dtype, device and options (specs_to_check);
    cached per (impl, dtype, device) for the process."""
    key = (impl, logits.dtype, logits.device.type)
    if key in _results:
        return _results[key]
    z, t = _batch(logits.size(-1), logits.dtype, logits.device, ignore_index)
    tol = TOLERANCE.get(logits.dtype, 1e-4)
    result = (True, "")
    try:
        for options in specs_to_check(spec, check_spec):
            reason = _compare(kernel, z, t, epsilon, options, ignore_index, tol)
            if reason:
                result = (False, reason if options == spec else f"{reason}, at rho {options.rho:g}")
                break
    except Exception as err:  # noqa: BLE001  (any failure to compile or launch means: do not use it)
        result = (False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": "))
    _results[key] = result
    return result


def kernel_or_chunked(impl, kernel, logits, epsilon, spec, ignore_index, check_spec=None):
    """`impl` where `kernel` passes `verify` on logits like these (their width, dtype, device), else "chunked",
    with a warning the first time (a warning per impl and dtype, as the results are cached per process)."""
    ok, reason = verify(impl, kernel, logits, epsilon, spec, ignore_index, check_spec)
    if ok:
        return impl
    key = (impl, "self-check", logits.dtype)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"el_fairseq: the {impl} kernel failed its self-check on {logits.dtype} "
                      f"{logits.device.type} logits ({reason}); using chunked for this process", RuntimeWarning,
                      stacklevel=3)
    return "chunked"


def reset():
    """Forget the results and the warnings given (tests)."""
    _results.clear()
    _warned.clear()

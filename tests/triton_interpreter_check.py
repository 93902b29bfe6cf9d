"""Run by test_triton.py in a subprocess with TRITON_INTERPRET=1 (set before triton is imported):
the Triton kernel, executed by Triton's CPU interpreter, against the float64 reference."""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
assert os.environ.get("TRITON_INTERPRET") == "1"
from test_loss import assert_matches, make_batch, run_impl, run_ref64  # noqa: E402

from el_fairseq.loss import triton_kernel  # noqa: E402
from el_fairseq.loss.bonus import BonusSpec  # noqa: E402
from el_fairseq.loss.dispatch import encouraging_loss, path_for  # noqa: E402

assert triton_kernel.available() and path_for(torch.zeros(2, 3), "triton") == "triton"
specs = [BonusSpec(), BonusSpec(log_end=0.75, epsilon=0.0), BonusSpec(log_end=1.0), BonusSpec(rho=0.0),
         BonusSpec("power", gamma=2.5), BonusSpec("power", gamma=1.0, epsilon=0.2), BonusSpec("cosine"),
         BonusSpec(log_end=0.75, start=0.3)]
for spec, scale, eps in itertools.product(specs, (1.0, 10.0, 40.0), (0.0, 0.1)):
    logits, target = make_batch(23, 41, scale, seed=int(scale), pad_rows=4)
    assert_matches(run_impl("triton", logits, target, eps, spec), run_ref64(logits, target, eps, spec), rtol=1e-5)
# several blocks per row, odd vocabulary
logits, target = make_batch(37, 100, 12.0, seed=3, pad_rows=3)
for spec in specs[:3]:
    loss, nll, stats, grad = triton_kernel.forward(logits, target, 0.1, spec, 1, block=16)
    assert_matches((loss.sum(), nll.sum(), grad), run_ref64(logits, target, 0.1, spec), rtol=1e-5)
    _, _, s_ref = encouraging_loss(logits, target, 0.1, spec, ignore_index=1, impl="chunked", with_stats=True)
    assert torch.allclose(stats, s_ref)
# half precision: float32 inside, finite with +-1e4 logits, gradient in the input dtype
for dtype in (torch.float16, torch.bfloat16):
    logits, target = make_batch(16, 40, 8.0, seed=21, pad_rows=2, dtype=dtype)
    logits[0, :] = -1e4
    logits[0, target[0]] = 1e4
    logits[1, target[1]] = 1e4
    logits[2, :] = 1e4
    logits[3, target[3]] = -1e4
    for spec in (BonusSpec(log_end=1.0), BonusSpec()):
        loss, nll, grad = run_impl("triton", logits, target, 0.1, spec)
        want = run_ref64(logits.double(), target, 0.1, spec)
        assert grad.dtype == dtype and torch.isfinite(grad).all() and torch.isfinite(loss)
        assert torch.allclose(loss.double(), want[0], rtol=1e-4)
        assert (grad.double() - want[2]).abs().max() < 1e-2
# no gradient wanted (validation): the gradient pass is skipped, the loss is unchanged
logits, target = make_batch(19, 45, 6.0, seed=5, pad_rows=2)
for spec in specs[:3]:
    loss, nll, stats, grad = triton_kernel.forward(logits, target, 0.1, spec, 1, need_grad=False)
    full = triton_kernel.forward(logits, target, 0.1, spec, 1)
    assert grad is None and torch.equal(loss, full[0]) and torch.equal(nll, full[1]) and torch.equal(stats, full[2])
# the public PyTorch API through the Triton kernel: torch's cross-entropy with the bonus off
import torch.nn.functional as F  # noqa: E402

from el_fairseq import encouraging_loss as public_loss  # noqa: E402

x = torch.randn(6, 9, 4, generator=torch.Generator().manual_seed(2)) * 3
y = torch.randint(0, 9, (6, 4), generator=torch.Generator().manual_seed(3))
y[0, 0] = -100
for reduction in ("mean", "sum", "none"):
    got = public_loss(x, y, bonus_rho=0.0, label_smoothing=0.1, reduction=reduction, impl="triton")
    assert torch.allclose(got, F.cross_entropy(x, y, label_smoothing=0.1, reduction=reduction), rtol=1e-5, atol=1e-6)
# the first-use self-check: an injected failure / wrong result -> one warning, chunked for the run
import warnings  # noqa: E402

from el_fairseq.loss import dispatch, self_check  # noqa: E402

assert self_check._results.get(("triton", torch.float32, "cpu")) == (True, "")  # the real kernel passed
real_forward = triton_kernel.forward
logits, target = make_batch(12, 33, 5.0, seed=8, pad_rows=2)
want = run_impl("chunked", logits, target, 0.1, BonusSpec())
for fault in ("raises", "wrong"):
    self_check.reset()
    dispatch._warned.clear()

    def broken(*args, fault=fault, **kwargs):
        if fault == "raises":
            raise RuntimeError("triton.compiler.errors.CompilationError: injected")
        loss, nll, stats, grad = real_forward(*args, **kwargs)
        return loss, nll, stats, grad * 2 if grad is not None else grad
    triton_kernel.forward = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_impl("triton", logits, target, 0.1, BonusSpec())
        run_impl("triton", logits, target, 0.1, BonusSpec())
    messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
    assert len(messages) == 1 and "the triton kernel failed its self-check" in messages[0], messages
    assert ("CompilationError" if fault == "raises" else "gradient off by") in messages[0], messages
    assert all(torch.equal(a, b) for a, b in zip(got, want))
# a wrong bonus path under a bonus schedule (rho 0 at update 0): caught with the configured rho
self_check.reset()
dispatch._warned.clear()


def wrong_bonus(logits, target, epsilon, spec, *args, **kwargs):
    loss, nll, stats, grad = real_forward(logits, target, epsilon, spec, *args, **kwargs)
    return loss, nll, stats, grad * 1.5 if spec.active and grad is not None else grad


triton_kernel.forward = wrong_bonus
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    z = logits.clone().requires_grad_(True)
    encouraging_loss(z, target, 0.1, BonusSpec(rho=0.0), ignore_index=1, impl="triton", check_spec=BonusSpec(rho=0.7))
messages = [str(w.message) for w in caught if "self-check" in str(w.message)]
assert len(messages) == 1 and "gradient off by" in messages[0] and "at rho 0.7" in messages[0], messages
triton_kernel.forward = real_forward
# fp16: the gradient is kept in float32 and rounded once after the loss scale (<= 2 fp16 ulps)
from test_loss import fp16_ulps  # noqa: E402

logits, target = make_batch(16, 3000, 3.0, seed=12, pad_rows=2, dtype=torch.float16)
exact = run_ref64(logits.double(), target, 0.1, BonusSpec())[2]
for k in (0, 7, 15):
    z = logits.clone().requires_grad_(True)
    loss, _ = encouraging_loss(z, target, 0.1, BonusSpec(), ignore_index=1, impl="triton")
    (loss * 2.0 ** k).backward()
    assert z.grad.dtype == torch.float16 and float(fp16_ulps(z.grad, exact * 2.0 ** k).max()) <= 2.0, k
# masked classes (-inf logits): no 0 * inf = nan; the loss without them (no smoothing) or inf (smoothing),
# like torch's cross-entropy; the same tests as test_loss.py's, on one batch size
from test_loss import (MASKED_SPECS, check_half_precision_reduction, make_masked_batch,  # noqa: E402
                       run_ref64_without_masked, test_default_module_with_masked_classes_is_finite_and_the_loss_without_them,
                       test_masked_classes_with_the_bonus_off_are_torch_cross_entropy)

logits, target, masked = make_masked_batch(23, 41, 5.0, seed=12)
for spec, eps in itertools.product(MASKED_SPECS, (0.0, 0.1)):
    loss, nll, grad = got = run_impl("triton", logits, target, eps, spec)
    assert bool(torch.isfinite(loss)) == (eps == 0.0) and torch.isfinite(grad).all(), (spec, eps)
    assert_matches(got, run_ref64(logits, target, eps, spec), rtol=1e-5)
    if eps == 0.0:
        assert_matches(got, run_ref64_without_masked(logits, target, spec, masked), rtol=1e-5)
for label_smoothing in (0.0, 0.1):
    test_masked_classes_with_the_bonus_off_are_torch_cross_entropy("triton", label_smoothing)
test_default_module_with_masked_classes_is_finite_and_the_loss_without_them("triton")
# half-precision reductions in float32: 64 tokens of ~1,700 sum to ~106,000, beyond fp16's range
for dtype in (torch.float16, torch.bfloat16):
    check_half_precision_reduction("triton", dtype, "mean", rows=64, scale=1000.0)
print("triton interpreter checks passed")

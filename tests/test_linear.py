"""The fused linear + encouraging loss (el_fairseq.encouraging_linear_loss, EncouragingLinearLoss) against
the loss of the full logits in float64 (encouraging_loss(F.linear(...)) on the plain-torch reference, and
the independent float64 formula of reference64.py), against torch's F.cross_entropy and
F.linear_cross_entropy with the bonus off, on every per-chunk kernel, with ragged chunks, odd sizes,
ignored targets, bias or not, 3-D and non-contiguous input, half precision and no_grad."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss, encouraging_loss
from el_fairseq.loss import dispatch, native
from el_fairseq.loss.bonus import BonusSpec
from el_fairseq.loss.linear import default_chunk_size, fused_linear_encouraging_loss
from reference64 import el_loss64

HERE = os.path.dirname(os.path.abspath(__file__))
IMPLS = ["native", "chunked"]
N, D, V, CHUNK = 37, 13, 29, 8  # 37 = 4 chunks of 8 + 5: the last chunk is ragged


def problem(n=N, d=D, v=V, seed=0, bias=True, ignored=0.2, dtype=torch.float32):
    """Features, weight, bias and targets with ignored (-100) tokens and confident rows (p_y near 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    sure = torch.arange(0, n, 3)
    x[sure] += 2.0 * w[target[sure]]  # aligned with the target's row: large z_y
    target = target.masked_fill(torch.rand(n, generator=g) < ignored, -100)
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), target


def value_and_grads(fn, x, w, b, seed=1):
    """fn(x, w, b) and the gradients of <loss, r> (r random for reduction 'none', per token)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    out = fn(*leaves, *(() if b is not None else (None,)))
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    return out.detach(), grads


def full_logits64(x, w, b, target, **kwargs):
    """The same loss from the (N, V) logits, float64, plain torch with autograd."""
    def fn(x, w, b):  # torch's class dimension is 1: the tokens of a (..., D) input flattened
        loss = encouraging_loss(F.linear(x, w, b).reshape(-1, w.size(0)), target.reshape(-1), impl="reference",
                                **kwargs)
        return loss.reshape(target.shape) if kwargs.get("reduction") == "none" else loss
    return value_and_grads(fn, x.double(), w.double(), None if b is None else b.double())


def assert_close(got, want, rtol=1e-5, grad_rtol=1e-4):
    (value, grads), (ref_value, ref_grads) = got, want
    assert value.shape == ref_value.shape
    assert torch.allclose(value.double(), ref_value, rtol=rtol, atol=rtol * ref_value.abs().max().item()), \
        (value, ref_value)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() <= grad_rtol * r.abs().max(), (g.double() - r).abs().max()


OPTIONS = [
    dict(),                                                      # the authors' defaults: log, LE 0.75
    dict(log_end=1.0),                                           # plain log bonus (the 1e-5 clamp)
    dict(log_end=0.5, label_smoothing=0.1, bonus_label_smoothing=0.1),
    dict(bonus="power", bonus_gamma=2.5, bonus_label_smoothing=0.2),
    dict(bonus="cosine", label_smoothing=0.35),
    dict(bonus_rho=0.5, bonus_start=0.3),
    dict(bonus_rho=2.0, log_end=0.75, bonus_start=0.2, bonus_label_smoothing=0.05, label_smoothing=0.1),
    dict(bonus_rho=0.0, label_smoothing=0.1),                    # cross-entropy
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=[",".join(f"{k}={v}" for k, v in o.items()) or "defaults"
                                                  for o in OPTIONS])
def test_equals_the_loss_of_the_full_logits(impl, reduction, options):
    x, w, b, target = problem(seed=len(options))
    got = value_and_grads(lambda x, w, b: encouraging_linear_loss(
        x, w, target, linear_bias=b, reduction=reduction, impl=impl, chunk_size=CHUNK, **options), x, w, b)
    assert_close(got, full_logits64(x, w, b, target, reduction=reduction, **options))


@pytest.mark.parametrize("spec", [BonusSpec(), BonusSpec(log_end=0.75, epsilon=0.0, rho=2.0),
                                  BonusSpec("power", gamma=2.0), BonusSpec("cosine", start=0.2)])
def test_matches_the_independent_float64_formula(spec):
    """fairseq's convention (eps on the other V - 1 classes), summed, padding index 1, float64 input."""
    x, w, b, target = problem(seed=4, dtype=torch.float64)
    target = target.masked_fill(target.eq(-100), 1)
    fn64 = lambda x, w, b: el_loss64(F.linear(x, w, b), target, 0.1, spec.epsilon, spec.rho, pad=1,  # noqa: E731
                                     kind=spec.kind, log_end=spec.log_end, gamma=spec.gamma, start=spec.start)[0]
    ours = lambda x, w, b: fused_linear_encouraging_loss(  # noqa: E731
        x, w, b, target, 0.1, spec, ignore_index=1, chunk_size=CHUNK)[0]
    assert_close(value_and_grads(ours, x, w, b), value_and_grads(fn64, x, w, b), rtol=1e-10, grad_rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_bonus_off_is_torch_linear_cross_entropy(reduction, label_smoothing, bias):
    x, w, b, target = problem(seed=5, bias=bias)
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(
        x, w, target, linear_bias=b, bonus_rho=0.0, label_smoothing=label_smoothing, reduction=reduction,
        chunk_size=CHUNK), x, w, b)
    logits_ce = value_and_grads(lambda x, w, b: F.cross_entropy(
        F.linear(x, w, b), target, label_smoothing=label_smoothing, reduction=reduction), x, w, b)
    assert_close(ours, (logits_ce[0].double(), [g.double() for g in logits_ce[1]]))
    if label_smoothing == 0.0:  # torch's chunked path refuses label smoothing (it falls back to full logits)
        torch_fused = value_and_grads(lambda x, w, b: F.linear_cross_entropy(
            x, w, target, linear_bias=b, reduction=reduction, ignore_index=-100,
            options=torch.nn.LinearCrossEntropyOptions()), x, w, b)
        assert_close(ours, (torch_fused[0].double(), [g.double() for g in torch_fused[1]]))


@pytest.mark.parametrize("chunk_size", [1, 5, N, 1000, None])
def test_any_chunk_size_and_3d_noncontiguous_input_without_bias(chunk_size):
    x, w, _, target = problem(n=4 * 9, d=11, v=31, seed=6, bias=False)
    # (4, 9, 11) features stored as (9, 4, 11): a non-contiguous 3-D input, target (4, 9)
    x3 = x.reshape(9, 4, 11).transpose(0, 1)
    t3 = target.reshape(9, 4).t()
    assert not x3.is_contiguous()
    kwargs = dict(log_end=0.5, label_smoothing=0.1, reduction="none")
    got = value_and_grads(lambda x, w, b: encouraging_linear_loss(x, w, t3, chunk_size=chunk_size, **kwargs),
                          x3, w, None)
    assert got[0].shape == (4, 9) and got[1][0].shape == (4, 9, 11)
    assert_close(got, full_logits64(x3, w, None, t3, **kwargs))


def test_only_chunks_of_logits_reach_the_kernel_and_no_grad_computes_no_gradient(monkeypatch):
    calls = []
    real = native.forward

    def spy(z, target, epsilon, spec, ignore_index, need_grad=True):
        calls.append((tuple(z.shape), need_grad))
        return real(z, target, epsilon, spec, ignore_index, need_grad=need_grad)

    monkeypatch.setitem(dispatch.KERNELS, "native", lambda: spy)
    x, w, b, target = problem(seed=7)
    x.requires_grad_(True)
    loss = encouraging_linear_loss(x, w, target, linear_bias=b, chunk_size=CHUNK, impl="native")
    assert [shape for shape, _ in calls] == [(CHUNK, V)] * 4 + [(N % CHUNK, V)]
    assert all(need for _, need in calls)
    calls.clear()
    with torch.no_grad():
        again = encouraging_linear_loss(x, w, target, linear_bias=b, chunk_size=CHUNK, impl="native")
    assert not again.requires_grad and torch.equal(again, loss.detach())
    assert len(calls) == 5 and not any(need for _, need in calls)
    assert default_chunk_size(32000) == 524 and default_chunk_size(128256) == 130


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gradient_flows_only_to_what_requires_it(reduction):
    x, w, b, target = problem(seed=8)
    w = w.clone().requires_grad_(True)  # x and b are plain tensors (frozen features and bias)
    encouraging_linear_loss(x, w, target, linear_bias=b, reduction=reduction, chunk_size=CHUNK).sum().backward()
    ref_w = w.detach().clone().requires_grad_(True)
    encouraging_loss(F.linear(x, ref_w, b), target, reduction=reduction).sum().backward()
    assert torch.allclose(w.grad, ref_w.grad, rtol=1e-5, atol=1e-7)


def test_a_second_backward_raises():
    x, w, b, target = problem(seed=9)
    x.requires_grad_(True)
    loss = encouraging_linear_loss(x, w, target, linear_bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_computes_in_float32_and_rounds_once(dtype, reduction):
    x, w, b, target = problem(n=40, d=24, v=33, seed=10, dtype=dtype)
    x[0] = 300 * w[target[0].clamp(min=0)]  # logits ~1e4: a p_y of exactly 1 in float32
    kwargs = dict(label_smoothing=0.1, reduction=reduction)
    value, grads = value_and_grads(lambda x, w, b: encouraging_linear_loss(
        x, w, target, linear_bias=b, chunk_size=CHUNK, **kwargs), x, w, b)
    assert value.dtype == dtype and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    ref_value, ref_grads = full_logits64(x, w, b, target, **kwargs)  # the same 16-bit inputs, float64 inside
    tol = 4e-3 if dtype == torch.float16 else 2e-2  # a few ulps of the 16-bit results
    assert torch.allclose(value.double(), ref_value, rtol=tol, atol=tol * ref_value.abs().max().item())
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() <= tol * r.abs().max()


def test_module_owns_the_projection_and_equals_the_function():
    torch.manual_seed(0)
    head = EncouragingLinearLoss(D, V, bias=True, log_end=0.5, label_smoothing=0.1, reduction="sum", chunk_size=4)
    assert head.linear.weight.shape == (V, D) and head.linear.bias.shape == (V,)
    x, _, _, target = problem(seed=11)
    loss = head(x, target)
    loss.backward()
    logits = F.linear(x, head.linear.weight, head.linear.bias)
    want = encouraging_loss(logits, target, log_end=0.5, label_smoothing=0.1, reduction="sum")
    assert torch.allclose(loss, want, rtol=1e-5)
    assert "num_classes=29" in repr(head) and "log_end=0.5" in repr(head)
    assert EncouragingLinearLoss(4, 6).linear.bias is None  # like nn.LinearCrossEntropyLoss: no bias by default
    assert torch.isnan(encouraging_linear_loss(x, head.linear.weight, torch.full_like(target, -100)))


def test_a_failing_native_kernel_falls_back_to_chunked(monkeypatch, fresh_kernel_state):
    def broken(*args, **kwargs):
        raise OSError("illegal library")

    monkeypatch.setattr(native, "forward", broken)
    x, w, b, target = problem(seed=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = value_and_grads(lambda x, w, b: encouraging_linear_loss(x, w, target, linear_bias=b, impl="native"),
                              x, w, b)
    assert any("failed its self-check" in str(c.message) for c in caught)
    assert_close(got, full_logits64(x, w, b, target))


@pytest.mark.parametrize("call,message", [
    (lambda x, w, t: encouraging_linear_loss(x, w[:, :-1], t), r"input \(..., D\) and linear_weight \(V, D\)"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t[:-1]), "target shape"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t, linear_bias=torch.zeros(3)), "linear_bias shape"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t, chunk_size=0), "chunk_size 0 is not allowed"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t.float()), "target must hold class indices"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t.clamp(min=0) + V), r"target values must be in \[0, 29\)"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t, log_end=1.5), "log_end 1.5 is out of range"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t, reduction="avg"), "reduction 'avg' is not known"),
])
def test_bad_input_is_refused_in_one_line(call, message):
    x, w, _, target = problem(seed=13)
    with pytest.raises(ValueError, match=message) as err:
        call(x, w, target)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not dispatch.triton_kernel.available() and os.environ.get("EL_FAIRSEQ_REQUIRE_TRITON") != "1",
                    reason="triton is not installed")
def test_triton_kernel_under_the_interpreter():
    """impl="triton" per chunk, run by Triton's CPU interpreter (set before triton is imported)."""
    script = """
import sys, torch
sys.path.insert(0, {here!r})
from test_linear import CHUNK, assert_close, full_logits64, problem, value_and_grads
from el_fairseq import encouraging_linear_loss
from el_fairseq.loss.dispatch import path_for
assert path_for(torch.zeros(2, 3), "triton") == "triton"
for reduction, options in (("mean", dict(log_end=0.5, label_smoothing=0.1, bonus_label_smoothing=0.1)),
                           ("none", dict(bonus="power", bonus_gamma=2.0)), ("sum", dict(bonus_rho=0.0))):
    x, w, b, target = problem(seed=14)
    got = value_and_grads(lambda x, w, b: encouraging_linear_loss(
        x, w, target, linear_bias=b, reduction=reduction, impl="triton", chunk_size=CHUNK, **options), x, w, b)
    assert_close(got, full_logits64(x, w, b, target, reduction=reduction, **options))
print("triton linear checks passed")
""".format(here=HERE)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "triton linear checks passed" in proc.stdout

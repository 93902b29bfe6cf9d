"""The first-use self-check of the compiled kernels: an injected failure or a wrong result makes the
dispatcher warn once with the reason and use the chunked path; training goes on."""
import warnings

import pytest
import torch

from el_fairseq.loss import dispatch, native, self_check
from el_fairseq.loss.bonus import BonusSpec

PAD = 1


pytestmark = pytest.mark.usefixtures("fresh_kernel_state")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(30, 70, generator=g) * 5).requires_grad_(True)
    target = torch.randint(0, 70, (30,), generator=g)
    target[-3:] = PAD
    return logits, target


def run(logits, target, spec=BonusSpec(log_end=0.75)):
    z = logits.detach().clone().requires_grad_(True)
    loss, nll = dispatch.encouraging_loss(z, target, 0.1, spec, ignore_index=PAD, impl="auto")
    loss.backward()
    return loss.detach(), z.grad


def chunked_result(logits, target, spec=BonusSpec(log_end=0.75)):
    z = logits.detach().clone().requires_grad_(True)
    loss, _ = dispatch.encouraging_loss(z, target, 0.1, spec, ignore_index=PAD, impl="chunked")
    loss.backward()
    return loss.detach(), z.grad


def test_a_healthy_native_kernel_passes_and_is_used(monkeypatch):
    calls = []
    real = native.forward
    monkeypatch.setattr(native, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, target = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(logits, target)
    assert self_check._results[("native", torch.float32, "cpu")] == (True, "") and len(calls) >= 2


@pytest.mark.parametrize("fault", ["raises", "wrong", "nan"])
def test_a_failing_native_kernel_falls_back_to_chunked_with_one_warning(monkeypatch, fault):
    real = native.forward

    def broken(*args, **kwargs):
        if fault == "raises":
            raise OSError("undefined symbol: el_forward")
        loss, nll, stats, grad = real(*args, **kwargs)
        if fault == "wrong":
            return loss * 1.01, nll, stats, grad
        return loss, nll, stats, grad.fill_(float("nan")) if grad is not None else grad
    monkeypatch.setattr(native, "forward", broken)
    logits, target = batch()
    with pytest.warns(RuntimeWarning, match="the native kernel failed its self-check") as record:
        first = run(logits, target)
        second = run(logits, target)  # no second warning, still chunked
    assert len([w for w in record if "self-check" in str(w.message)]) == 1
    reason = self_check._results[("native", torch.float32, "cpu")][1]
    assert {"raises": "OSError: undefined symbol", "wrong": "loss off by", "nan": "non-finite"}[fault] in reason
    want = chunked_result(logits, target)
    for got in (first, second):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

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


def wrong_bonus_path(real):
    """The native kernel with a deliberately wrong bonus path: exact where rho = 0 (no bonus), its
    gradient 1.5x where the bonus is on."""
    def broken(logits, target, epsilon, spec, ignore_index, need_grad=True):
        loss, nll, stats, grad = real(logits, target, epsilon, spec, ignore_index, need_grad=need_grad)
        return loss, nll, stats, grad * 1.5 if spec.active and grad is not None else grad
    return broken


def criterion_step(criterion, update, seed=0, rho=None):
    """One forward/backward of the criterion at fairseq update `update`; rho: the scheduled rho there."""
    from fairseq.logging import metrics

    from fairseq_fixtures import TinyModel, make_sample

    with metrics.aggregate("train"):
        metrics.log_scalar("num_updates", update, weight=0)  # what Trainer.set_num_updates does
        assert rho is None or criterion.current_spec().rho == rho
        model = TinyModel(40, seed)
        loss, _, _ = criterion(model, make_sample(4, 6, 40, seed=seed))
        loss.backward()
    return loss.detach(), model.table.grad


@pytest.mark.parametrize("schedule", ["linear", "cos"])  # both 0 at update 0
def test_a_wrong_bonus_path_is_caught_at_update_zero_of_a_bonus_schedule(monkeypatch, schedule):
    """rho is 0 at update 0, where the kernel runs without its bonus: the self-check also runs with the
    configured rho, so the wrong bonus path is refused before any update uses it."""
    from fairseq_fixtures import build

    monkeypatch.setattr(native, "forward", wrong_bonus_path(native.forward))
    options = dict(label_smoothing=0.1, bonus_rho=0.8, bonus_schedule=schedule, bonus_schedule_updates=100)
    criterion = build("encouraging_loss", **options)
    with pytest.warns(RuntimeWarning, match="the native kernel failed its self-check") as record:
        criterion_step(criterion, 0, rho=0.0)
    reason = self_check._results[("native", torch.float32, "cpu")][1]
    assert "gradient off by" in reason and "at rho 0.8" in reason, reason
    assert len([w for w in record if "self-check" in str(w.message)]) == 1
    # later updates, with the bonus on, run the chunked path
    got = criterion_step(criterion, 50)
    want = criterion_step(build("encouraging_loss", el_impl="chunked", **options), 50)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_healthy_kernel_passes_with_a_bonus_schedule(monkeypatch):
    from fairseq_fixtures import build

    criterion = build("encouraging_loss", bonus_schedule="linear", bonus_schedule_updates=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        criterion_step(criterion, 0)
        criterion_step(criterion, 60)
    assert self_check._results[("native", torch.float32, "cpu")] == (True, "")


def test_without_configured_options_a_bonus_free_call_still_checks_the_bonus_path(monkeypatch):
    """A caller that passes no check_spec (rho 0 now, perhaps more later): checked with rho = 1 too."""
    monkeypatch.setattr(native, "forward", wrong_bonus_path(native.forward))
    logits, target = batch()
    with pytest.warns(RuntimeWarning, match="the native kernel failed its self-check"):
        run(logits, target, BonusSpec(log_end=0.75, rho=0.0))
    assert "at rho 1" in self_check._results[("native", torch.float32, "cpu")][1]

"""The public PyTorch API (el_fairseq.EncouragingLoss / encouraging_loss) against torch's own
cross-entropy with the bonus off, an independent float64 implementation of the authors' formula with
it on, every implementation, reductions, N-D inputs, ignored targets, half precision, bad options."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLoss, encouraging_loss

IMPLS = ["reference", "chunked", "native"]
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def batch(shape, classes, seed, scale=3.0, ignored=0.15):
    """logits (N, C, *rest) and targets (N, *rest) with a share of ignore_index=-100 and some
    confident right predictions (p_y above LE and near 1)."""
    g = torch.Generator().manual_seed(seed)
    n, rest = shape[0], shape[1:]
    logits = torch.randn(n, classes, *rest, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, classes, (n, *rest), generator=g)
    flat_logits = logits.movedim(1, -1).reshape(-1, classes)
    flat_target = target.reshape(-1)
    sure = torch.randperm(flat_target.numel(), generator=g)[: flat_target.numel() // 3]
    flat_logits[sure, flat_target[sure]] += 4 * scale
    logits = flat_logits.reshape(n, *rest, classes).movedim(-1, 1).contiguous()
    drop = torch.rand(target.shape, generator=g) < ignored
    return logits, target.masked_fill(drop, -100)


def bonus64(p, log_end):
    """The authors' conservative log bonus (EncouragingLoss.py), float64."""
    b = torch.log(torch.clamp(1 - p, min=1e-5))
    if log_end != 1.0:
        b = torch.where(p > log_end, (p - log_end) / (log_end - 1) + math.log(1 - log_end), b)
    return b


def reference64(logits, target, log_end=0.75, rho=1.0, eps_b=0.0, eps=0.0, reduction="mean"):
    """Written from the formula: torch's label-smoothed CE + rho [(1-eps_b) b(p_y) + eps_b/C sum_j b(p_j)]."""
    classes = logits.size(1)
    lp = torch.log_softmax(logits.double(), dim=1).movedim(1, -1).reshape(-1, classes)
    t = target.reshape(-1)
    keep = t.ne(-100)
    safe = t.masked_fill(~keep, 0)
    lp_y = lp.gather(-1, safe[:, None])[:, 0]
    b_all = bonus64(lp.exp(), log_end)
    b_y = b_all.gather(-1, safe[:, None])[:, 0]
    loss = (1 - eps) * -lp_y + eps / classes * -lp.sum(-1) + rho * ((1 - eps_b) * b_y + eps_b / classes * b_all.sum(-1))
    loss = loss * keep
    if reduction == "none":
        return loss.reshape(target.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()


def loss_and_grad(fn, logits, dtype=torch.float32):
    z = logits.detach().to(dtype).requires_grad_(True)
    out = fn(z)
    (out.sum() if out.dim() else out).backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("shape", [(37,), (6, 7), (3, 4, 5)], ids=["2d", "3d", "4d"])
def test_bonus_off_is_torch_cross_entropy(impl, reduction, label_smoothing, shape):
    logits, target = batch(shape, 11, seed=len(shape))
    ours = loss_and_grad(lambda z: encouraging_loss(z, target, bonus_rho=0.0, label_smoothing=label_smoothing,
                                                    reduction=reduction, impl=impl), logits)
    torchs = loss_and_grad(lambda z: F.cross_entropy(z, target, label_smoothing=label_smoothing,
                                                     reduction=reduction), logits)
    assert torch.allclose(ours[0], torchs[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours[1], torchs[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("log_end,rho,eps_b,eps", [
    (0.75, 1.0, 0.0, 0.0), (0.5, 1.0, 0.1, 0.1), (1.0, 0.5, 0.0, 0.1), (0.75, 2.0, 0.2, 0.0)])
@pytest.mark.parametrize("shape", [(50,), (4, 9)], ids=["2d", "3d"])
def test_matches_the_authors_formula_in_float64(impl, log_end, rho, eps_b, eps, shape):
    logits, target = batch(shape, 13, seed=7)
    kwargs = dict(log_end=log_end, bonus_rho=rho, bonus_label_smoothing=eps_b, label_smoothing=eps)
    # The plain-torch reference gets float64: in float32 its 1 - p = -expm1(log p) keeps only the
    # logits' absolute precision, too coarse at the authors' 1e-5 clamp of 1 - p (the fused paths
    # sum 1 - p from the other classes and stay exact there).
    dtype = torch.float64 if impl == "reference" else torch.float32
    ours = loss_and_grad(lambda z: encouraging_loss(z, target, impl=impl, **kwargs), logits, dtype)
    ref = loss_and_grad(lambda z: reference64(z, target, log_end, rho, eps_b, eps), logits, torch.float64)
    assert torch.allclose(ours[0].double(), ref[0], rtol=1e-5)
    assert (ours[1].double() - ref[1]).abs().max() < 1e-4 * ref[1].abs().max()


def test_defaults_are_the_authors_module():
    """EncouragingLoss() == their nll_loss(log_softmax(x) - bonus, y) with log_end 0.75, mean."""
    logits, target = batch((64,), 10, seed=3, ignored=0.0)
    lp = torch.log_softmax(logits, -1)
    theirs = F.nll_loss(lp - bonus64(lp.exp(), 0.75), target)
    assert torch.allclose(EncouragingLoss()(logits.float(), target).double(), theirs, rtol=1e-5)
    assert torch.allclose(encouraging_loss(logits, target), theirs, rtol=1e-10)  # float64 input: reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "chunked", "auto"])
def test_half_precision_inputs(dtype, impl):
    logits, target = batch((40,), 17, seed=5, scale=4.0)
    logits[0, :] = -1e4
    logits[0, target[0].clamp(min=0)] = 1e4
    loss, grad = loss_and_grad(lambda z: encouraging_loss(z, target, label_smoothing=0.1, impl=impl), logits, dtype)
    ref = reference64(logits.to(dtype).double(), target, eps=0.1)
    assert loss.dtype == dtype and grad.dtype == dtype and torch.isfinite(grad).all()
    assert torch.allclose(loss.double(), ref, rtol=TOL[dtype])


def test_module_equals_function_and_all_ignored_is_nan():
    logits, target = batch((5, 6), 8, seed=11)
    module = EncouragingLoss(log_end=0.5, label_smoothing=0.1, bonus_label_smoothing=0.1, reduction="sum")
    assert torch.equal(module(logits.float(), target), encouraging_loss(
        logits.float(), target, log_end=0.5, label_smoothing=0.1, bonus_label_smoothing=0.1, reduction="sum"))
    assert "log_end=0.5" in repr(module)
    assert torch.isnan(encouraging_loss(logits.float(), torch.full_like(target, -100)))  # as F.cross_entropy


@pytest.mark.parametrize("kwargs,message", [
    ({"log_end": 1.5}, "log_end 1.5 is out of range: allowed 0 < LE <= 1"),
    ({"reduction": "avg"}, "reduction 'avg' is not known: allowed mean, sum, none"),
    ({"label_smoothing": 1.5}, "label_smoothing 1.5 is out of range: allowed 0 <= label_smoothing <= 1"),
    ({"label_smoothing": -0.1}, "label_smoothing -0.1 is out of range"),
    ({"impl": "gpu"}, "impl 'gpu' is not known"),
    ({"bonus": "power", "bonus_gamma": 0.5}, "bonus_gamma 0.5 is out of range: allowed gamma >= 1"),
    ({"bonus_rho": -1.0}, "bonus_rho -1.0 is out of range"),
    ({"bonus": "exp"}, "bonus 'exp' is out of range"),
])
def test_options_out_of_range_raise_valueerror_naming_the_value(kwargs, message):
    logits, target = batch((4,), 5, seed=1)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encouraging_loss(logits, target, **kwargs)
    with pytest.raises(ValueError, match=message.split(":")[0]):
        EncouragingLoss(**{k: v for k, v in kwargs.items()})


def test_bad_shapes_and_targets():
    logits, target = batch((4, 3), 5, seed=1)
    with pytest.raises(ValueError, match=r"target shape \(4,\) does not match input \(4, 5, 3\)"):
        encouraging_loss(logits, target[:, 0])
    with pytest.raises(ValueError, match=r"target values must be in \[0, 5\)"):
        encouraging_loss(logits, target.masked_fill(target.eq(-100), 0).add(5))


def test_imports_without_fairseq():
    """`from el_fairseq import EncouragingLoss` in a Python where fairseq cannot be imported."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'fairseq' or name.startswith('fairseq.'):\n"
            "            raise ImportError('fairseq blocked for this test')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import torch\n"
            "from el_fairseq import EncouragingLoss\n"
            "x = torch.randn(6, 4, requires_grad=True); y = torch.tensor([0, 1, 2, 3, 0, -100])\n"
            "EncouragingLoss()(x, y).backward()\n"
            "assert 'fairseq' not in sys.modules and x.grad is not None\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_digits_example_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "digits.py"), "--seeds", "1-2", "--epochs",
                          "3"], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line[:3] in ("CE ", "EL ")}
    assert set(rows) == {"CE", "EL"} and all(50 < float(r[1]) <= 100 for r in rows.values())

"""Where the loss met torch's edge cases differently (issue 25): one class, label_smoothing = 1, the float32
reference's bonus of a confident token, and fairseq's shape for an unreduced loss. With the bonus off each is
torch's (fairseq's) own result; with it on, the float64 formula of reference64.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss, encouraging_loss
from reference64 import torch_el_loss64

IMPLS = ["auto", "reference", "chunked", "native"]


def value_and_grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    out.sum().backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_class_is_torchs_zero_loss_and_gradient(reduction):
    z = torch.randn(6, 1) * 3
    target = torch.zeros(6, dtype=torch.long)
    target[1] = -100
    theirs = value_and_grad(lambda z: F.cross_entropy(z, target, reduction=reduction), z)
    for impl in ("auto", "reference"):
        ours = value_and_grad(lambda z: encouraging_loss(z, target, reduction=reduction, bonus_rho=0.0, impl=impl), z)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        bonus = value_and_grad(lambda z: encouraging_loss(z, target, reduction=reduction, impl=impl), z)
        assert torch.allclose(bonus[0].double(), torch_el_loss64(z, target, reduction=reduction), atol=1e-6)
        assert torch.equal(bonus[1], torch.zeros_like(z))  # a softmax over one class does not move
    with pytest.raises(ValueError, match="impl 'native' cannot take 1 class: the fused kernels take at least 2"):
        encouraging_loss(z, target, impl="native")
    # the linear loss of a one-class projection
    x, w = torch.randn(6, 4), torch.randn(1, 4)
    assert torch.equal(encouraging_linear_loss(x, w, target, bonus_rho=0.0, reduction=reduction),
                       F.cross_entropy(F.linear(x, w), target, reduction=reduction))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_one_is_allowed_as_in_torch(impl, reduction):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(17, 9, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 9, (17,), generator=g).masked_fill(torch.rand(17, generator=g) < 0.2, -100)
    options = dict(label_smoothing=1.0, reduction=reduction)
    ours = value_and_grad(lambda z: encouraging_loss(z, target, bonus_rho=0.0, impl=impl, **options), z.float())
    theirs = value_and_grad(lambda z: F.cross_entropy(z, target, **options), z.float())
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5) and torch.allclose(ours[1], theirs[1], atol=1e-6)
    bonus = encouraging_loss(z.float(), target, impl=impl, **options)
    assert torch.allclose(bonus.double(), torch_el_loss64(z, target, **options), rtol=1e-5)
    assert torch.allclose(EncouragingLinearLoss(3, 9, label_smoothing=1.0, bonus_rho=0.0)(torch.zeros(2, 3),
                                                                                           torch.tensor([1, 2])),
                          torch.tensor(math.log(9.0)))
    with pytest.raises(RuntimeError, match="label_smoothing 1.01 is out of range"):  # torch's exception type
        encouraging_loss(z, target, label_smoothing=1.01)


def confident_row(one_minus_p, vocab=1000, seed=0):
    """float64 logits (1, V) whose target (class 3) has probability 1 - one_minus_p."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    rest = torch.logsumexp(torch.cat([z[:3], z[4:]]), 0)
    z[3] = rest + math.log((1 - one_minus_p) / one_minus_p)
    return z.unsqueeze(0), torch.tensor([3])


@pytest.mark.parametrize("one_minus_p", [1e-2, 1e-3, 3.2e-5, 1e-5, 1e-6, 1e-7])
@pytest.mark.parametrize("log_end", [1.0, 0.75])
@pytest.mark.parametrize("bonus_label_smoothing", [0.0, 0.1])
def test_float32_reference_bonus_of_a_confident_token_is_as_precise_as_the_fused_paths(one_minus_p, log_end,
                                                                                       bonus_label_smoothing):
    z, target = confident_row(one_minus_p)
    options = dict(log_end=log_end, bonus_label_smoothing=bonus_label_smoothing)
    want = torch_el_loss64(z, target, eps_b=bonus_label_smoothing, log_end=log_end)
    for impl in ("reference", "native", "chunked"):
        got = encouraging_loss(z.float(), target, impl=impl, **options).double()
        assert abs(float(got - want)) <= 1e-5 * abs(float(want)), (impl, float(got), float(want))


@pytest.mark.parametrize("fused_projection", [False, True])
def test_fairseq_criterion_unreduced_loss_has_fairseqs_shape(fused_projection):
    from fairseq_fixtures import build, make_sample
    from test_fused_projection import VOCAB, ProjectionModel

    model = ProjectionModel(tied=True)
    sample = make_sample(3, 5, VOCAB)
    ours = build("encouraging_loss", VOCAB, el_fused_projection=fused_projection, label_smoothing=0.1, bonus_rho=0.0)
    theirs = build("label_smoothed_cross_entropy", VOCAB, label_smoothing=0.1)
    got, want = ours(model, sample, reduce=False)[0], theirs(model, sample, reduce=False)[0]
    assert got.shape == want.shape == (15, 1)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)

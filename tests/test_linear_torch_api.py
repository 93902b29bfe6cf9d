"""encouraging_linear_loss / EncouragingLinearLoss take what torch's F.linear_cross_entropy and
nn.LinearCrossEntropyLoss take: the gradient of a probability target, ignore_index=None, K-dimensional
weights (C, d1, ..., dK, D) and unbatched input (D,), out_features, one class and label_smoothing=1. With
the bonus off each equals torch (value and every gradient), with it on the float64 formula of
reference64 (torch_el_loss64 of torch's logits, linear_logits64). tests/test_torch_samples.py runs
torch's own samples of the same; these pin each item with sizes that chunk raggedly."""
import re

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss, encouraging_loss
from reference64 import linear_logits64, torch_el_loss64

N, D, C, CHUNK = 11, 6, 5, 4  # 11 rows = 3 chunks of 4, the last ragged
REDUCTIONS = ["mean", "sum", "none"]


def tensors(*shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for shape in shapes]


def probabilities(shape, dim, seed=1, dtype=torch.float64, zero_class=None):
    """Class probabilities along `dim`; class `zero_class` has probability 0 in every other row."""
    p = torch.softmax(tensors(shape, seed=seed, dtype=dtype)[0] * 2, dim=dim)
    if zero_class is not None:
        p = p.movedim(dim, -1).clone()
        p[::2, ..., zero_class] = 0.0
        p = (p / p.sum(-1, keepdim=True)).movedim(-1, dim)
    return p


def indices(shape, classes=C, seed=2, ignored=-100):
    t = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(seed))
    t.view(-1)[1::4] = ignored
    return t


def class_weight(classes=C, dtype=torch.float64):
    return torch.linspace(0.5, 2.0, classes, dtype=dtype)


def value_and_grads(fn, *args, seed=3):
    """fn(*leaves) and the gradients of <loss, r> w.r.t. every floating-point argument (r random for 'none')."""
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a for a in args]
    out = fn(*leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    wrt = [a for a in leaves if torch.is_tensor(a) and a.requires_grad]
    grads = torch.autograd.grad((out.double() * r).sum(), wrt, allow_unused=True)
    return out.detach().double(), [None if g is None else g.double() for g in grads]


def assert_same(got, want, rtol=1e-9):
    (value, grads), (ref, ref_grads) = got, want
    assert value.shape == ref.shape, (value.shape, ref.shape)
    assert torch.allclose(value, ref, rtol=rtol, atol=rtol * ref.abs().max()), (value, ref)
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g is not None, f"no gradient for argument {i}"
        assert torch.allclose(g, r, rtol=rtol, atol=rtol * r.abs().max()), (i, (g - r).abs().max())


def formula(reduction, label_smoothing=0.0, weight=None, ignore_index=-100, eps_b=0.0, rho=1.0, class_dim=1):
    """The float64 formula of torch's logits of (x, W, b), as a function of (x, W, b, target); class_dim -1:
    the logits (..., C) of our (..., D) input, moved to torch's class dimension 1."""
    def loss(x, w, b, target):
        logits = linear_logits64(x, w, b)
        if class_dim == -1 and logits.dim() > 2:
            logits, target = logits.movedim(-1, 1), target.movedim(-1, 1) if target.is_floating_point() else target
        return torch_el_loss64(logits, target, weight, ignore_index, reduction, label_smoothing, rho=rho, eps_b=eps_b)
    return loss


# 1. A probability target that requires grad gets d loss / d target (it stayed None).

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", [(N,), (3, 4)], ids=["2d", "3d-tokens"])
def test_probability_target_gets_its_gradient(reduction, batch):
    x, w, b = tensors((*batch, D), (C, D), (C,))
    t = probabilities((*batch, C), dim=-1, zero_class=2)  # d/dt_j at t_j = 0 too: -w_j log p_j, not 0
    cw = class_weight()
    off = dict(reduction=reduction, label_smoothing=0.1, weight=cw, bonus_rho=0.0, chunk_size=CHUNK)
    ours = value_and_grads(lambda *a: encouraging_linear_loss(*a[:2], a[3], linear_bias=a[2], **off), x, w, b, t)
    theirs = value_and_grads(lambda *a: F.linear_cross_entropy(
        a[0].reshape(-1, D), a[1], a[3].reshape(-1, C), linear_bias=a[2], reduction=reduction, label_smoothing=0.1,
        weight=cw).reshape(batch if reduction == "none" else ()), x, w, b, t)
    assert_same(ours, theirs)
    on = dict(reduction=reduction, label_smoothing=0.1, bonus_label_smoothing=0.2, weight=cw, chunk_size=CHUNK)
    ours = value_and_grads(lambda *a: encouraging_linear_loss(*a[:2], a[3], linear_bias=a[2], **on), x, w, b, t)
    want = value_and_grads(formula(reduction, 0.1, cw, eps_b=0.2, class_dim=-1), x, w, b, t)
    assert_same(ours, want)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_logits_loss_probability_gradient_at_a_zero_probability_class_is_torchs(impl):
    z, = tensors((N, C))
    t = probabilities((N, C), dim=1, zero_class=0)
    ours = value_and_grads(lambda z, t: encouraging_loss(z, t, class_weight(), bonus_rho=0.0, impl=impl), z, t)
    assert_same(ours, value_and_grads(lambda z, t: F.cross_entropy(z, t, class_weight()), z, t))


# 2. ignore_index=None, torch's default for linear_cross_entropy (a TypeError for 'mean' and weight= before).

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_ignore_index_none_is_minus_100_for_class_indices(reduction, weighted):
    x, w, b = tensors((N, D), (C, D), (C,))
    t = indices((N,))
    cw = class_weight() if weighted else None
    kwargs = dict(reduction=reduction, weight=cw)
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(
        x, w, t, linear_bias=b, ignore_index=None, bonus_rho=0.0, chunk_size=CHUNK, **kwargs), x, w, b)
    theirs = value_and_grads(lambda x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, ignore_index=None,
                                                                    **kwargs), x, w, b)
    assert_same(ours, theirs)
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(x, w, t, linear_bias=b, ignore_index=None,
                                                                   chunk_size=CHUNK, **kwargs), x, w, b)
    assert_same(ours, value_and_grads(formula(reduction, weight=cw), x, w, b, t))


def test_module_ignore_index_none():
    t = indices((N,))
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, C, bias=True, dtype=torch.float64, ignore_index=None)
    ours = EncouragingLinearLoss(D, C, bias=True, dtype=torch.float64, ignore_index=None, bonus_rho=0.0)
    ours.load_state_dict(theirs.state_dict())
    x, = tensors((N, D))
    assert torch.allclose(ours(x, t), theirs(x, t), rtol=1e-12)
    assert "ignore_index=None" in repr(ours)


def test_probability_target_refuses_an_ignore_index_as_torch():
    x, w = tensors((N, D), (C, D))
    t = probabilities((N, C), dim=1)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified when target contains probabilities"):
        encouraging_linear_loss(x, w, t, ignore_index=3)
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
        EncouragingLinearLoss(D, C, ignore_index=0)(x.float(), t.float())
    want = F.linear_cross_entropy(x, w, t)
    for ignore_index in (None, -100):  # torch's default, and ours
        assert torch.allclose(encouraging_linear_loss(x, w, t, ignore_index=ignore_index, bonus_rho=0.0), want)


def test_logits_loss_refuses_a_nonnegative_ignore_index_with_probabilities_as_torch():
    z, = tensors((N, C))
    t = probabilities((N, C), dim=1)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(z, t, ignore_index=1)  # torch's rule, which ours follows
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        encouraging_loss(z, t, ignore_index=1)
    for ignore_index in (-100, -1):
        assert torch.allclose(encouraging_loss(z, t, ignore_index=ignore_index, bonus_rho=0.0),
                              F.cross_entropy(z, t, ignore_index=ignore_index))


# 3. torch's K-dimensional weights (C, d1, ..., dK, D) and unbatched input (D,).

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("out_features", [(3,), (2, 4)], ids=["K1", "K2"])
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_k_dimensional_weight(reduction, out_features, kind):
    x, w, b = tensors((N, D), (C, *out_features, D), (C, *out_features))
    t = indices((N, *out_features)) if kind == "indices" else probabilities((N, C, *out_features), dim=1)
    cw = class_weight()
    kwargs = dict(reduction=reduction, weight=cw, label_smoothing=0.1)
    ours = value_and_grads(lambda x, w, b, t: encouraging_linear_loss(x, w, t, linear_bias=b, bonus_rho=0.0,
                                                                      ignore_index=None, **kwargs), x, w, b, t)
    theirs = value_and_grads(lambda x, w, b, t: F.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs), x, w, b, t)
    assert_same(ours, theirs)
    ours = value_and_grads(lambda x, w, b, t: encouraging_linear_loss(x, w, t, linear_bias=b, **kwargs), x, w, b, t)
    assert_same(ours, value_and_grads(formula(reduction, 0.1, cw), x, w, b, t))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_unbatched_input(reduction, kind):
    x, w, b = tensors((D,), (C, D), (C,))
    t = torch.tensor(3) if kind == "indices" else probabilities((C,), dim=0)
    ours = value_and_grads(lambda x, w, b, t: encouraging_linear_loss(x, w, t, linear_bias=b, reduction=reduction,
                                                                      bonus_rho=0.0), x, w, b, t)
    theirs = value_and_grads(lambda x, w, b, t: F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction),
                             x, w, b, t)
    assert_same(ours, theirs)
    ours = value_and_grads(lambda x, w, b, t: encouraging_linear_loss(x, w, t, linear_bias=b, reduction=reduction),
                           x, w, b, t)
    assert_same(ours, value_and_grads(formula(reduction), x, w, b, t))


@pytest.mark.parametrize("call, message", [
    (lambda x, w, t: encouraging_linear_loss(x[0], w, t[0]), r"a K-dimensional loss, takes input \(N, 6\)"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t, linear_bias=torch.zeros(C)), r"expected \(5, 3\)"),
    (lambda x, w, t: encouraging_linear_loss(x, w, t[:, :2]), r"expected \(11, 3\) \(class indices\) or \(11, 5, 3\)"),
])
def test_k_dimensional_shapes_refused_in_one_line_as_torch(call, message):
    x, w = tensors((N, D), (C, 3, D))
    t = indices((N, 3))
    for error in (RuntimeError, ValueError):  # torch's type, and ours for every bad argument
        with pytest.raises(error, match=message):
            call(x, w, t)


# 4. EncouragingLinearLoss(in_features, num_classes, *, out_features=...), as nn.LinearCrossEntropyLoss.

@pytest.mark.parametrize("kind", ["indices", "probabilities"])
def test_module_out_features_is_torchs(kind):
    out_features = (2, 3)
    options = dict(out_features=out_features, bias=True, dtype=torch.float64, weight=class_weight(),
                   label_smoothing=0.2, reduction="sum")
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(D, C, ignore_index=None, **options)
    ours = EncouragingLinearLoss(D, C, ignore_index=None, bonus_rho=0.0, **options)
    ours.load_state_dict(theirs.state_dict())  # the same parameters and buffers, by name and shape
    x, = tensors((N, D))
    t = indices((N, *out_features)) if kind == "indices" else probabilities((N, C, *out_features), dim=1)
    x.requires_grad_(True)
    for module in (theirs, ours):
        module(x, t).backward()
    for mine, torchs in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(mine.grad, torchs.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(ours(x, t), theirs(x, t), rtol=1e-12)
    assert "out_features=(2, 3)" in repr(ours)


@pytest.mark.parametrize("out_features", [3, (2, 0), (2.0,), None])
def test_bad_out_features_refused_in_one_line(out_features):
    with pytest.raises(ValueError, match=re.escape(f"out_features {out_features!r} is not allowed: a tuple of "
                                                   f"positive ints (d1, ..., dK), or () for none")):
        EncouragingLinearLoss(D, C, out_features=out_features)


# 5. One class (V = 1) and label_smoothing = 1, both of which torch takes.

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
def test_one_class(reduction, label_smoothing):
    x, w, b = tensors((N, D), (1, D), (1,))
    t = indices((N,), classes=1)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(x, w, t, linear_bias=b, bonus_rho=0.0, **kwargs),
                           x, w, b)
    assert_same(ours, value_and_grads(lambda x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs),
                                      x, w, b))
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(x, w, t, linear_bias=b, **kwargs), x, w, b)
    assert_same(ours, value_and_grads(formula(reduction, label_smoothing), x, w, b, t))


# a fused impl refuses weight with label smoothing (test_torch_parity): weighted on auto and reference only
@pytest.mark.parametrize("impl, weighted", [(impl, False) for impl in ("auto", "native", "chunked", "reference")]
                         + [("auto", True), ("reference", True)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing_one(impl, weighted, reduction):
    x, w, b = tensors((N, D), (C, D), (C,), dtype=torch.float32)
    t = indices((N,))
    kwargs = dict(reduction=reduction, label_smoothing=1.0, weight=class_weight(dtype=torch.float32) if weighted
                  else None)
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(
        x, w, t, linear_bias=b, bonus_rho=0.0, impl=impl, chunk_size=CHUNK, **kwargs), x, w, b)
    theirs = value_and_grads(lambda x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, **kwargs), x, w, b)
    assert_same(ours, theirs, rtol=1e-5)
    ours = value_and_grads(lambda x, w, b: encouraging_linear_loss(x, w, t, linear_bias=b, impl=impl,
                                                                   chunk_size=CHUNK, **kwargs), x, w, b)
    assert_same(ours, value_and_grads(formula(reduction, 1.0, kwargs["weight"]), x, w, b, t), rtol=1e-5)

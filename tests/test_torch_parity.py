"""The public loss as a drop-in for nn.CrossEntropyLoss / F.cross_entropy: torch's argument order,
per-class `weight`, probability targets, double backward and float64 gradcheck. With the bonus off it
must equal torch's own cross-entropy (loss and gradient); with it on, the float64 formula of
reference64.torch_el_loss64. Odd sizes, ignored targets, N-D layouts, every impl that takes the option."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLoss, encouraging_loss
from reference64 import torch_el_loss64
from test_public_api import batch, loss_and_grad

FUSED = ["chunked", "native"]
CLASSES = 11
SHAPES = {"2d": (37,), "3d": (6, 7), "4d": (3, 4, 5)}


def class_weight(classes=CLASSES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(classes, generator=g, dtype=torch.float64) * 2 + 0.1


def soft_target(logits, seed, sharp=2.0):
    """Class probabilities shaped like logits (N, C, d...), some rows nearly one-hot."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(logits.shape, generator=g, dtype=torch.float64) * sharp, dim=1)


def assert_same(ours, theirs, rtol=1e-5):
    assert torch.allclose(ours[0].double(), theirs[0].double(), rtol=rtol, atol=1e-6)
    err = (ours[1].double() - theirs[1].double()).abs().max()
    assert err <= 1e-4 * theirs[1].abs().max() + 1e-7, float(err)


def test_signature_is_torchs_order_with_el_options_keyword_only():
    torch_names = ["weight", "ignore_index", "reduction", "label_smoothing"]  # less the deprecated two
    for fn, skip in ((EncouragingLoss.__init__, 1), (encouraging_loss, 2)):
        params = list(inspect.signature(fn).parameters.values())[skip:]
        positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert positional == torch_names
        defaults = {p.name: p.default for p in params}
        assert (defaults["ignore_index"], defaults["reduction"], defaults["label_smoothing"]) == (-100, "mean", 0.0)
        assert all(p.kind == p.KEYWORD_ONLY for p in params if p.name not in torch_names)
        assert defaults["log_end"] == 0.75 and defaults["bonus"] == "log" and defaults["bonus_rho"] == 1.0


def test_module_takes_torchs_positional_arguments():
    """EncouragingLoss(w, ignore, reduction, eps, bonus_rho=0) == nn.CrossEntropyLoss(w, ignore_index=...)."""
    logits, target = batch((23,), CLASSES, seed=4)
    target = target.masked_fill(target.eq(-100), 3)
    w = class_weight()
    ours = EncouragingLoss(w, 3, "sum", 0.1, bonus_rho=0.0)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=3, reduction="sum", label_smoothing=0.1)
    assert torch.allclose(ours(logits, target), theirs(logits, target), rtol=1e-12)
    assert "weight" in ours.state_dict() and ours.float().weight.dtype == torch.float32  # a buffer, as in torch
    with pytest.raises(TypeError):
        EncouragingLoss(w, -100, "mean", 0.0, 0.5)  # log_end is keyword-only


@pytest.mark.parametrize("impl", ["auto", "reference"] + FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_weight_with_bonus_off_is_torch_cross_entropy(impl, reduction, label_smoothing, shape):
    logits, target = batch(shape, CLASSES, seed=len(shape))
    w = class_weight()
    kwargs = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    if impl in FUSED and label_smoothing:  # torch weights the smoothing per class: not in the fused kernels
        with pytest.raises(ValueError, match=f"impl '{impl}' does not take weight with label_smoothing"):
            encouraging_loss(logits.float(), target, bonus_rho=0.0, impl=impl, **kwargs)
        return
    ours = loss_and_grad(lambda z: encouraging_loss(z, target, bonus_rho=0.0, impl=impl, **kwargs), logits)
    theirs = loss_and_grad(lambda z: F.cross_entropy(z, target, **{**kwargs, "weight": w.float()}), logits)
    assert_same(ours, theirs)


@pytest.mark.parametrize("impl", ["auto", "reference"] + FUSED)
@pytest.mark.parametrize("options", [
    dict(), dict(log_end=0.5, label_smoothing=0.1, bonus_label_smoothing=0.2),
    dict(log_end=1.0, bonus_rho=0.5, bonus_label_smoothing=0.1), dict(bonus="power", bonus_gamma=2.0, reduction="sum"),
    dict(bonus="cosine", bonus_start=0.3, reduction="none", label_smoothing=0.15)], ids=str)
@pytest.mark.parametrize("shape", [SHAPES["2d"], SHAPES["4d"]], ids=["2d", "4d"])
def test_weight_with_bonus_matches_float64_formula(impl, options, shape):
    logits, target = batch(shape, CLASSES, seed=9)
    w = class_weight(seed=1)
    smoothed = options.get("label_smoothing", 0) or options.get("bonus_label_smoothing", 0)
    if impl in FUSED and smoothed:
        with pytest.raises(ValueError, match="allowed impl='auto' or impl='reference'"):
            encouraging_loss(logits.float(), target, w, impl=impl, **options)
        return
    # float32 through the fused paths and "auto"; the plain-torch reference in float64 (see test_public_api).
    dtype = torch.float64 if impl == "reference" else torch.float32
    ours = loss_and_grad(lambda z: encouraging_loss(z, target, w, impl=impl, **options), logits, dtype)
    ref = loss_and_grad(lambda z: torch_el_loss64(z, target, w, **_ref_options(options)), logits, torch.float64)
    assert_same(ours, ref)


def _ref_options(options):
    names = dict(bonus_rho="rho", bonus_label_smoothing="eps_b", bonus="kind", bonus_gamma="gamma", bonus_start="start")
    return {names.get(k, k): v for k, v in options.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_probability_targets_with_bonus_off_are_torch_cross_entropy(reduction, label_smoothing, weighted, shape):
    logits, _ = batch(shape, CLASSES, seed=2)
    q = soft_target(logits, seed=3)
    kwargs = dict(weight=class_weight() if weighted else None, reduction=reduction, label_smoothing=label_smoothing)
    ours = loss_and_grad(lambda z: encouraging_loss(z, q.float(), bonus_rho=0.0, **kwargs), logits)
    if weighted:
        kwargs["weight"] = kwargs["weight"].float()
    theirs = loss_and_grad(lambda z: F.cross_entropy(z, q.float(), **kwargs), logits)
    assert_same(ours, theirs)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("options", [
    dict(), dict(log_end=0.5, label_smoothing=0.1, bonus_label_smoothing=0.2, reduction="sum"),
    dict(bonus="power", bonus_gamma=1.5, bonus_start=0.2, reduction="none")], ids=str)
def test_probability_targets_with_bonus_match_float64_formula(impl, options):
    logits, _ = batch((5, 7), CLASSES, seed=6)
    q = soft_target(logits, seed=7, sharp=4.0)
    w = class_weight(seed=2)
    ours = loss_and_grad(lambda z: encouraging_loss(z, q, w, impl=impl, **options), logits, torch.float64)
    ref = loss_and_grad(lambda z: torch_el_loss64(z, q, w, **_ref_options(options)), logits, torch.float64)
    assert_same(ours, ref)


def test_smoothed_one_hot_probabilities_are_bonus_smoothing():
    """q = (1 - eps_b) one_hot + eps_b / C as probabilities, no smoothing option == class index with
    bonus_label_smoothing eps_b (and label_smoothing eps_b, which smooths the CE part the same way)."""
    logits, target = batch((29,), CLASSES, seed=8, ignored=0.0)
    eps_b = 0.2
    q = F.one_hot(target, CLASSES).double() * (1 - eps_b) + eps_b / CLASSES
    as_probs = encouraging_loss(logits, q, log_end=0.5)
    as_index = encouraging_loss(logits, target, log_end=0.5, label_smoothing=eps_b, bonus_label_smoothing=eps_b)
    assert torch.allclose(as_probs, as_index, rtol=1e-12)


@pytest.mark.parametrize("options", [
    dict(), dict(label_smoothing=0.1, bonus_label_smoothing=0.1, log_end=0.5),
    dict(bonus="cosine", reduction="sum")], ids=str)
@pytest.mark.parametrize("target_kind", ["index", "weighted", "probabilities"])
def test_float64_gradcheck_and_double_backward(options, target_kind):
    logits, target = batch((3, 5, 2), 4, seed=12, scale=1.0, ignored=0.2)  # 4d, odd sizes
    weight = class_weight(4) if target_kind == "weighted" else None
    if target_kind == "probabilities":
        target = soft_target(logits, seed=13)
    fn = lambda z: encouraging_loss(z, target, weight, **options)  # noqa: E731  (auto: float64 -> reference)
    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradgradcheck(fn, (z,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", FUSED + ["auto"])
def test_fused_paths_refuse_double_backward_and_gradcheck_naming_reference(impl):
    logits, target = batch((9,), 5, seed=1)
    z = logits.float().requires_grad_(True)  # float32: "auto" runs a fused kernel
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) needs impl='reference'"):
        torch.autograd.grad(encouraging_loss(z, target, impl=impl), z, create_graph=True)
    if impl == "auto":  # float64 "auto" is the reference: gradcheck passes (test above)
        return
    z64 = logits.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="second backward through the same graph .* needs impl='reference'"):
        torch.autograd.gradcheck(lambda x: encouraging_loss(x, target, impl=impl), (z64,))


def test_bad_weight_and_probability_targets_raise_one_line():
    logits, target = batch((6,), 5, seed=1)
    with pytest.raises(ValueError, match=r"weight torch.float64 \(4,\) is not allowed: expected .* shape \(5,\)"):
        encouraging_loss(logits, target, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight list is not allowed"):
        EncouragingLoss([1.0, 2.0])
    with pytest.raises(ValueError, match="holds class probabilities and must be floating point, got torch.int64"):
        encouraging_loss(logits, torch.ones(6, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="impl 'native' does not take probability targets"):
        encouraging_loss(logits.float(), torch.full((6, 5), 0.2), impl="native")
    with pytest.raises(ValueError, match="target of class indices must be an integer tensor, got torch.float32"):
        encouraging_loss(logits, torch.zeros(6))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weight_and_probabilities(dtype):
    logits, target = batch((40,), 17, seed=5, scale=4.0)
    w = class_weight(17)
    q = soft_target(logits, seed=5)
    z = logits.to(dtype)
    for got, want in (
            (encouraging_loss(z, target, w.to(dtype), label_smoothing=0.1), torch_el_loss64(z, target, w.to(dtype),
                                                                                             label_smoothing=0.1)),
            (encouraging_loss(z, q.to(dtype), w), torch_el_loss64(z, q.to(dtype), w))):
        assert got.dtype == dtype and torch.allclose(got.double(), want, rtol=2e-2 if dtype == torch.float16 else 5e-2)


@pytest.mark.parametrize("weighted", [False, True])
def test_masked_classes_with_zero_probability_count_zero(weighted):
    """A class masked to -inf where the target puts no mass: the loss and gradient of the other classes
    (torch's cross-entropy gives nan there)."""
    logits, _ = batch((4, 3), 6, seed=14)
    q = soft_target(logits, seed=15)
    w = class_weight(6) if weighted else None
    q[:, 2] = 0.0
    q = q / q.sum(1, keepdim=True)
    masked = logits.clone()
    masked[:, 2] = -float("inf")
    keep = [0, 1, 3, 4, 5]
    for impl in ("auto", "reference"):
        ours = loss_and_grad(lambda z: encouraging_loss(z, q, w, log_end=0.5, impl=impl), masked, torch.float64)
        rest = loss_and_grad(lambda z: torch_el_loss64(z, q[:, keep], None if w is None else w[keep], log_end=0.5),
                             logits[:, keep], torch.float64)
        assert torch.allclose(ours[0], rest[0], rtol=1e-10) and torch.isfinite(ours[1]).all()
        assert torch.allclose(ours[1][:, keep], rest[1], atol=1e-10) and not ours[1][:, 2].any()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unbatched_input_as_torch(reduction):
    """input (C,) with a class index () or probabilities (C,), as F.cross_entropy takes them."""
    logits, target = batch((1,), 7, seed=16, ignored=0.0)
    z, y, q, w = logits[0].float(), target[0], soft_target(logits, seed=17)[0].float(), class_weight(7).float()
    for tgt in (y, q):
        ours = encouraging_loss(z, tgt, w, reduction=reduction, label_smoothing=0.1, bonus_rho=0.0)
        theirs = F.cross_entropy(z, tgt, w, reduction=reduction, label_smoothing=0.1)
        assert ours.shape == theirs.shape == () and torch.allclose(ours, theirs, rtol=1e-6)


# The fused linear head (encouraging_linear_loss) takes the same weight= and probability targets.
def linear_problem(shape=(5, 7), d=6, v=CLASSES, seed=20):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.2, -100)
    return x, w, b, target


def linear_grads(fn, x, w, b, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w, b)]
    out = fn(*leaves)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return out.detach(), torch.autograd.grad((out.double() * r).sum(), leaves)


@pytest.mark.parametrize("impl", ["auto", "reference"] + FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, bonus_label_smoothing=0.2, log_end=0.5),
                                     dict(bonus_rho=0.0, label_smoothing=0.2)], ids=str)
@pytest.mark.parametrize("target_kind", ["weighted", "probabilities"])
def test_linear_loss_takes_weight_and_probabilities(impl, reduction, options, target_kind):
    from el_fairseq import encouraging_linear_loss

    x, w, b, target = linear_problem()
    cw = class_weight(seed=5)
    if target_kind == "probabilities":
        target = torch.softmax(torch.randn(*target.shape, CLASSES, generator=torch.Generator().manual_seed(4)) * 2, -1)
        target = target.double()
    smoothed = options.get("label_smoothing", 0) or options.get("bonus_label_smoothing", 0)
    kwargs = dict(weight=cw, reduction=reduction, impl=impl, **options)
    if impl in FUSED and (smoothed or target_kind == "probabilities"):
        with pytest.raises(ValueError, match=f"impl '{impl}' does not take .*: allowed impl='auto' or impl='reference'"):
            encouraging_linear_loss(x.float(), w.float(), target, linear_bias=b.float(), **kwargs)
        return
    dtype = torch.float64 if impl == "reference" else torch.float32
    ours = linear_grads(lambda x, w, b: encouraging_linear_loss(x, w, target.to(dtype) if target.is_floating_point()
                                                                else target, linear_bias=b, chunk_size=8, **kwargs),
                        x, w, b, dtype)
    logits = lambda x, w, b: F.linear(x, w, b).movedim(-1, 1)  # noqa: E731  (torch's class dimension 1)
    ref = linear_grads(lambda x, w, b: torch_el_loss64(logits(x, w, b), target.movedim(-1, 1) if target_kind ==
                                                       "probabilities" else target, cw, **_ref_options(
                                                           {**options, "reduction": reduction})), x, w, b,
                       torch.float64)
    assert torch.allclose(ours[0].double(), ref[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(ours[1], ref[1]):
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7
    if options.get("bonus_rho") == 0.0:  # and torch's own loss of the full logits
        theirs = F.cross_entropy(logits(x, w, b), target.movedim(-1, 1) if target_kind == "probabilities" else target,
                                 cw, reduction=reduction, label_smoothing=options["label_smoothing"])
        assert torch.allclose(ours[0].double(), theirs, rtol=1e-5, atol=1e-6)


def test_linear_module_weight_is_a_buffer():
    from el_fairseq import EncouragingLinearLoss

    x, w, b, target = linear_problem(shape=(9,))
    head = EncouragingLinearLoss(6, CLASSES, weight=class_weight(seed=6).float(), bonus_rho=0.0)
    with torch.no_grad():
        head.linear.weight.copy_(w)
    assert "weight" in head.state_dict()
    want = F.cross_entropy(F.linear(x.float(), head.linear.weight), target, head.weight)
    assert torch.allclose(head(x.float(), target), want, rtol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_loss_double_backward_refused_or_on_reference(reduction, weighted):
    from el_fairseq import encouraging_linear_loss

    x, w, b, target = linear_problem(shape=(4,), v=5)
    cw = class_weight(5, seed=7) if weighted else None
    kwargs = dict(linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.1 if weighted else 0.0)
    fn = lambda x: encouraging_linear_loss(x, w, target, impl="reference", **kwargs)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)
    z = x.float().requires_grad_(True)
    out = encouraging_linear_loss(z, w.float(), target, **{**kwargs, "linear_bias": b.float()})
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) needs impl='reference'"):
        torch.autograd.grad(out.sum(), z, create_graph=True)

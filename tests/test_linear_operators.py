"""The fused linear loss's torch.library operators (el_fairseq/loss/linear_ops.py) and torch.func on the linear
loss: torch.library.opcheck of each operator in float32 and float64 (with and without ignored targets, class
weights, both smoothings, every bonus, probability targets), their vmap rules against a loop over the samples,
the default path under grad, vmap, vmap(grad), jacrev and jacfwd against the independent float64 formula, and
double backward: refused on the fused path, naming impl='reference', on which it works."""
import pytest
import torch
from torch.func import grad, jacfwd, jacrev, vmap

from el_fairseq import encouraging_linear_loss
from el_fairseq.loss import linear_ops
from el_fairseq.loss.bonus import BonusSpec
from el_fairseq.loss.kernel_inputs import KernelInputError
from el_fairseq.loss.linear_ops import CLASS_WEIGHTED, Options
from reference64 import linear_logits64, torch_el_loss64

N, D, V, CHUNK = 7, 5, 9, 3  # 7 rows = chunks of 3, 3 and 1

# (kernel, probability targets, class weights, fairseq epsilon or torch label_smoothing, bonus, ignore_index)
CASES = {  # every bonus; fused and class-weighted kernels; ignored targets or none; both smoothings
    "log-smoothed-ignored": ("auto", False, False, 0.1, BonusSpec("log", 0.75, 1.0, 0.0, 0.0, 1.0), -100),
    "power-bonus-smoothing-none-ignored": ("chunked", False, False, 0.0, BonusSpec("power", 0.5, 2.0, 0.0, 0.2, 0.5),
                                           None),
    "cosine-class-weights-both-smoothings": (CLASS_WEIGHTED, False, True, 0.1,
                                             BonusSpec("cosine", 0.5, 1.0, 0.2, 0.1, 1.0), -100),
    "probabilities-weighted": (CLASS_WEIGHTED, True, True, 0.05, BonusSpec("log", 1.0, 1.0, 0.0, 0.0, 2.0), -100),
}
FULL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def operator_inputs(case, dtype, seed=0):
    """(input, weight, bias, target, class_weight, Options) of a CASES entry, every float input requiring grad."""
    kernel, soft, weighted, smoothing, spec, ignore_index = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    if soft:
        target = torch.softmax(torch.randn(N, V, generator=g, dtype=dtype), -1).requires_grad_()
    else:
        target = torch.randint(0, V, (N,), generator=g)
        if ignore_index is not None:
            target[[1, 4]] = ignore_index
    class_weight = torch.rand(V, generator=g, dtype=dtype) + 0.5 if weighted else None
    epsilon, label_smoothing = (0.0, smoothing) if kernel == CLASS_WEIGHTED else (smoothing, 0.0)
    return x, w, b, target, class_weight, Options(epsilon, label_smoothing, spec, ignore_index, kernel, CHUNK)


def needs_of(target):
    return [True, True, True, target.is_floating_point()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_every_operator(case, dtype):
    x, w, b, target, class_weight, options = operator_inputs(case, dtype)
    needs = needs_of(target)
    summed = (x, w, b, target, class_weight, *options.args())
    # in_place_backward=False is what a compiled graph runs: the full check, AOT autograd included; the
    # eager in-place backward (one backward per forward) is not for AOT autograd, which the caller never hands it
    torch.library.opcheck(linear_ops.linear_loss_summed, (*summed, False, needs), test_utils=FULL)
    torch.library.opcheck(linear_ops.linear_loss_summed, (*summed, True, needs), test_utils=FULL[:3])
    torch.library.opcheck(linear_ops.linear_loss_per_token, summed, test_utils=FULL)
    grad_loss = torch.randn(N, generator=torch.Generator().manual_seed(1), dtype=dtype)
    detached = [None if t is None else t.detach() for t in (x, w, b, target)]
    torch.library.opcheck(linear_ops.linear_loss_per_token_backward,
                          (grad_loss, *detached, class_weight, *options.args(), needs), test_utils=FULL)


@pytest.mark.parametrize("case", ["log-smoothed-ignored", "probabilities-weighted"])
def test_operators_equal_the_float64_formula(case):
    """Each operator's loss and gradients (the summed one's from its forward, the per-token one's from its
    backward operator) against autograd through torch_el_loss64 of the float64 logits."""
    x, w, b, target, class_weight, options = operator_inputs(case, torch.float64)
    soft, spec = target.is_floating_point(), options.spec
    smoothing = options.label_smoothing if soft else options.epsilon * V / (V - 1)  # fairseq's eps in torch's
    ignore = -100 if options.ignore_index is None else options.ignore_index
    per_row = torch_el_loss64(linear_logits64(x, w, b), target, class_weight, ignore, "none", smoothing, spec.rho,
                              spec.epsilon, spec.kind, spec.log_end, spec.gamma, spec.start)
    scale = torch.randn(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    leaves = (x, w, b, target) if soft else (x, w, b)
    want_summed = torch.autograd.grad(per_row.sum(), leaves, retain_graph=True)
    want_scaled = torch.autograd.grad((per_row * scale).sum(), leaves)
    args = [t.detach() if torch.is_tensor(t) else t for t in (x, w, b, target, class_weight)]
    loss, _, _, *grads = linear_ops.linear_loss_summed(*args, *options.args(), False, needs_of(target))
    assert torch.allclose(loss, per_row.sum(), rtol=1e-10)
    for got, want in zip(grads, want_summed):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    per_token = linear_ops.linear_loss_per_token(*args, *options.args())[0]
    assert torch.allclose(per_token, per_row, rtol=1e-10, atol=1e-12)
    grads = linear_ops.linear_loss_per_token_backward(scale, *args, *options.args(), needs_of(target))
    for got, want in zip(grads, want_scaled):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "class-weights"])
def test_an_explicit_fused_impl_under_vmap_runs_the_operators_vmap_rules(reduction, weighted):
    """vmap over a batch of problems, the projection shared (the per-token rule folds the samples into rows) or
    vmapped too (each sample in turn), equals the loop over the samples."""
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(3, N, D, generator=g), torch.randint(0, V, (3, N), generator=g)
    target[0, 2] = target[2, 0] = -100
    w, b, ws = torch.randn(V, D, generator=g), torch.randn(V, generator=g), torch.randn(3, V, D, generator=g)
    options = dict(reduction=reduction, impl="chunked", chunk_size=CHUNK, label_smoothing=0.1,
                   weight=torch.rand(V, generator=g) + 0.5 if weighted else None)
    if weighted:
        options["label_smoothing"] = 0.0  # class weights with smoothing are not a fused impl's
    shared = vmap(lambda x, t: encouraging_linear_loss(x, w, t, linear_bias=b, **options))(x, target)
    loop = torch.stack([encouraging_linear_loss(x[i], w, target[i], linear_bias=b, **options) for i in range(3)])
    assert torch.allclose(shared, loop, rtol=1e-5, atol=1e-6)
    own = vmap(lambda x, w, t: encouraging_linear_loss(x, w, t, **options))(x, ws, target)
    loop = torch.stack([encouraging_linear_loss(x[i], ws[i], target[i], **options) for i in range(3)])
    assert torch.allclose(own, loop, rtol=1e-5, atol=1e-6)


def test_an_explicit_fused_impl_under_grad_is_refused_in_one_line():
    x, w, target = torch.randn(N, D), torch.randn(V, D), torch.randint(0, V, (N,))
    with pytest.raises(KernelInputError, match="impl 'chunked' cannot take input .*impl='auto' or 'reference'") as err:
        vmap(grad(lambda x: encouraging_linear_loss(x, w, target, impl="chunked")))(x.expand(2, N, D))
    assert "\n" not in str(err.value)


FUNC_OPTIONS = {
    "log-ignored": dict(log_end=0.75),
    "smoothing-class-weights": dict(label_smoothing=0.1, bonus_label_smoothing=0.2, bonus="power", bonus_gamma=2.0,
                                    weight="class"),
    "probabilities": dict(bonus="cosine", target="probabilities"),
}


def func_problem(name, dtype):
    """(loss_fn(x, w, b, target) on the default path, its float64 formula, x, w, b, target, batch)."""
    options = dict(FUNC_OPTIONS[name])
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, N, D), (V, D), (V,)))
    if options.pop("target", None) == "probabilities":
        target = torch.softmax(torch.randn(2, N, V, generator=g, dtype=torch.float64), -1)
    else:
        target = torch.randint(0, V, (2, N), generator=g)
        target[0, 1] = target[1, 5] = -100
    class_weight = torch.rand(V, generator=g, dtype=torch.float64) + 0.5 if options.pop("weight", None) else None

    def loss_fn(x, w, b, t, reduction="mean"):
        return encouraging_linear_loss(x, w, t, linear_bias=b, weight=None if class_weight is None else
                                       class_weight.to(dtype), reduction=reduction, **options)

    def formula64(x, w, b, t, reduction="mean"):
        return torch_el_loss64(linear_logits64(x, w, b), t, class_weight, -100, reduction,
                               options.get("label_smoothing", 0.0), 1.0, options.get("bonus_label_smoothing", 0.0),
                               options.get("bonus", "log"), options.get("log_end", 0.75),
                               options.get("bonus_gamma", 1.0))

    cast = [t.to(dtype) if t.is_floating_point() else t for t in (x, w, b, target)]
    return loss_fn, formula64, cast, (x, w, b, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FUNC_OPTIONS))
def test_torch_func_transforms_on_the_default_path_equal_the_float64_formula(name, dtype):
    loss_fn, formula64, (x, w, b, t), (x64, w64, b64, t64) = func_problem(name, dtype)
    rtol = 1e-4 if dtype == torch.float32 else 1e-9

    def close(got, want):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.allclose(got.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())

    # grad w.r.t. input, weight and bias of one problem
    got = grad(loss_fn, argnums=(0, 1, 2))(x[0], w, b, t[0])
    for g, want in zip(got, grad(formula64, argnums=(0, 1, 2))(x64[0], w64, b64, t64[0])):
        close(g, want)
    # vmap over problems, and vmap(grad)
    close(vmap(loss_fn, in_dims=(0, None, None, 0))(x, w, b, t),
          torch.stack([formula64(x64[i], w64, b64, t64[i]) for i in range(2)]))
    got = vmap(grad(loss_fn, argnums=1), in_dims=(0, None, None, 0))(x, w, b, t)
    close(got, torch.stack([grad(formula64, argnums=1)(x64[i], w64, b64, t64[i]) for i in range(2)]))
    # jacrev and jacfwd of the per-token loss w.r.t. the input
    none = dict(reduction="none")
    want = jacrev(lambda x: formula64(x, w64, b64, t64[0], **none))(x64[0])
    close(jacrev(lambda x: loss_fn(x, w, b, t[0], **none))(x[0]), want)
    close(jacfwd(lambda x: loss_fn(x, w, b, t[0], **none))(x[0]), want)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused_on_the_fused_path_and_works_on_the_reference(reduction):
    loss_fn, formula64, (x, w, b, t), _ = func_problem("log-ignored", torch.float64)
    x = x[0].clone().requires_grad_()
    loss = encouraging_linear_loss(x, w, t[0], linear_bias=b, reduction=reduction, impl="chunked").sum()
    with pytest.raises(RuntimeError, match=r"once differentiable; double backward \(create_graph=True\) needs "
                                           r"impl='reference'") as err:
        torch.autograd.grad(loss, x, create_graph=True)
    assert "\n" not in str(err.value)
    assert torch.autograd.gradgradcheck(
        lambda x: encouraging_linear_loss(x, w, t[0], linear_bias=b, reduction=reduction, impl="reference"), (x,))


def test_the_eager_backward_hands_its_kept_gradients_over_without_a_weight_sized_buffer():
    """reduction "mean": the backward scales the gradients kept from the forward in place and hands them to
    autograd, which takes them as .grad: no zero tensor for the outputs without gradient (grad_weight's among
    them) and no copy of a gradient that the operator still referenced."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 32, generator=g).requires_grad_()
    w = torch.randn(2000, 32, generator=g).requires_grad_()
    target = torch.randint(0, 2000, (64,), generator=g)
    loss = encouraging_linear_loss(x, w, target)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    allocated = sum(max(event.self_cpu_memory_usage, 0) for event in prof.key_averages())
    assert allocated < w.numel() * 4 // 2, [(e.key, e.self_cpu_memory_usage) for e in prof.key_averages()]
    reference = w.detach().clone().requires_grad_()
    encouraging_linear_loss(x.detach(), reference, target, impl="reference").backward()
    assert torch.allclose(w.grad, reference.grad, rtol=1e-5, atol=1e-8)

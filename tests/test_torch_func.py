"""torch.func on the logits loss (issue 26): grad, vmap (per-sample losses), vmap(grad) (per-sample
gradients, the Opacus pattern), jacrev and jacfwd on the default path (impl="auto", which takes the
plain-torch reference under a transform) in float32 and float64, against the float64 formula of
reference64.py; an explicit fused impl under vmap runs its operator's vmap rule, and under grad-type
transforms refuses in one line (its gradient is the kernel's own, which they cannot see through)."""
import pytest
import torch
from torch.func import grad, jacfwd, jacrev, vmap

from el_fairseq import encouraging_loss
from el_fairseq.loss.kernel_inputs import KernelInputError
from reference64 import torch_el_loss64

OPTIONS = dict(label_smoothing=0.1, log_end=0.75, bonus_label_smoothing=0.1)
SAMPLES, ROWS, CLASSES = 3, 4, 6


def batch(dtype):
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(SAMPLES, ROWS, CLASSES, generator=g) * 3).to(dtype)
    target = torch.randint(0, CLASSES, (SAMPLES, ROWS), generator=g)
    target[0, 1] = -100
    return logits, target


def ours(impl="auto", reduction="mean"):
    return lambda z, y: encouraging_loss(z, y, reduction=reduction, impl=impl, **OPTIONS)


def formula(z, y, reduction="mean"):
    return torch_el_loss64(z.double(), y, reduction=reduction, label_smoothing=0.1, eps_b=0.1, log_end=0.75)


def close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert got.dtype == dtype and torch.allclose(got.double(), want, rtol=tol, atol=tol), (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_vmap_and_per_sample_gradients_equal_the_formula(dtype):
    logits, target = batch(dtype)
    z, y = logits[1], target[1]
    z64 = z.double().requires_grad_(True)
    want_grad, = torch.autograd.grad(formula(z64, y), z64)
    close(grad(ours())(z, y), want_grad, dtype)
    # per-sample losses, each sample's own mean
    close(vmap(ours())(logits, target), torch.stack([formula(a, b) for a, b in zip(logits, target)]), dtype)
    close(vmap(ours(reduction="none"))(logits, target), formula(logits.transpose(1, 2), target, "none"), dtype)
    # per-sample gradients (vmap over grad), as Opacus / torch.func tutorials compute them
    per_sample = vmap(grad(ours()))(logits, target)
    for s in range(SAMPLES):
        x = logits[s].double().requires_grad_(True)
        close(per_sample[s], torch.autograd.grad(formula(x, target[s]), x)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("jacobian", [jacrev, jacfwd])
def test_jacobians_of_per_row_losses_equal_the_formula(dtype, jacobian):
    logits, target = batch(dtype)
    z, y = logits[0], target[0]
    got = jacobian(lambda x: ours(reduction="none")(x, y))(z)  # (ROWS, ROWS, CLASSES)
    want = torch.autograd.functional.jacobian(lambda x: formula(x, y, "none"), z.double())
    close(got, want, dtype)
    close(jacobian(lambda x: ours()(x, y))(z), torch.autograd.functional.jacobian(lambda x: formula(x, y),
                                                                                   z.double()), dtype)


@pytest.mark.parametrize("impl", ["native", "chunked"])
def test_an_explicit_fused_impl_under_vmap_runs_its_operators_vmap_rule(impl):
    logits, target = batch(torch.float32)
    close(vmap(ours(impl, "none"))(logits, target), formula(logits.transpose(1, 2), target, "none"), torch.float32)
    close(vmap(ours(impl))(logits, target), torch.stack([formula(a, b) for a, b in zip(logits, target)]),
          torch.float32)
    # targets shared by every sample (in_dims None): the rule expands them
    close(vmap(ours(impl, "none"), in_dims=(0, None))(logits, target[1]),
          torch.stack([formula(a, target[1], "none") for a in logits]), torch.float32)
    with pytest.raises(KernelInputError, match=f"^impl '{impl}' cannot take logits .* impl='auto' or 'reference'"):
        grad(ours(impl))(logits[0], target[0])


def test_an_out_of_range_target_under_vmap_raises_the_eager_error():
    logits, target = batch(torch.float32)
    target[2, 3] = CLASSES
    with pytest.raises(ValueError, match=rf"^target values must be in \[0, {CLASSES}\) or ignore_index -100, got"):
        vmap(ours())(logits, target)


def test_double_backward_stays_on_the_reference():
    """impl="reference" is twice differentiable (grad of grad), the fused paths say they are not."""
    logits, target = batch(torch.float64)
    z, y = logits[1], target[1]
    hessian_vector = grad(lambda x: (grad(ours("reference"))(x, y) * x).sum())(z)
    x = z.clone().requires_grad_(True)
    g, = torch.autograd.grad(formula(x, y), x, create_graph=True)
    want, = torch.autograd.grad((g * x).sum(), x)
    close(hessian_vector, want, torch.float64)
    z32 = z.float().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\) needs impl='reference'"):
        torch.autograd.grad(ours("native")(z32, y), z32, create_graph=True)

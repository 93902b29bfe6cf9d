"""The fused kernels as torch.library operators (el_fairseq/loss/ops.py): torch.library.opcheck (schema,
autograd registration, fake kernel, AOT dispatch with dynamic shapes) for each kernel on each dtype it takes
and every bonus, and the target check's operator: its eager error, its vmap rule, and that a compiled
graph keeps it although a caller drops its output."""
import pytest
import torch

from el_fairseq.loss import ops
from el_fairseq.loss.bonus import BonusSpec

SPECS = {  # every bonus and option the kernels take: (label smoothing eps, BonusSpec)
    "log, log_end < 1, bonus smoothing": (0.1, BonusSpec("log", log_end=0.75, epsilon=0.1)),
    "log_end 1, no label smoothing": (0.0, BonusSpec("log", log_end=1.0, epsilon=0.0)),
    "power, bonus_start > 0": (0.1, BonusSpec("power", gamma=2.0, start=0.3, epsilon=0.0)),
    "cosine, bonus smoothing": (0.0, BonusSpec("cosine", epsilon=0.2)),
    "bonus off": (0.1, BonusSpec(rho=0.0)),
}
KERNEL_DTYPES = [("native", torch.float32), ("chunked", torch.float32), ("chunked", torch.float64)]


def batch(dtype, ignored, rows=6, vocab=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    if ignored:
        target[1] = -100
    return logits, target


@pytest.mark.parametrize("impl,dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("options", list(SPECS))
def test_kernel_operators_pass_opcheck(impl, dtype, options):
    epsilon, spec = SPECS[options]
    for ignored in (False, True):
        logits, target = batch(dtype, ignored, seed=len(options))
        for need_grad in (True, False):
            args = (logits.requires_grad_(need_grad), target, epsilon, -100 if ignored else None, need_grad,
                    *ops.spec_to_args(spec))
            torch.library.opcheck(ops.OPERATORS[impl], args)


@pytest.mark.parametrize("impl,dtype", KERNEL_DTYPES)
def test_kernel_operator_gradient_is_the_kernels_scaled_once_in_place(impl, dtype):
    """backward multiplies the kept gradient by the incoming per-row one, in the kept buffer itself (no
    (N, V) copy), and refuses a second backward in one line."""
    logits, target = batch(dtype, True, rows=7, vocab=6, seed=3)
    epsilon, spec = SPECS["log, log_end < 1, bonus smoothing"]
    z = logits.clone().requires_grad_(True)
    loss, nll, stats, grad = ops.OPERATORS[impl](z, target, epsilon, -100, True, *ops.spec_to_args(spec))
    assert not nll.requires_grad and not stats.requires_grad and not grad.requires_grad
    kept = grad.clone()
    weights = torch.linspace(0.5, 2.0, 7, dtype=loss.dtype)
    (loss * weights).sum().backward(retain_graph=True)
    assert torch.equal(z.grad, (kept * weights.unsqueeze(-1)).to(z.dtype))
    assert z.grad.data_ptr() == grad.data_ptr() or grad.dtype != z.dtype  # the kernel's own buffer
    with pytest.raises(RuntimeError, match="backpropagate once; a second backward .* needs impl='reference'$"):
        loss.sum().backward()


def test_spec_crosses_a_schema_as_primitives():
    spec = BonusSpec("power", log_end=0.5, gamma=3.0, start=0.2, epsilon=0.1, rho=0.7)
    args = ops.spec_to_args(spec)
    assert args == ("power", 0.5, 3.0, 0.2, 0.1, 0.7) and ops.spec_from_args(*args) == spec
    with pytest.raises(ValueError, match="--bonus-start 1.5 is out of range"):
        ops.spec_from_args("log", 0.5, 1.0, 1.5, 0.0, 1.0)


def test_checked_targets_operator():
    target = torch.tensor([[0, 4, -100], [2, -100, 1]])
    safe = ops.checked_targets(target, 5, -100)
    assert torch.equal(safe, torch.tensor([[0, 4, 0], [2, 0, 1]]))
    torch.library.opcheck(ops.checked_targets, (target, 5, -100, target.ne(-100)))
    torch.library.opcheck(ops.checked_targets, (target.clamp(min=0), 5, None))
    with pytest.raises(ValueError, match=r"^target values must be in \[0, 4\) or ignore_index -100, got 0..4$"):
        ops.checked_targets(target, 4, -100)
    # vmap: the whole batch is checked at once (the mask batched or not), the safe targets stay batched
    batched = torch.func.vmap(lambda t: ops.checked_targets(t, 5, -100, t.ne(-100)))(target)
    assert torch.equal(batched, safe)
    shared_mask = torch.func.vmap(lambda t, k: ops.checked_targets(t, 5, -100, k), in_dims=(0, None))(
        target.clamp(min=0), torch.tensor([True, False, True]))
    assert torch.equal(shared_mask, torch.tensor([[0, 0, 0], [2, 0, 1]]))
    with pytest.raises(ValueError, match=r"got -1..2$"):
        torch.func.vmap(lambda t: ops.checked_targets(t, 5, -100))(torch.tensor([[0, 1], [-1, 2]]))


def test_compiled_check_is_kept_where_its_output_is_dropped():
    """linear.py and vocab_parallel.py call api.check_targets for the check alone: the graph keeps the
    operator (a side effect), and an out-of-range target raises the eager error from compiled code."""
    from el_fairseq.loss.api import check_targets

    def only_checks(target):
        check_targets(target, 5, -100)
        return target * 2

    compiled = torch.compile(only_checks, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(torch.tensor([0, 4, -100])), torch.tensor([0, 8, -200]))
    with pytest.raises(ValueError, match=r"^target values must be in \[0, 5\) or ignore_index -100, got 0..7$"):
        compiled(torch.tensor([0, 7, -100]))


@pytest.mark.parametrize("impl", ["native", "chunked"])
def test_the_eager_backward_allocates_no_logits_sized_tensor(impl):
    """Backward only scales the kernel's kept (N, V) gradient in place and hands it on: no op of it may
    allocate another tensor of the logits' size (autograd zero-filled one for the gradient output that
    gets no gradient, ~110 ms per step at N 1,024 x V 32,000, before set_materialize_grads(False))."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from el_fairseq import encouraging_loss

    rows, classes = 64, 300

    class LogitsSizedAllocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            in_place = func._schema.name.endswith("_") or func.is_view
            if not in_place and any(isinstance(t, torch.Tensor) and t.numel() >= rows * classes
                                    for t in tree_leaves(out)):
                self.seen.append(str(func))
            return out

    logits = torch.randn(rows, classes, requires_grad=True)
    target = torch.randint(0, classes, (rows,))
    loss = encouraging_loss(logits, target, label_smoothing=0.1, impl=impl)
    with LogitsSizedAllocations() as mode:
        loss.backward()
    assert mode.seen == []
    want = torch.autograd.grad(encouraging_loss(logits, target, label_smoothing=0.1, impl="reference"), logits)[0]
    assert torch.allclose(logits.grad, want, atol=1e-6)

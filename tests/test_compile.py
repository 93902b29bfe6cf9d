"""torch.compile(fullgraph=True) of models that end in the logits loss (issue 26): no graph break
(torch._dynamo.explain), equal to eager in the loss and every gradient, float32 and bfloat16 under
autocast, static and dynamic shapes (no more recompiles for a second batch length than torch's own
F.cross_entropy), the target check kept in the graph; the Triton kernel's operator under Triton's
interpreter in a child process. Mostly backend="aot_eager" (no C++ build); one inductor compile."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from el_fairseq import EncouragingLoss, encouraging_loss

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES, FEATURES = 11, 8


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py


class Classifier(torch.nn.Module):
    """A model that ends in the loss: features (N, T, D) -> logits (N, C, T) -> EncouragingLoss."""

    def __init__(self, criterion):
        super().__init__()
        torch.manual_seed(5)
        self.proj = torch.nn.Linear(FEATURES, CLASSES)
        self.criterion = criterion

    def forward(self, x, y):
        return self.criterion(self.proj(x).transpose(1, 2), y)


def batch(rows, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, steps, FEATURES, generator=g) * 2
    y = torch.randint(0, CLASSES, (rows, steps), generator=g)
    y[0, 1] = -100
    return x, y


CRITERIA = {  # class weights and both smoothings; power bonus from a start; the plain defaults
    "weighted": lambda: EncouragingLoss(torch.linspace(0.5, 1.5, CLASSES), log_end=0.5),
    "smoothed": lambda: EncouragingLoss(label_smoothing=0.1, bonus_label_smoothing=0.1, bonus="power",
                                        bonus_gamma=2.0, bonus_start=0.2),
    "defaults": lambda: EncouragingLoss(reduction="sum"),
}


def loss_and_grads(model, x, y, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("criterion", list(CRITERIA))
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16-autocast"])
def test_fullgraph_compile_has_no_graph_break_and_equals_eager(criterion, autocast):
    model = Classifier(CRITERIA[criterion]())
    x, y = batch(4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        explained = torch._dynamo.explain(model)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    want = loss_and_grads(model, x, y, autocast)
    got = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), x, y, autocast)
    tol = 1e-5 if not autocast else 2e-2  # bf16 logits: the compiled graph may fuse the cast differently
    assert got[0].dtype == want[0].dtype and torch.allclose(got[0], want[0], rtol=tol, atol=tol)
    for g, w in zip(got[1], want[1]):
        assert torch.allclose(g, w, rtol=tol, atol=tol)


def test_the_functional_loss_compiles_without_graph_break_on_every_path():
    x, y = batch(5)
    logits = x.reshape(-1, FEATURES)[:, :6].clone().requires_grad_(True)
    target = y.reshape(-1) % 6
    for impl, dtype in (("auto", torch.float32), ("chunked", torch.bfloat16), ("reference", torch.float32),
                        ("auto", torch.float64)):
        z = logits.detach().to(dtype).requires_grad_(True)

        def fn(z, target):
            return encouraging_loss(z, target, label_smoothing=0.05, impl=impl)
        assert torch._dynamo.explain(fn)(z, target).graph_break_count == 0
        want, = torch.autograd.grad(fn(z, target), z)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        loss = compiled(z, target)
        got, = torch.autograd.grad(loss, z)
        assert torch.allclose(loss, fn(z, target)) and torch.allclose(got, want)


def test_compiled_auto_runs_the_devices_operator():
    """Under compile impl="auto" is the device's kernel operator (native for float32 on the CPU, chunked for
    bfloat16), not the plain-torch reference that tensors no kernel can read take."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm
    x, y = batch(3)
    for dtype in (torch.float32, torch.bfloat16):
        z = x.reshape(-1, FEATURES).to(dtype).requires_grad_(True)
        torch.compile(lambda z, y: encouraging_loss(z, y), fullgraph=True, backend=backend)(z, y.reshape(-1) % 8)
        torch._dynamo.reset()
    assert "el_fairseq.native_loss.default" in seen and "el_fairseq.chunked_loss.default" in seen
    assert "el_fairseq.checked_targets.default" in seen


def test_dynamic_shapes_recompile_no_more_than_torch_cross_entropy():
    def count(loss_fn):
        counter = CompileCounter()
        compiled = torch.compile(lambda z, y: loss_fn(z, y), dynamic=True, fullgraph=True, backend=counter)
        for rows in (6, 9, 13):
            x, y = batch(rows, seed=rows)
            z = x.reshape(-1, FEATURES).requires_grad_(True)
            loss = compiled(z, y.reshape(-1) % FEATURES)
            want = loss_fn(z, y.reshape(-1) % FEATURES)
            assert torch.allclose(loss, want)
        torch._dynamo.reset()
        return counter.frame_count

    ours = count(lambda z, y: encouraging_loss(z, y, label_smoothing=0.1))
    theirs = count(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1))
    assert 1 <= ours <= theirs


def test_out_of_range_target_raises_from_compiled_code():
    model = torch.compile(Classifier(EncouragingLoss()), fullgraph=True, backend="aot_eager")
    x, y = batch(2)
    model(x, y)
    y[1, 2] = CLASSES
    with pytest.raises(ValueError, match=rf"^target values must be in \[0, {CLASSES}\) or ignore_index -100, got 0"):
        model(x, y)


def test_inductor_compiles_the_model_to_eager_values():
    model = Classifier(EncouragingLoss(label_smoothing=0.1, log_end=0.5))
    x, y = batch(4)
    want = loss_and_grads(model, x, y)
    got = loss_and_grads(torch.compile(model, fullgraph=True), x, y)
    assert torch.allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


TRITON_CHILD = textwrap.dedent("""
    import torch
    from el_fairseq import encouraging_loss
    from el_fairseq.loss import ops
    from el_fairseq.loss.bonus import BonusSpec
    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(6, 9, generator=g) * 3, torch.randint(0, 9, (6,), generator=g)
    y[2] = -100
    spec = BonusSpec("log", log_end=0.75, epsilon=0.1, start=0.2)
    for ignore, need_grad in ((-100, True), (None, False)):
        t = y.clamp(min=0) if ignore is None else y
        torch.library.opcheck(ops.triton_loss, (z.clone().requires_grad_(need_grad), t, 0.1, ignore, need_grad,
                                                *ops.spec_to_args(spec)))
    fn = lambda z, y: encouraging_loss(z, y, label_smoothing=0.1, impl="triton")
    assert torch._dynamo.explain(fn)(z, y).graph_break_count == 0
    x = z.clone().requires_grad_(True)
    want = fn(x, y)
    want_grad, = torch.autograd.grad(want, x)
    torch._dynamo.reset()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y)
    got_grad, = torch.autograd.grad(got, x)
    assert torch.allclose(got, want) and torch.allclose(got_grad, want_grad)
    print("ok")
""")


def test_triton_operator_under_the_interpreter():
    """TRITON_INTERPRET=1 (set before triton is imported, hence a child): opcheck and a fullgraph compile."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_the_kernel_choice_is_marked_as_torch_compiler_marks_a_constant_result():
    """dispatch marks _kernel_for without importing torch._dynamo; the mark must be the one torch's
    decorator sets, or compile would trace the choice's Python (graph breaks, caught above too)."""
    from el_fairseq.loss import dispatch

    def probe():
        return 0

    marked = torch.compiler.assume_constant_result(probe)
    assert set(vars(marked)) == {"_dynamo_marked_constant"} and marked._dynamo_marked_constant is True
    assert dispatch._kernel_for._dynamo_marked_constant is True

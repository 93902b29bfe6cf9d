"""torch.compile(fullgraph=True) of the fused linear loss: a model that ends in EncouragingLinearLoss, the function
encouraging_linear_loss (class weights with both smoothings, probability targets, every reduction) and the fairseq
criterion (its fused-projection forward, its compute_loss on a model's output) compile without a graph break
(torch._dynamo.explain) and equal eager in the loss, the logging outputs and every gradient, in float32 and in
bfloat16 under autocast, with static and dynamic shapes; a second and third batch length recompile no more than
torch's own F.linear_cross_entropy does (CompileCounter). aot_eager for most, inductor once."""

import pytest
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from el_fairseq import EncouragingLinearLoss, encouraging_linear_loss

D, V, CHUNK = 16, 50, 5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py


class Model(torch.nn.Module):
    """hidden = tanh(body(x)); the loss of the head's projection of it (a language model's last layers)."""

    def __init__(self, **head_options):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(D, D)
        self.head = EncouragingLinearLoss(D, V, bias=True, chunk_size=CHUNK, **head_options)

    def forward(self, x, target):
        return self.head(torch.tanh(self.body(x)), target)


def batch(length, seed=0):
    """x (2, length, D) and targets (2, length) with ignored (-100) tokens."""
    g = torch.Generator().manual_seed(seed + length)
    target = torch.randint(0, V, (2, length), generator=g)
    target[0, 3] = target[1, -1] = -100
    return torch.randn(2, length, D, generator=g), target


def loss_and_grads(fn, model, x, target, amp=False):
    """fn(x, target)'s loss and the gradients of its sum w.r.t. x and every parameter of `model`."""
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = fn(x, target)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
    return [loss.detach(), x.grad, *(p.grad for p in model.parameters())]


def assert_equal_lists(got, want, rtol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.allclose(g.double(), w.double(), rtol=rtol, atol=rtol * w.abs().max().item())


def test_explain_finds_no_graph_break():
    model = Model(label_smoothing=0.1, bonus_label_smoothing=0.1)
    x, target = batch(12)
    weight = torch.rand(V) + 0.5
    probabilities = torch.softmax(torch.randn(12, V), -1)
    calls = {
        "module": (model, (x, target)),
        "weights-smoothing-none": (lambda x, t: encouraging_linear_loss(
            x, model.head.linear.weight, t, weight=weight, label_smoothing=0.1, reduction="none", chunk_size=CHUNK),
            (x, target)),
        "probabilities-sum": (lambda x, t: encouraging_linear_loss(
            x, model.head.linear.weight, t, bonus="power", bonus_gamma=2.0, reduction="sum", chunk_size=CHUNK),
            (x[0], probabilities)),
    }
    for name, (fn, args) in calls.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, (name, [str(r.reason)[:300] for r in explained.break_reasons])
        assert explained.graph_count == 1, name


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bfloat16-autocast"])
def test_a_compiled_model_equals_eager_in_loss_and_every_gradient(amp, dynamic):
    model = Model(log_end=0.5, label_smoothing=0.1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for length in (12, 17) if dynamic else (12,):  # dynamic: a second length runs the same graph
        x, target = batch(length)
        got = loss_and_grads(compiled, model, x, target, amp)
        assert got[0].dtype == torch.float32  # autocast's cross-entropy policy: a float32 loss
        assert_equal_lists(got, loss_and_grads(model, model, x, target, amp))


@pytest.mark.parametrize("reduction,options", [
    ("none", dict(weight="classes", label_smoothing=0.1, bonus_label_smoothing=0.2)),
    ("sum", dict(target="probabilities", bonus="power", bonus_gamma=2.0)),
], ids=["weights-both-smoothings-none", "probabilities-sum"])
def test_the_compiled_function_equals_eager_with_dynamic_shapes(reduction, options):
    options = dict(options)
    soft = options.pop("target", None) == "probabilities"
    if options.get("weight") == "classes":
        options["weight"] = torch.rand(V, generator=torch.Generator().manual_seed(5)) + 0.5
    model = Model()  # its projection's weight and bias as the function's
    head = model.head.linear

    def fn(x, target):
        return encouraging_linear_loss(torch.tanh(model.body(x)), head.weight, target, linear_bias=head.bias,
                                       reduction=reduction, chunk_size=CHUNK, **options)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for length in (12, 17):
        x, target = batch(length)
        if soft:
            target = torch.softmax(torch.randn(2, length, V, generator=torch.Generator().manual_seed(length)), -1)
        assert_equal_lists(loss_and_grads(compiled, model, x, target), loss_and_grads(fn, model, x, target))


def test_other_batch_lengths_recompile_no_more_than_torch_linear_cross_entropy():
    weight = torch.randn(V, D, requires_grad=True)

    def frames(loss_fn):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(loss_fn, backend=counter, fullgraph=True, dynamic=True)
        for length in (12, 17, 30):
            x, target = batch(length)
            compiled(x[0].requires_grad_(True), weight, target[0]).backward()
        return counter.frame_count

    ours = frames(lambda x, w, t: encouraging_linear_loss(x, w, t, chunk_size=CHUNK))
    theirs = frames(lambda x, w, t: F.linear_cross_entropy(x, w, t))
    assert 1 <= ours <= theirs


def test_inductor_compiles_the_model_and_equals_eager():
    model = Model(bonus_label_smoothing=0.1)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    x, target = batch(12)
    assert_equal_lists(loss_and_grads(compiled, model, x, target), loss_and_grads(model, model, x, target),
                       rtol=1e-5)


@pytest.mark.parametrize("fused_projection", [True, False], ids=["fused-projection", "compute-loss-on-logits"])
def test_the_fairseq_criterion_compiles_without_graph_break_and_equals_eager(fused_projection):
    pytest.importorskip("fairseq")
    from fairseq_fixtures import build, make_sample
    from test_fused_projection import VOCAB, ProjectionModel

    model = ProjectionModel(tied=False)
    criterion = build("encouraging_loss", VOCAB, el_fused_projection=fused_projection, label_smoothing=0.1,
                      log_end=0.75)
    sample = make_sample(5, 7, VOCAB, seed=2)

    def step(sample):  # the fused path's forward; else compute_loss on the model's output, as forward calls it
        if fused_projection:
            loss, _, logs = criterion(model, sample)
            return loss, logs
        loss, nll, extra = criterion.compute_loss(model, model(**sample["net_input"]), sample)
        return loss, {"nll_loss": nll, **extra}

    explained = torch._dynamo.explain(step)(sample)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, step):
        model.zero_grad(set_to_none=True)
        loss, logs = fn(sample)
        loss.backward()
        results.append((loss.detach(), {k: torch.as_tensor(v).double() for k, v in logs.items()},
                        [p.grad for p in model.parameters() if p.grad is not None]))
    (loss, logs, grads), (want_loss, want_logs, want_grads) = results
    assert torch.allclose(loss, want_loss, rtol=1e-6) and logs.keys() == want_logs.keys()
    assert {"margin_sum", "well_classified"} <= set(logs)
    for key in logs:
        assert torch.allclose(logs[key], want_logs[key], rtol=1e-6), key
    assert_equal_lists(grads, want_grads)

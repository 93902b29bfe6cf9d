"""A batch with nothing to count (issue 25): every target ignored, no rows at all, or every counted class
weight zero. torch's "mean" over zero targets is nan and its gradient zero; so is ours, on every path and
entry point (logits, linear, the fairseq criterion, transformers' Trainer loss), and one optimizer step on
such a batch leaves the parameters finite and unchanged (a prompt-only micro-batch in fine-tuning must not
turn a run's parameters into nan, which a plain sum / 0 did: its gradient 1/0 times the zero gradients)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLinearLoss, EncouragingLoss, encouraging_linear_loss, encouraging_loss
from el_fairseq.loss.reduction import mean_over_count

IMPLS = ["auto", "reference", "chunked", "native"]
D, V = 6, 11


def nothing_to_count(kind, n=5):
    """(rows, target, class weight) of a batch where no target counts."""
    if kind == "empty":
        return 0, torch.zeros(0, dtype=torch.long), None
    if kind == "ignored":
        return n, torch.full((n,), -100), None
    return n, torch.tensor([1, 3, 3, 5, -100])[:n], torch.ones(V).index_fill(0, torch.tensor([1, 3, 5]), 0.0)


def one_step(model, loss_fn):
    """Loss, the gradients and the parameters after one AdamW step (no weight decay: a zero gradient
    must leave a parameter as it is)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    loss = loss_fn(model)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    optimizer.step()
    return loss.detach(), grads, {k: p.detach().clone() for k, p in model.named_parameters()}


def assert_untouched(before, grads, after):
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), name
        assert torch.isfinite(after[name]).all() and torch.equal(after[name], before[name]), name


def test_mean_over_count_is_torchs_mean_with_a_zero_gradient_over_nothing():
    total = torch.tensor(3.0, requires_grad=True)
    for count, value, grad in ((4, 0.75, 0.25), (torch.tensor(2.5), 1.2, 0.4), (0, float("nan"), 0.0)):
        total.grad = None
        out = mean_over_count(total, count)
        out.backward()
        assert torch.allclose(out, torch.tensor(value), equal_nan=True) and torch.isclose(total.grad, torch.tensor(grad))
    # twice differentiable where the count is not zero
    x = torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(mean_over_count(x ** 3, 4), x, create_graph=True)
    assert torch.allclose(torch.autograd.grad(g, x)[0], torch.tensor(3.0))


@pytest.mark.parametrize("kind", ["ignored", "empty", "zero-weights"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_logits_loss_over_nothing_is_torchs_nan_and_leaves_the_model_unchanged(kind, impl, rho):
    n, target, weight = nothing_to_count(kind)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, V)
    x = torch.randn(n, D)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss, grads, after = one_step(model, lambda m: EncouragingLoss(weight, bonus_rho=rho, impl=impl)(m(x), target))
    theirs = F.cross_entropy(model(x), target, weight=weight)
    assert torch.isnan(loss) and torch.isnan(theirs)  # torch's value
    assert_untouched(before, grads, after)


@pytest.mark.parametrize("kind", ["ignored", "empty", "zero-weights"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_loss_over_nothing_is_torchs_nan_and_leaves_the_model_unchanged(kind, impl):
    n, target, weight = nothing_to_count(kind)
    torch.manual_seed(0)
    head = EncouragingLinearLoss(D, V, bias=True, weight=weight, impl=impl)
    x = torch.randn(n, D)
    before = {k: p.detach().clone() for k, p in head.named_parameters()}
    loss, grads, after = one_step(head, lambda m: m(x, target))
    assert torch.isnan(loss)
    assert_untouched(before, grads, after)
    # the functional form, with a feature gradient too
    features = x.clone().requires_grad_(True)
    loss = encouraging_linear_loss(features, head.linear.weight, target, weight=weight, impl=impl)
    loss.backward()
    assert torch.isnan(loss) and torch.equal(features.grad, torch.zeros_like(features))


@pytest.mark.parametrize("impl", IMPLS)
def test_sum_and_none_over_nothing_are_zero(impl):
    z = torch.randn(4, V, requires_grad=True)
    target = torch.full((4,), -100)
    assert float(encouraging_loss(z, target, reduction="sum", impl=impl)) == 0.0
    assert torch.equal(encouraging_loss(z, target, reduction="none", impl=impl), torch.zeros(4))


@pytest.mark.parametrize("fused_projection", [False, True])
def test_fairseq_criterion_over_an_all_padding_batch_gives_zero_loss_and_gradients(fused_projection):
    from fairseq_fixtures import PAD, build, make_sample
    from test_fused_projection import VOCAB, ProjectionModel

    model = ProjectionModel(tied=True)
    sample = make_sample(3, 5, VOCAB)
    sample["target"].fill_(PAD)
    sample["ntokens"] = 0
    criterion = build("encouraging_loss", VOCAB, el_fused_projection=fused_projection, label_smoothing=0.1)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss, grads, after = one_step(model, lambda m: criterion(m, sample)[0])
    assert float(loss) == 0.0  # fairseq sums; its trainer divides by max(sample_size, 1)
    assert_untouched(before, grads, after)


@pytest.mark.parametrize("num_items_in_batch", [None, 0, torch.tensor(0)])
def test_trainer_losses_over_all_ignored_labels_leave_the_model_unchanged(num_items_in_batch):
    transformers = pytest.importorskip("transformers")
    from el_fairseq.hf import compute_loss_func, fuse_encouraging_loss

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, V, (2, 6))
    labels = torch.full_like(ids, -100)  # a prompt-only batch
    loss_func = compute_loss_func(causal_lm=True)

    def unfused(m):
        return loss_func(m(input_ids=ids), labels, num_items_in_batch)

    def fused(m):
        return m(input_ids=ids, labels=labels, num_items_in_batch=num_items_in_batch).loss

    for build, loss_fn in ((lambda: copy.deepcopy(start), unfused),
                           (lambda: fuse_encouraging_loss(copy.deepcopy(start)), fused)):
        model = build().train()
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        loss, grads, after = one_step(model, loss_fn)
        assert torch.isnan(loss)  # transformers' own loss: sum / 0
        assert_untouched(before, grads, after)

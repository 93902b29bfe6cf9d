"""The losses under torch.autocast (issue 25) as torch runs its cross-entropy there: in float32, returning a
float32 loss, with each input's gradient in its own dtype. The fused linear loss computes each chunk's logits
in float32 (autocast suspended inside it): it equals the loss of F.linear's output under autocast within
16-bit tolerances, as Liger's `test_amp` asks of its fused linear cross-entropy (its cases, on the CPU),
and transformers' Trainer(bf16=True) trains with it."""
import copy

import pytest
import torch
import torch.nn.functional as F

from el_fairseq import EncouragingLoss, encouraging_linear_loss, encouraging_loss

HALF = [torch.bfloat16, torch.float16]
IMPLS = ["auto", "reference", "chunked", "native"]


def leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_logits_loss_under_autocast_is_float32_like_torchs(dtype, impl, reduction, weighted):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(29, 13, generator=g) * 4
    target = torch.randint(0, 13, (29,), generator=g).masked_fill(torch.rand(29, generator=g) < 0.2, -100)
    weight = torch.rand(13, generator=g) + 0.5 if weighted else None
    options = dict(weight=weight, reduction=reduction)
    ours, theirs, exact = leaf(z, dtype), leaf(z, dtype), leaf(z, dtype)
    with torch.autocast("cpu", dtype=dtype):
        got = encouraging_loss(ours, target, bonus_rho=0.0, impl=impl, **options)
        want = F.cross_entropy(theirs, target, **options)
        bonus = encouraging_loss(exact, target, impl=impl, **options)
    assert got.dtype == want.dtype == bonus.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    r = torch.randn(got.shape, generator=g)
    (got * r).sum().backward()
    (want * r).sum().backward()
    assert ours.grad.dtype == dtype and torch.allclose(ours.grad.float(), theirs.grad.float(), rtol=1e-2, atol=1e-4)
    # with the bonus: the float32 loss of the upcast logits, outside autocast
    reference = encouraging_loss(z.to(dtype).float(), target, impl="reference", **options)
    assert torch.allclose(bonus, reference, rtol=1e-5, atol=1e-6)


def test_module_under_autocast_returns_float32():
    z = torch.randn(7, 5).bfloat16()
    target = torch.randint(0, 5, (7,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert EncouragingLoss()(z, target).dtype == torch.float32
    assert EncouragingLoss()(z, target).dtype == torch.bfloat16  # outside autocast: the input's dtype, as torch


@pytest.mark.parametrize("B, T, H, V", [(8, 128, 1024, 4096), (4, 47, 31, 123)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", HALF)
def test_liger_amp_cases_on_the_cpu(B, T, H, V, bias, dtype):
    """Liger's test_amp: rand weights, randn features, mean over B*T tokens, under autocast, against
    F.cross_entropy(F.linear(...)) under the same autocast; Liger's tolerances (atol 5e-3, rtol 5e-2)."""
    g = torch.Generator().manual_seed(B * T + H)
    w = torch.rand(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    x = torch.randn(B * T, H, generator=g)
    target = torch.randint(0, V, (B * T,), generator=g)
    x1, x2, w1, w2 = leaf(x), leaf(x), leaf(w), leaf(w)
    with torch.autocast("cpu", dtype=dtype):
        want = F.cross_entropy(F.linear(x1, w1, b), target)
        got = encouraging_linear_loss(x2, w2, target, linear_bias=b, bonus_rho=0.0)
        want.backward()
        got.backward()
    assert got.dtype == torch.float32
    for ours, theirs in ((got, want), (x2.grad, x1.grad), (w2.grad, w1.grad)):
        assert torch.allclose(ours, theirs, atol=5e-3, rtol=5e-2)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("impl", ["auto", "chunked", "native"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias, weighted", [(False, False), (True, False), (True, True)])
def test_linear_loss_under_autocast_equals_the_loss_of_the_upcast_logits(dtype, impl, reduction, bias, weighted):
    g = torch.Generator().manual_seed(7)
    n, d, v = 45, 16, 53
    x = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.5
    b = torch.randn(v, generator=g) if bias else None
    x[::3] += 2 * w[torch.randint(0, v, (15,), generator=g)]  # confident rows
    target = torch.randint(0, v, (n,), generator=g).masked_fill(torch.rand(n, generator=g) < 0.2, -100)
    weight = torch.rand(v, generator=g) + 0.5 if weighted else None
    options = dict(weight=weight, reduction=reduction, log_end=0.75)
    x1, x2, w1, w2 = leaf(x), leaf(x), leaf(w), leaf(w)
    b1, b2 = (leaf(b), leaf(b)) if bias else (None, None)
    with torch.autocast("cpu", dtype=dtype):
        got = encouraging_linear_loss(x2, w2, target, linear_bias=b2, impl=impl, chunk_size=8, **options)
        want = encouraging_loss(F.linear(x1, w1, b1).float(), target, impl="reference", **options)
    assert got.dtype == torch.float32 and got.shape == want.shape
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)
    assert torch.allclose(got, want, **tol)
    r = torch.randn(got.shape, generator=g)
    (got * r).sum().backward()
    (want * r).sum().backward()
    for ours, theirs in ((x2.grad, x1.grad), (w2.grad, w1.grad)) + (((b2.grad, b1.grad),) if bias else ()):
        assert ours.dtype == theirs.dtype == torch.float32
        assert (ours - theirs).abs().max() <= tol["rtol"] * theirs.abs().max() + 1e-4


def test_trainer_bf16_on_the_cpu_trains_with_the_fused_and_the_logits_loss(tmp_path):
    """Trainer(bf16=True, use_cpu=True) runs the model under CPU autocast: a few steps of a tiny Llama with
    fuse_encouraging_loss, and with compute_loss_func, give finite losses equal within bf16 tolerance."""
    transformers = pytest.importorskip("transformers")
    from el_fairseq.hf import compute_loss_func, fuse_encouraging_loss

    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    data = []
    for i in range(16):
        ids = torch.randint(2, 37, (9,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100  # prompt tokens
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    data[-1]["labels"][:] = -100  # the last batch holds a prompt-only example

    def losses(model, **kwargs):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(len(kwargs))), per_device_train_batch_size=4, num_train_epochs=1,
            learning_rate=1e-2, bf16=True, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, **kwargs)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    fused = losses(fuse_encouraging_loss(copy.deepcopy(start), log_end=0.75))
    unfused = losses(copy.deepcopy(start), compute_loss_func=compute_loss_func(causal_lm=True, log_end=0.75))
    assert len(fused) == len(unfused) == 4
    assert all(torch.isfinite(torch.tensor(fused))) and all(torch.isfinite(torch.tensor(unfused)))
    assert torch.allclose(torch.tensor(fused), torch.tensor(unfused), rtol=2e-2, atol=2e-2), (fused, unfused)

"""torch.compile and el_fairseq.hf (issue 26), on a tiny Llama built from a config (nothing downloaded):

- the encouraging loss compiles whole (fullgraph=True, no graph break) both where it runs inside the model
  (fuse_encouraging_loss: the fused linear loss in the model's forward) and as a Trainer loss
  (compute_loss_func on the logits), and its loss and gradients are the eager ones, which are the float64
  reference of the paper's formula (reference64.py) on the model's logits;
- Trainer(torch_compile=True) trains with either for a few SGD steps to the parameters and losses of the
  same Trainer without compile.

Most runs use the "aot_eager" backend (dynamo and AOTAutograd's joint graph, no code generation: fast on a
CPU); one runs inductor, which generates C++ for the fused model's forward and backward. Inductor compiles
in this process (compile_threads = 1): no worker pool.
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from reference64 import el_loss64

import transformers  # requirements.txt installs it: these tests run wherever `make test` does, never skipped

from el_fairseq.hf import compute_loss_func, fuse_encouraging_loss

VOCAB, PAD, WIDTH = 37, 0, 9
EL = dict(log_end=0.5, bonus_rho=0.7, bonus_label_smoothing=0.1, label_smoothing=0.1)  # non-default options


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # conftest.py


def llama(seed=0, layers=2):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=PAD, attention_dropout=0.0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def examples(n, seed=1):
    """n examples of WIDTH tokens: a prompt of 1-4 tokens (labels -100), the last one prompt only."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        ids = torch.randint(2, VOCAB, (WIDTH,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    data[-1]["labels"][:] = -100
    return data


def stacked(data):
    return {k: torch.stack([d[k] for d in data]) for k in data[0]}


def graph_breaks():
    return dict(counters["graph_break"])


def reference_loss(model, batch, num_items):
    """sum over labelled positions of the float64 EL of the model's logits at t for the label at t + 1, / num_items."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    eps = EL["label_smoothing"] * (VOCAB - 1) / VOCAB  # the reference takes fairseq's smoothing convention
    total, _ = el_loss64(logits[:, :-1], batch["labels"][:, 1:], eps, EL["bonus_label_smoothing"], EL["bonus_rho"],
                         pad=-100, log_end=EL["log_end"])
    return float(total) / num_items


def gradients(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, expected):
    assert set(got) == set(expected) and expected
    for k in expected:
        assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_model_compiles_whole_and_equals_eager(backend):
    """torch.compile(fullgraph=True) of the fused Llama's training forward (the loss, no logits) and its
    backward: the eager loss and gradients; that loss is the float64 reference. One layer under inductor: its
    C++ build is most of this file's time."""
    start = llama(layers=1 if backend == "inductor" else 2).train()
    batch = stacked(examples(6))
    n = torch.tensor(31)  # Trainer's num_items_in_batch: a tensor, here more than this batch's labels
    eager = fuse_encouraging_loss(copy.deepcopy(start), **EL)
    want = eager(**batch, num_items_in_batch=n).loss
    want.backward()
    fused = fuse_encouraging_loss(copy.deepcopy(start), **EL)
    compiled = torch.compile(fused, backend=backend, fullgraph=True)
    got = compiled(**batch, num_items_in_batch=n)
    assert got.logits is None  # training: the loss without the logits
    got.loss.backward()
    assert counters["stats"]["unique_graphs"] >= 1 and not graph_breaks()
    assert torch.allclose(got.loss, want, rtol=1e-5, atol=1e-6), (got.loss, want)
    assert abs(float(got.loss.detach()) - reference_loss(start, batch, 31)) < 1e-5
    assert_same_gradients(gradients(fused), gradients(eager))
    assert "forward" not in vars(fused.get_output_embeddings())  # the head's own forward again


def test_compute_loss_func_compiles_whole_and_equals_eager():
    """torch.compile(fullgraph=True) of compute_loss_func's loss on a Llama's logits, with Trainer's tensor
    num_items_in_batch and with none (the mean over the batch's labels): the eager loss and logits'
    gradient, and the float64 reference."""
    model = llama().train()
    batch = stacked(examples(6))
    loss_func = compute_loss_func(causal_lm=True, **EL)
    compiled = torch.compile(loss_func, backend="aot_eager", fullgraph=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    count = int(batch["labels"][:, 1:].ne(-100).sum())
    for n, divisor in ((torch.tensor(31), 31), (None, count)):
        eager_logits, compiled_logits = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        want = loss_func({"logits": eager_logits}, batch["labels"], n)
        got = compiled({"logits": compiled_logits}, batch["labels"], n)
        want.backward()
        got.backward()
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (n, got, want)
        assert abs(float(got.detach()) - reference_loss(model, batch, divisor)) < 1e-5
        assert torch.allclose(compiled_logits.grad, eager_logits.grad, rtol=1e-5, atol=1e-7)
    assert counters["stats"]["unique_graphs"] >= 2 and not graph_breaks()


def trained(model, tmp_path, compiled, **trainer_kwargs):
    """4 SGD steps of 4 examples (constant learning rate, no clipping: a gradient off shows in the parameters);
    the logged losses and the parameters after them."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("compiled" if compiled else "eager")), per_device_train_batch_size=4,
        num_train_epochs=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, seed=0, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, **(dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples(16), **trainer_kwargs)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, {k: v.detach().clone() for k, v in model.named_parameters()}


# (fuse_encouraging_loss, compute_loss_func, the loss compiled too in the compiled run): Trainer compiles only
# the model, and calls compute_loss_func on the outputs of the compiled model.
TRAINER_LOSSES = {"fused": (True, False, False), "compute_loss_func": (False, True, False),
                  "compiled compute_loss_func": (False, True, True)}


@pytest.mark.parametrize("loss", sorted(TRAINER_LOSSES))
def test_trainer_torch_compile_trains_like_eager(loss, tmp_path):
    """Trainer(torch_compile=True) (accelerate's torch.compile of the model) trains the tiny Llama with the
    encouraging loss to the losses and parameters of the same Trainer without compile."""
    fuse, loss_func, compile_loss = TRAINER_LOSSES[loss]
    start = llama()

    def run(compiled):
        model = copy.deepcopy(start)
        kwargs = {}
        if loss_func:
            kwargs["compute_loss_func"] = compute_loss_func(causal_lm=True, **EL)
            if compiled and compile_loss:
                kwargs["compute_loss_func"] = torch.compile(kwargs["compute_loss_func"], backend="aot_eager")
        return trained(fuse_encouraging_loss(model, **EL) if fuse else model, tmp_path, compiled, **kwargs)

    eager_losses, eager_params = run(compiled=False)
    assert counters["stats"]["unique_graphs"] == 0
    compiled_losses, compiled_params = run(compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the model (and the loss) ran compiled
    assert len(eager_losses) == len(compiled_losses) == 4 and all(torch.isfinite(torch.tensor(eager_losses)))
    assert torch.allclose(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-4), (
        compiled_losses, eager_losses)  # Trainer logs them rounded to 4 digits
    assert max(float((eager_params[k] - start.state_dict()[k]).abs().max()) for k in eager_params) > 1e-2  # it trained
    for k in eager_params:
        assert torch.allclose(compiled_params[k], eager_params[k], rtol=1e-4, atol=1e-5), k

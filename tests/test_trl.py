"""el_fairseq.hf.trl (EncouragingSFTTrainer) and fuse_encouraging_loss under TRL's SFTTrainer, on a tiny Llama
built from a config and a word-level tokenizer (nothing downloaded), pre-tokenized datasets: the encouraging loss
against SFTTrainer's own compute_loss_func path and the float64 formula (reference64.torch_el_loss64) on the
same tokens, TRL's metrics against the full logits, and the (tokens, vocabulary) logits never held."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from reference64 import torch_el_loss64

import datasets  # requirements.txt installs them: these tests run wherever `make test` does, never skipped
import transformers
import trl
from tokenizers import Tokenizer, models

from el_fairseq.hf import compute_loss_func, fuse_encouraging_loss
from el_fairseq.hf.trl import EncouragingSFTTrainer

# TRL deprecates compute_loss_func (the reference runs here use it on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:`compute_loss_func` is deprecated:FutureWarning")

VOCAB, HIDDEN, PAD, EOS = 150, 48, 0, 1
OPTIONS = {  # non-default EL options: the per-token form on TRL's head, the smoothed one on ours (small chunks)
    "per-token": dict(log_end=0.5, bonus_rho=0.7),
    "smoothed": dict(log_end=0.5, bonus_rho=0.7, label_smoothing=0.1, bonus_label_smoothing=0.1, chunk_size=5),
}
LOSS_ONLY = ("chunk_size",)  # the projection's option, not encouraging_loss's


def loss_options(options):
    return {k: v for k, v in options.items() if k not in LOSS_ONLY}


def tokenizer():
    vocab = {f"t{i}": i for i in range(3, VOCAB)} | {"<pad>": PAD, "<eos>": EOS, "<unk>": 2}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def llama(seed=0, **config):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, **config)
    return transformers.LlamaForCausalLM(cfg)


def rows(kind, n=8, seed=0):
    """n pre-tokenized examples of varied lengths: `completion` (prompt then completion, completion_mask),
    `assistant` (two assistant turns, assistant_masks) or `plain` (every token a label)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (7 + (3 * i) % 8,), generator=g).tolist()
        if kind == "completion":
            out.append({"input_ids": ids, "completion_mask": [int(j >= 2 + i % 3) for j in range(len(ids))]})
        elif kind == "assistant":
            out.append({"input_ids": ids, "assistant_masks": [int(j % 5 in (2, 3)) for j in range(len(ids))]})
        else:
            out.append({"input_ids": ids})
    return out


def labels_of(row):
    """The labels of one example, from its own masks (not TRL's collator): -100 outside the trained tokens."""
    ids = torch.tensor(row["input_ids"])
    mask = torch.tensor(row.get("completion_mask", row.get("assistant_masks", [1] * len(ids)))).bool()
    return ids.masked_fill(~mask, -100)


def config(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=1, logging_steps=1,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                    bf16=False, completion_only_loss=True, seed=0, use_cpu=True, report_to="none", save_strategy="no",
                    disable_tqdm=True)
    return trl.SFTConfig(**(settings | kw))


def trainer(cls, model, data, tmp_path, sft=None, **kw):
    return cls(model=model, args=config(tmp_path, **(sft or {})), train_dataset=datasets.Dataset.from_list(data),
               processing_class=tokenizer(), **kw)


def logged(run):
    run.train()
    return [h for h in run.state.log_history if "loss" in h]


def parameters(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_difference(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_fused_loss_is_the_one_trained(name, tmp_path):
    """SFTTrainer with compute_loss_func (EL of the full logits), EncouragingSFTTrainer, and EncouragingSFTTrainer
    with a fuse_encouraging_loss model log the same first loss (the loss trained) and, after one SGD step with
    its gradient, the same second loss; TRL's own NLL differs."""
    options, data = OPTIONS[name], rows("completion")
    sft = dict(max_steps=2, per_device_train_batch_size=4)
    reference = logged(trainer(trl.SFTTrainer, llama(), data, tmp_path, sft,
                               compute_loss_func=compute_loss_func(causal_lm=True, **loss_options(options))))
    ours = logged(trainer(EncouragingSFTTrainer, llama(), data, tmp_path, sft, el_options=options))
    fused = logged(trainer(EncouragingSFTTrainer, fuse_encouraging_loss(llama(), **options), data, tmp_path, sft))
    nll = logged(trainer(trl.SFTTrainer, llama(), data, tmp_path, sft))
    for run in (ours, fused):
        assert run[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6, abs=0)
        assert run[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-5, abs=0)
        for metric in ("entropy", "mean_token_accuracy", "num_tokens"):
            assert run[0][metric] == pytest.approx(reference[0][metric], rel=1e-6), metric
    assert abs(nll[0]["loss"] - reference[0]["loss"]) > 1e-3


def test_a_fused_model_under_plain_sft_trainer_is_refused_in_one_line(tmp_path):
    """SFTTrainer replaces the model's forward with its fused NLL head: the first training step raises (one
    line) instead of training with cross-entropy, before any update."""
    model = fuse_encouraging_loss(llama(), log_end=0.5)
    run = trainer(trl.SFTTrainer, model, rows("completion"), tmp_path)
    before = parameters(model)
    with pytest.raises(ValueError, match="forward was bypassed") as err:
        run.train()
    assert "\n" not in str(err.value)
    assert max_difference(parameters(model), before) == 0.0


def test_a_fused_model_with_compute_loss_func_under_sft_trainer_still_trains(tmp_path):
    """SFTTrainer's compute_loss_func path calls the model's own forward (and its fused head only without
    gradients, for the metrics): nothing is bypassed, the loss is compute_loss_func's."""
    data = rows("completion")
    plain = logged(trainer(trl.SFTTrainer, llama(), data, tmp_path,
                           compute_loss_func=compute_loss_func(causal_lm=True, log_end=0.5)))
    fused = logged(trainer(trl.SFTTrainer, fuse_encouraging_loss(llama(), log_end=0.5), data, tmp_path,
                           compute_loss_func=compute_loss_func(causal_lm=True, log_end=0.5)))
    assert fused[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)


def reference_loss(model, data, options, grad=False):
    """The float64 encouraging loss, summed over each example's own labels (computed alone, unpacked) and
    divided by their count: torch's F.cross_entropy conventions + rho b (reference64). `model`: not yet
    given to a trainer (a deep copy of a patched model would run the original's forward). grad: the loss of
    `model` itself (float64), differentiable; else a float."""
    double = model if grad else copy.deepcopy(model).double().eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    formula = dict(weight=options.get("weight"), label_smoothing=options.get("label_smoothing", 0.0),
                   rho=options["bonus_rho"], eps_b=options.get("bonus_label_smoothing", 0.0),
                   kind=options.get("bonus", "log"), log_end=options["log_end"], gamma=options.get("bonus_gamma", 1.0),
                   start=options.get("bonus_start", 0.0))
    with torch.set_grad_enabled(grad):
        for row in data:
            logits = double(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            target = labels_of(row)[1:]
            total = total + torch_el_loss64(logits, target, reduction="sum", **formula)
            count += int(target.ne(-100).sum())
    return total / count if grad else float(total / count)


WEIGHT = torch.linspace(0.5, 1.5, VOCAB)
REFERENCE_OPTIONS = OPTIONS | {  # every option: class weights, the other bonuses, a bonus start
    "weighted": dict(log_end=0.5, bonus_rho=0.7, weight=WEIGHT),
    "power-start": dict(bonus="power", bonus_gamma=2.0, bonus_start=0.1, bonus_rho=0.7, log_end=0.75),
    "cosine-smoothed-weighted": dict(bonus="cosine", bonus_rho=0.5, label_smoothing=0.05,
                                     bonus_label_smoothing=0.2, weight=WEIGHT, chunk_size=7, log_end=0.75),
}
BATCHES = {"completion-only": ("completion", {}), "assistant-only": ("assistant", {}),
           "packed-padding-free": ("plain", dict(packing=True))}


@pytest.mark.parametrize("batch_kind, name", [(b, n) for b in BATCHES for n in ("per-token", "smoothed", "weighted")]
                         + [("completion-only", "power-start"), ("completion-only", "cosine-smoothed-weighted")])
def test_loss_equals_the_float64_reference_on_the_same_tokens(batch_kind, name, tmp_path):
    """One collated batch (TRL's collator: completion / assistant masks, or packing with padding-free batches
    and position_ids) through EncouragingSFTTrainer.compute_loss, with `labels` and with pre-shifted
    `shift_labels` (context / sequence parallel): the float64 loss of the same tokens, each example alone."""
    (kind, sft), options = BATCHES[batch_kind], REFERENCE_OPTIONS[name]
    data, model = rows(kind), llama()
    expected = reference_loss(model, data, options)  # before the trainer patches the model's forward
    run = trainer(EncouragingSFTTrainer, model, data, tmp_path, sft, el_options=options)
    batch = next(iter(run.get_train_dataloader()))
    if sft.get("packing"):
        assert "position_ids" in batch and "attention_mask" not in batch and batch["input_ids"].size(0) == 1
    run.model.train()
    loss = run.compute_loss(run.model, dict(batch)).detach()
    assert float(loss) == pytest.approx(expected, rel=2e-6, abs=0)
    shifted = {k: v for k, v in batch.items() if k != "labels"}
    shifted["shift_labels"] = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    assert float(run.compute_loss(run.model, shifted).detach()) == pytest.approx(expected, rel=2e-6, abs=0)


@pytest.mark.parametrize("name", ["per-token", "cosine-smoothed-weighted"])
def test_gradients_equal_the_float64_reference(name, tmp_path):
    """The parameters' gradients of EncouragingSFTTrainer.compute_loss on a collated batch (TRL's head, or
    ours) are those of the float64 loss of the full logits, by autograd."""
    options, data, model = REFERENCE_OPTIONS[name], rows("completion"), llama()
    double = copy.deepcopy(model).double()
    expected = reference_loss(double, data, options, grad=True)
    expected.backward()
    run = trainer(EncouragingSFTTrainer, model, data, tmp_path, el_options=options)
    run.model.train()
    run.compute_loss(run.model, dict(next(iter(run.get_train_dataloader())))).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), double.named_parameters()):
        assert torch.allclose(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_gradient_accumulation_is_exact(name, tmp_path):
    """8 examples per step: batch 8 x accumulation 1 and batch 2 x accumulation 4 end at the same parameters
    (plain SGD, no clipping, two steps)."""
    data, start = rows("completion"), llama()

    def trained(batch_size, accumulation):
        model = copy.deepcopy(start)
        sft = dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                   max_steps=2, output_dir=str(tmp_path / f"b{batch_size}"))
        trainer(EncouragingSFTTrainer, model, data, tmp_path, sft, el_options=OPTIONS[name]).train()
        return parameters(model)

    one, four = trained(8, 1), trained(2, 4)
    assert max_difference(one, parameters(start)) > 1e-2  # it trained
    assert max_difference(one, four) < 1e-5


def predictive_llama():
    """A Llama whose top-1 is often right on `repeating` data: small layer outputs (the residual stream is
    mostly the token's embedding) and an output embedding aligned with the input one (it predicts the token
    it reads), so mean_token_accuracy is neither 0 nor 1 and the entropy is not log V."""
    model = llama(seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(0.1)
        model.lm_head.weight.copy_(2.0 * model.model.embed_tokens.weight)
    return model


def repeating(n=8):
    """Examples where about half of the next tokens repeat the current one."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (8 + i % 5,), generator=g)
        repeat = torch.rand(ids.shape, generator=g) < 0.5
        for j in range(1, ids.numel()):
            if repeat[j]:
                ids[j] = ids[j - 1]
        out.append({"input_ids": ids.tolist(), "completion_mask": [int(j >= 2) for j in range(ids.numel())]})
    return out


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_trl_metrics_equal_their_values_from_the_full_logits(name, tmp_path):
    """The logged entropy and mean_token_accuracy of the first step (one batch of all 8 examples) are those of
    the model's full float64 logits on the labelled tokens, computed here from its own forward."""
    model, data = predictive_llama(), repeating()
    entropy_sum, correct, count = 0.0, 0, 0
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        for row in data:
            logits = double(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
            target = labels_of(row)[1:]
            kept = target.ne(-100)
            log_p = logits[kept].log_softmax(-1)
            entropy_sum += float(-(log_p.exp() * log_p).sum())
            correct += int(logits[kept].argmax(-1).eq(target[kept]).sum())
            count += int(kept.sum())
    first = logged(trainer(EncouragingSFTTrainer, model, data, tmp_path, el_options=OPTIONS[name]))[0]
    assert 0.2 < correct / count < 0.9
    assert first["mean_token_accuracy"] == pytest.approx(correct / count, rel=1e-6)
    assert first["entropy"] == pytest.approx(entropy_sum / count, rel=1e-5)
    assert first["num_tokens"] == sum(len(r["input_ids"]) for r in data)


class LargestLogits(TorchDispatchMode):
    """Records the most rows (all dimensions but the last) of any tensor an op returns whose last dimension is
    the vocabulary: the (tokens, V) logits, their softmax or gradient, or a chunk of them (not the output
    embedding's (D, V) transpose)."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.size(-1) == VOCAB and t.shape != (HIDDEN, VOCAB):
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_training_never_holds_the_logits(name, tmp_path, monkeypatch):
    """A training step (forward, backward, metrics) of EncouragingSFTTrainer never holds more than a chunk of
    logit rows (TRL's head tiled by 8 tokens here, ours by chunk_size 5): fewer than the batch's labelled
    tokens; the compute_loss_func run holds them all (the check sees the logits where they are)."""
    import trl.kernels.chunked_logprob as chunked_logprob

    monkeypatch.setattr(chunked_logprob, "TOKEN_CHUNK_SIZE", 8)
    data = rows("completion")
    labelled = sum(int(labels_of(r)[1:].ne(-100).sum()) for r in data)
    ours = trainer(EncouragingSFTTrainer, llama(), data, tmp_path, el_options=OPTIONS[name])
    with LargestLogits() as seen:
        ours.train()
    assert 0 < seen.rows <= 8
    full = trainer(trl.SFTTrainer, llama(), data, tmp_path,
                   compute_loss_func=compute_loss_func(causal_lm=True, **loss_options(OPTIONS[name])))
    with LargestLogits() as seen_full:
        full.train()
    assert seen_full.rows >= labelled


def test_evaluation_loss_is_the_encouraging_loss(tmp_path):
    """evaluate() reports EL (as SFTTrainer's compute_loss_func path does) and TRL's eval metrics."""
    data, options = rows("completion"), OPTIONS["smoothed"]
    ours = trainer(EncouragingSFTTrainer, llama(), data, tmp_path, el_options=options,
                   eval_dataset=datasets.Dataset.from_list(data))
    theirs = trainer(trl.SFTTrainer, llama(), data, tmp_path, eval_dataset=datasets.Dataset.from_list(data),
                     compute_loss_func=compute_loss_func(causal_lm=True, **loss_options(options)))
    mine, reference = ours.evaluate(), theirs.evaluate()
    assert mine["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)
    assert mine["eval_entropy"] == pytest.approx(reference["eval_entropy"], rel=1e-6)


@pytest.mark.parametrize("kw, sft, message", [
    (dict(compute_loss_func=compute_loss_func(causal_lm=True)), {}, "compute_loss_func is not allowed"),
    ({}, dict(loss_type="dft"), "loss_type 'dft' is not allowed"),
    ({}, dict(label_smoothing_factor=0.1), "label_smoothing_factor 0.1 is not allowed"),
    (dict(el_options=dict(reduction="mean")), {}, "reduction is fixed in a Trainer loss"),
    (dict(el_options=dict(log_ends=0.5)), {}, "'log_ends' is not an option of encouraging_linear_loss"),
    (dict(el_options=dict(log_end=1.5)), {}, "log_end"),
])
def test_bad_arguments_are_refused_in_one_line(kw, sft, message, tmp_path):
    with pytest.raises(ValueError, match=message) as err:
        trainer(EncouragingSFTTrainer, llama(), rows("completion"), tmp_path, sft, **kw)
    assert "\n" not in str(err.value)


def test_smoothed_el_on_a_model_with_transformed_logits_is_refused_and_per_token_el_takes_trls_head(tmp_path):
    """Smoothed EL takes our head, which does not soft-cap logits: refused in one line. Per-token EL rides on
    TRL's head, which does: it trains, with the loss of the soft-capped logits (compute_loss_func's)."""
    capped = dict(final_logit_softcapping=3.0)
    with pytest.raises(ValueError, match="logit soft-capping") as err:
        trainer(EncouragingSFTTrainer, llama(**capped), rows("completion"), tmp_path, el_options=OPTIONS["smoothed"])
    assert "\n" not in str(err.value)
    data, options = rows("completion"), OPTIONS["per-token"]
    ours = logged(trainer(EncouragingSFTTrainer, llama(**capped), data, tmp_path, el_options=options))
    reference = logged(trainer(trl.SFTTrainer, llama(**capped), data, tmp_path,
                               compute_loss_func=compute_loss_func(causal_lm=True, **options)))
    assert ours[0]["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6)


def test_a_fused_model_and_different_el_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="give one of them"):
        trainer(EncouragingSFTTrainer, fuse_encouraging_loss(llama(), log_end=0.5), rows("plain"), tmp_path,
                el_options=dict(log_end=0.75))


def test_el_fairseq_hf_imports_trl_only_for_the_trainer():
    import el_fairseq.hf

    assert el_fairseq.hf.EncouragingSFTTrainer is EncouragingSFTTrainer  # the lazy export
    code = "import sys, el_fairseq.hf; assert 'trl' not in sys.modules, 'el_fairseq.hf imported trl'"
    subprocess.run([sys.executable, "-c", code], check=True)

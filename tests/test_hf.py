"""el_fairseq.hf against transformers' own losses and Trainer, on tiny models built from configs (nothing
downloaded): a Marian seq2seq, a Llama- and a GPT-2-style causal LM; the encouraging loss against the
float64 reference of the paper's formula (reference64.py)."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from reference64 import el_loss64

import transformers  # requirements.txt installs it: these tests run wherever `make test` does, never skipped

from el_fairseq.hf import compute_loss_func, trainer_loss

VOCAB, PAD = 37, 0  # an odd vocabulary; id 0 pads
EL = dict(log_end=0.5, bonus_rho=0.7, bonus_label_smoothing=0.1, label_smoothing=0.1)  # non-default options


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   pad_token_id=PAD, attention_dropout=0.0)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
                                  bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


def marian():
    cfg = transformers.MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                    decoder_ffn_dim=24, max_position_embeddings=32, dropout=0.0,
                                    attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD,
                                    decoder_start_token_id=PAD, eos_token_id=1, forced_eos_token_id=1)
    return transformers.MarianMTModel(cfg)


def padded(lengths, generator, width=9):
    """Token ids in [2, VOCAB) of the given lengths, right-padded; mask; labels -100 on the padding."""
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask.long(), ids.masked_fill(~mask, -100)


def batch(kind, n=8, seed=0):
    """n examples of varied lengths (so micro-batches hold different numbers of labels)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3 + (5 * i) % 7 for i in range(n)]
    ids, mask, labels = padded(lengths, g)
    if kind == "seq2seq":
        _, _, target = padded(lengths[::-1], g, width=7)
        decoder_in = transformers.models.marian.modeling_marian.shift_tokens_right(target, PAD, PAD)
        return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_in), target
    return dict(input_ids=ids, attention_mask=mask), labels


MODELS = {"marian": (marian, "seq2seq"), "llama": (llama, "causal"), "gpt2": (gpt2, "causal")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bonus_off_is_the_models_own_loss(name):
    build, kind = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    inputs, labels = batch(kind)
    loss_func = compute_loss_func(causal_lm=kind == "causal", bonus_rho=0.0)
    with torch.no_grad():
        own = model(**inputs, labels=labels).loss  # the model's mean over its targets
        mine = loss_func(model(**inputs), labels)
        assert torch.allclose(mine, own, atol=1e-6, rtol=1e-6), (mine, own)
        if kind == "causal":  # with Trainer's count: transformers' sum / num_items_in_batch
            n = torch.tensor(100)
            own = model(**inputs, labels=labels, num_items_in_batch=n).loss
            mine = loss_func(model(**inputs), labels, num_items_in_batch=n)
            assert torch.allclose(mine, own, atol=1e-6, rtol=1e-6), (mine, own)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bonus_on_is_the_encouraging_loss_of_the_models_logits(name):
    build, kind = MODELS[name]
    torch.manual_seed(1)
    model = build().eval()
    inputs, labels = batch(kind, n=5, seed=3)
    with torch.no_grad():
        logits = model(**inputs).logits
    if kind == "causal":  # position t predicts t + 1
        logits, target = logits[:, :-1], labels[:, 1:]
    else:
        target = labels
    eps = EL["label_smoothing"] * (VOCAB - 1) / VOCAB  # the reference takes fairseq's smoothing convention
    total, _ = el_loss64(logits, target, eps, EL["bonus_label_smoothing"], EL["bonus_rho"], pad=-100,
                         log_end=EL["log_end"])
    count = int(target.ne(-100).sum())
    loss_func = compute_loss_func(causal_lm=kind == "causal", **EL)
    with torch.no_grad():
        mean = loss_func(model(**inputs), labels)
        per_item = loss_func(model(**inputs), labels, num_items_in_batch=torch.tensor(64))
    assert abs(float(mean) - float(total) / count) < 1e-5
    assert abs(float(per_item) - float(total) / 64) < 1e-5


def test_tuple_outputs_and_other_el_options():
    torch.manual_seed(2)
    logits = torch.randn(3, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (3, 5))
    labels[0, :2] = -100
    opts = dict(bonus="power", bonus_gamma=2.0, bonus_start=0.1, bonus_rho=0.5)
    total, _ = el_loss64(logits, labels, 0.0, 0.0, 0.5, pad=-100, kind="power", gamma=2.0, start=0.1)
    got = compute_loss_func(**opts)((logits,), labels, num_items_in_batch=7)
    assert abs(float(got) - float(total) / 7) < 1e-5


def test_class_weight_is_summed_over_num_items_in_batch():
    """weight=: the weighted losses summed over Trainer's count (bonus off: F.cross_entropy's weighted sum / n)."""
    torch.manual_seed(5)
    logits, labels = torch.randn(2, 6, VOCAB), torch.randint(0, VOCAB, (2, 6))
    labels[1, 3:] = -100
    weight = torch.rand(VOCAB) + 0.5
    got = compute_loss_func(causal_lm=True, bonus_rho=0.0, weight=weight)({"logits": logits}, labels, 9)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), weight=weight,
                               reduction="sum") / 9
    assert torch.allclose(got, expected, atol=1e-6)


def trained(model, data, batch_size, accumulation, tmp_path, loss_func):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"b{batch_size}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, num_train_epochs=3, learning_rate=0.5, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=0, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, compute_loss_func=loss_func)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def max_difference(a, b):
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trainer_accumulation_does_not_change_the_update(name, tmp_path):
    """8 examples per step: batch 8 x accumulation 1 and batch 2 x accumulation 4 end at the same parameters
    (plain SGD, no clipping, so a loss off by a factor would show); a per-micro-batch mean does not."""
    build, kind = MODELS[name]
    torch.manual_seed(0)
    start = build()
    inputs, labels = batch(kind)
    data = [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(8)]
    loss_func = compute_loss_func(causal_lm=kind == "causal", **EL)
    one = trained(copy.deepcopy(start), data, 8, 1, tmp_path, loss_func)
    four = trained(copy.deepcopy(start), data, 2, 4, tmp_path, loss_func)
    initial = dict(start.named_parameters())
    assert max_difference(one, initial) > 1e-2  # it trained
    assert max_difference(one, four) < 1e-5

    def per_micro_batch_mean(outputs, labels, num_items_in_batch=None):  # the old README snippet
        return trainer_loss(outputs.logits, labels, causal_lm=kind == "causal", **EL)

    wrong = trained(copy.deepcopy(start), data, 2, 4, tmp_path, per_micro_batch_mean)
    assert max_difference(one, wrong) > 1e-3


@pytest.mark.parametrize("options, message", [
    (dict(reduction="mean"), "reduction is fixed in a Trainer loss"),
    (dict(ignore_index=0), "ignore_index is fixed in a Trainer loss"),
    (dict(log_ends=0.5), "'log_ends' is not an option of encouraging_loss: allowed "),
    (dict(log_end=1.5), "log_end"),
    (dict(bonus="square"), "bonus"),
])
def test_bad_options_are_refused_in_one_line_at_once(options, message):
    with pytest.raises(ValueError) as err:
        compute_loss_func(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_or_misshapen_labels_are_refused_in_one_line():
    loss_func = compute_loss_func()
    with pytest.raises(ValueError, match="labels is None"):
        loss_func({"logits": torch.zeros(2, 3, 5)}, None)
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) does not match logits \(2, 3, 5\)"):
        loss_func({"logits": torch.zeros(2, 3, 5)}, torch.zeros(2, 4, dtype=torch.long))


def test_the_loss_imports_without_transformers():
    """el_fairseq, its loss and el_fairseq.hf's loss import and run with transformers unimportable; the loss
    never loads el_fairseq.hf."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'transformers':
            raise ImportError('transformers blocked')
sys.meta_path.insert(0, Block())
import torch, el_fairseq, el_fairseq.loss
assert not [m for m in sys.modules if m.startswith('el_fairseq.hf')], 'the loss loaded el_fairseq.hf'
from el_fairseq.hf import compute_loss_func
loss = compute_loss_func(causal_lm=True)({'logits': torch.randn(2, 4, 7)}, torch.randint(0, 7, (2, 4)))
assert 'transformers' not in sys.modules
print(float(loss) > 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


# --- the fused path: the loss from the last hidden state and the output embedding ---------------------------

def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("options", [EL, dict(bonus_rho=0.0), dict(EL, weight="random", chunk_size=5)],
                         ids=["EL", "CE", "EL-weighted-chunks"])
def test_fused_equals_the_logits_path_in_loss_and_gradients(name, options):
    from el_fairseq.hf import fuse_encouraging_loss

    if options.get("weight") == "random":  # a class weight, and chunks that do not divide the 54 token rows
        options = dict(options, weight=torch.rand(VOCAB, generator=torch.Generator().manual_seed(7)) + 0.5)
    logits_options = {k: v for k, v in options.items() if k != "chunk_size"}

    build, _ = MODELS[name]
    torch.manual_seed(3)
    logits_model = build().train()
    fused = fuse_encouraging_loss(copy.deepcopy(logits_model), **options)
    inputs, labels = batch("causal", n=6, seed=5)
    n = torch.tensor(41)
    reference = compute_loss_func(causal_lm=True, **logits_options)(logits_model(**inputs), labels,
                                                                    num_items_in_batch=n)
    reference.backward()
    out = fused(**inputs, labels=labels, num_items_in_batch=n)
    assert out.logits is None  # training: no logits
    out.loss.backward()
    assert torch.allclose(out.loss, reference, atol=1e-6, rtol=1e-6), (out.loss, reference)
    expected, got = grads(logits_model), grads(fused)
    assert set(got) == set(expected) and len(got) == len(dict(fused.named_parameters()))
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=1e-5), k
    if options.get("bonus_rho") == 0.0:  # and with the bonus off, the model's own loss
        own = logits_model(**inputs, labels=labels, num_items_in_batch=n).loss
        assert torch.allclose(out.loss, own, atol=1e-6, rtol=1e-6)


def test_fused_options_are_those_of_the_linear_loss():
    from el_fairseq.hf import fuse_encouraging_loss

    fuse_encouraging_loss(llama(), chunk_size=7)  # the projection's own option
    with pytest.raises(ValueError, match="'chunk_size' is not an option of encouraging_loss"):
        compute_loss_func(chunk_size=7)
    with pytest.raises(ValueError, match="'chunk_sizes' is not an option of encouraging_linear_loss"):
        fuse_encouraging_loss(llama(), chunk_sizes=7)
    with pytest.raises(ValueError, match="log_end"):
        fuse_encouraging_loss(llama(), log_end=0.0)


def test_fused_model_in_eval_mode_and_without_labels_keeps_its_logits():
    from el_fairseq.hf import fuse_encouraging_loss

    torch.manual_seed(4)
    plain = llama().eval()
    fused = fuse_encouraging_loss(copy.deepcopy(plain), chunk_size=4, **EL).eval()
    inputs, labels = batch("causal", n=3, seed=6)
    with torch.no_grad():
        logits = plain(**inputs).logits
        assert torch.equal(fused(**inputs).logits, logits)
        out = fused(**inputs, labels=labels)
        assert torch.equal(out.logits, logits)
        expected = compute_loss_func(causal_lm=True, **EL)({"logits": logits}, labels)
        assert torch.allclose(out.loss, expected, atol=1e-6)
        generated = fused.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, 7)
    assert type(plain).forward is type(fused).forward  # the class is untouched


def test_fused_trainer_with_accumulation_matches_the_logits_path(tmp_path):
    """Trainer passes num_items_in_batch to the fused model's forward: batch 2 x accumulation 4 fused ends
    where batch 8 x accumulation 1 through compute_loss_func does."""
    from el_fairseq.hf import fuse_encouraging_loss

    torch.manual_seed(0)
    start = gpt2()
    inputs, labels = batch("causal")
    data = [{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(8)]
    one = trained(copy.deepcopy(start), data, 8, 1, tmp_path, compute_loss_func(causal_lm=True, **EL))
    fused = trained(fuse_encouraging_loss(copy.deepcopy(start), **EL), data, 2, 4, tmp_path, None)
    assert max_difference(one, dict(start.named_parameters())) > 1e-2
    assert max_difference(one, fused) < 1e-5


def refused_models():
    t = transformers
    small = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    yield "gemma2", lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**small)), "logit soft-capping (config.final_logit_softcapping=30.0)"
    yield "cohere", lambda: t.CohereForCausalLM(t.CohereConfig(**small)), "logit scaling (config.logit_scale=0.0625)"
    yield "marian", marian, "MarianMTModel is an encoder-decoder model"


@pytest.mark.parametrize("name, build, message", list(refused_models()), ids=[r[0] for r in refused_models()])
def test_fused_refuses_models_whose_logits_are_not_a_plain_projection(name, build, message):
    from el_fairseq.hf import fuse_encouraging_loss

    with pytest.raises(ValueError) as err:
        fuse_encouraging_loss(build())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_only_el_fairseq_hf_imports_el_fairseq_hf():
    """The integration sits above the loss: no other module of el_fairseq imports it (function bodies too)."""
    from test_layout import GRAPH

    importers = {m for m, deps in GRAPH.items() if not m.startswith("el_fairseq.hf")
                 and any(d.startswith("el_fairseq.hf") for d in deps)}
    assert "el_fairseq.hf.fused" in GRAPH and importers == set()

"""--el-fused-projection: the criterion takes the loss from the decoder's features and output projection
(el_fairseq.loss.linear) instead of the logits. Same loss, gradients (a shared embedding included),
logging outputs and accuracy as without the flag, on a small model and through fairseq-train itself
(20 updates, train and valid losses); decoders without a plain output projection are refused in one line."""
import json

import pytest
import torch
from conftest import run
from fairseq_fixtures import PAD, TinyModel, build, make_sample

from el_fairseq.cli import user_dir
from el_fairseq.loss.bonus import EncouragingLossOptionError

VOCAB, DIM = 41, 9


class ProjectionDecoder(torch.nn.Module):
    adaptive_softmax = None

    def __init__(self, embed, tied):
        super().__init__()
        self.output_projection = torch.nn.Linear(DIM, VOCAB, bias=not tied)
        if tied:  # fairseq's --share-decoder-input-output-embed: one Parameter, used twice
            self.output_projection.weight = embed.weight


class ProjectionModel(torch.nn.Module):
    """features = tanh(E[src] A), logits = output_projection(features), fairseq's decoder interface."""

    def __init__(self, tied, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.mix = torch.nn.Parameter(torch.randn(DIM, DIM) * 2.0)
        self.decoder = ProjectionDecoder(self.embed, tied)
        self.calls = []

    def forward(self, src_tokens, features_only=False, **kwargs):
        self.calls.append(features_only)
        features = torch.tanh(self.embed(src_tokens) @ self.mix) * 4.0
        return (features if features_only else self.decoder.output_projection(features)), {"attn": None}

    def get_targets(self, sample, net_output):
        return sample["target"]

    def get_normalized_probs(self, net_output, log_probs):
        return torch.log_softmax(net_output[0].float(), -1) if log_probs else torch.softmax(net_output[0].float(), -1)


def step(fused, tied, model_dtype=torch.float32, **options):
    model = ProjectionModel(tied).to(model_dtype)
    criterion = build("encouraging_loss", VOCAB, el_fused_projection=fused, report_accuracy=True, **options)
    sample = make_sample(5, 7, VOCAB, seed=2)
    with torch.no_grad():  # a third of the tokens predicted right: the accuracy is not 0
        best = model(sample["net_input"]["src_tokens"])[0].argmax(-1)
    right = torch.zeros_like(best, dtype=torch.bool)
    right[:, ::3] = True
    sample["target"] = torch.where(right & sample["target"].ne(PAD), best, sample["target"])
    loss, sample_size, logs = criterion(model, sample)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert model.calls[-1] == fused  # the flag's path ran: the decoder gave features, not logits
    return loss.detach(), sample_size, logs, grads


@pytest.mark.parametrize("tied", [True, False], ids=["shared-embedding", "own-projection"])
@pytest.mark.parametrize("options", [
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.1, bonus_label_smoothing=0.0, log_end=0.75, ignore_prefix_size=1),
    dict(label_smoothing=0.0, bonus_rho=0.0, el_impl="chunked"),
    dict(label_smoothing=0.1, bonus="power", bonus_gamma=2.0, el_impl="reference"),
], ids=["el", "el-prefix", "ce-chunked", "power-reference"])
def test_same_loss_gradients_and_logs_as_from_the_logits(tied, options):
    loss, size, logs, grads = step(True, tied, **options)
    want_loss, want_size, want_logs, want_grads = step(False, tied, **options)
    assert torch.allclose(loss, want_loss, rtol=1e-5) and size == want_size
    assert set(logs) == set(want_logs) and {"n_correct", "margin_sum", "well_classified"} <= set(logs)
    for key, value in want_logs.items():
        assert torch.allclose(torch.as_tensor(logs[key]).double(), torch.as_tensor(value).double(), rtol=1e-5,
                              atol=1e-4), key
    assert logs["n_correct"] == want_logs["n_correct"] > 0
    assert set(grads) == set(want_grads)
    for name, g in want_grads.items():
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_validation_without_gradients_and_unreduced_loss():
    model = ProjectionModel(tied=True)
    sample = make_sample(4, 6, VOCAB, seed=3)
    fused = build("encouraging_loss", VOCAB, el_fused_projection=True, label_smoothing=0.1)
    plain = build("encouraging_loss", VOCAB, label_smoothing=0.1)
    with torch.no_grad():
        got, want = fused(model, sample), plain(model, sample)
    assert not got[0].requires_grad and torch.allclose(got[0], want[0], rtol=1e-5)
    per_token, _, logs = fused(model, sample, reduce=False)
    assert per_token.shape == (4 * 6, 1) and torch.allclose(per_token, plain(model, sample, reduce=False)[0],
                                                          rtol=1e-5, atol=1e-6)
    assert torch.allclose(logs["nll_loss"], plain(model, sample, reduce=False)[2]["nll_loss"], rtol=1e-5, atol=1e-6)


def test_decoders_without_a_plain_output_projection_are_refused_in_one_line():
    criterion = build("encouraging_loss", VOCAB, el_fused_projection=True)
    sample = make_sample(2, 3, VOCAB)
    with pytest.raises(EncouragingLossOptionError, match="needs a decoder with a plain output projection") as err:
        criterion(TinyModel(VOCAB), sample)
    assert "\n" not in str(err.value)
    model = ProjectionModel(tied=False)
    model.decoder.adaptive_softmax = object()
    with pytest.raises(EncouragingLossOptionError, match="uses adaptive softmax"):
        criterion(model, sample)


TINY = ["--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "32",
        "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2"]
KEYS = ("loss", "nll_loss", "accuracy", "margin", "energy", "p_y", "well_classified_pct")  # (here: all equal)


def fairseq_train(data_bin, *extra, check=True):
    proc = run("fairseq-train", str(data_bin / "bin"), "--user-dir", user_dir(), *TINY,
               "--criterion", "encouraging_loss", "--label-smoothing", "0.1", "--report-accuracy",
               "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
               "--max-tokens", "600", "--max-update", "20", "--dropout", "0", "--log-format", "json",
               "--log-interval", "5", "--cpu", "--seed", "3", "--no-save", "--num-workers", "0",
               "--validate-interval-updates", "20", *extra, check=check)
    if not check:
        return proc
    records = {"train_inner": [], "valid": []}
    for line in (proc.stdout + proc.stderr).splitlines():
        for kind in records:
            if f"| {kind} | " in line:
                records[kind].append(json.loads(line.split(f"| {kind} | ", 1)[1]))
    return records


@pytest.mark.parametrize("options", [["--log-end", "0.75", "--share-decoder-input-output-embed"],
                                     ["--bonus-rho", "0"]], ids=["el-shared-embedding", "ce"])
def test_fairseq_train_20_updates_same_train_and_valid_losses(data_bin, options):
    fused = fairseq_train(data_bin, "--el-fused-projection", *options)
    plain = fairseq_train(data_bin, *options)
    assert len(fused["train_inner"]) == len(plain["train_inner"]) == 4 and len(plain["valid"]) >= 1
    for got, want in zip(fused["train_inner"] + fused["valid"], plain["train_inner"] + plain["valid"]):
        prefix = "valid_" if "valid_loss" in want else ""
        for key in KEYS + (("gnorm",) if not prefix else ()):
            assert last_digit_apart(got[prefix + key], want[prefix + key]) <= 1, (prefix + key, got, want)


def last_digit_apart(a, b):
    """How many units of the last logged decimal (fairseq rounds to 2-4) two logged numbers differ by."""
    decimals = max(len(x.partition(".")[2]) for x in (a, b))
    return round(abs(float(a) - float(b)) * 10 ** decimals)


def test_fairseq_train_refuses_adaptive_softmax_in_one_line(data_bin):
    proc = fairseq_train(data_bin, "--el-fused-projection", "--adaptive-softmax-cutoff", "10", "--max-update", "1",
                         check=False)
    assert proc.returncode != 0
    # (at exit, fairseq's background batch thread may add "terminate called without an active exception")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fairseq-train: error:")]
    assert errors == ["fairseq-train: error: --el-fused-projection needs a plain output projection: this decoder "
                      "uses adaptive softmax (drop one of the two)"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_matches_its_logits_path(dtype):
    """A 16-bit model (fairseq --fp16/--bf16 keeps the parameters in it): gradients in its dtype, finite,
    and those of the logits path of the same model (which rounds the logits to 16 bits; the fused chunks
    keep them in float32) to the 16-bit precision of the model's own backward."""
    loss, _, logs, grads = step(True, True, label_smoothing=0.1, model_dtype=dtype)
    want_loss, _, want_logs, want_grads = step(False, True, label_smoothing=0.1, model_dtype=dtype)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert loss.dtype == torch.float32 and torch.allclose(loss, want_loss.float(), rtol=tol)
    assert logs["n_correct"] == want_logs["n_correct"]
    for name, g in want_grads.items():
        assert grads[name].dtype == dtype and torch.isfinite(grads[name]).all()
        assert (grads[name].float() - g.float()).abs().max() <= tol * g.float().abs().max(), name


def test_fairseq_train_two_workers_with_the_flag_equal_update_freq_2_without(data_bin):
    """Two gloo workers summing the fused path's logging outputs and gradients = one process, two batches
    per update, from the logits (tests/test_distributed.py shows the two set-ups equal without the flag)."""
    two = fairseq_train(data_bin, "--el-fused-projection", "--distributed-world-size", "2", "--max-update", "10",
                        "--validate-interval-updates", "10")
    one = fairseq_train(data_bin, "--update-freq", "2", "--max-update", "10", "--validate-interval-updates", "10")
    assert len(two["train_inner"]) == len(one["train_inner"]) == 2 and two["valid"] and one["valid"]
    for got, want in zip(two["train_inner"] + two["valid"], one["train_inner"] + one["valid"]):
        prefix = "valid_" if "valid_loss" in want else ""
        for key in KEYS + (("gnorm",) if not prefix else ()):
            assert last_digit_apart(got[prefix + key], want[prefix + key]) <= 1, (prefix + key, got, want)


@pytest.mark.usefixtures("fresh_kernel_state")
def test_a_wrong_bonus_path_is_caught_at_update_zero_of_a_bonus_schedule(monkeypatch):
    """With --bonus-schedule rho is 0 at update 0, where the per-chunk kernel runs without its bonus: the
    fused path's first-use self-check also runs with the configured rho, as the logits path's does."""
    from fairseq.logging import metrics

    from el_fairseq.loss import native, self_check

    real = native.forward

    def wrong_bonus_path(logits, target, epsilon, spec, ignore_index, need_grad=True):
        loss, nll, stats, grad = real(logits, target, epsilon, spec, ignore_index, need_grad=need_grad)
        return loss, nll, stats, grad * 1.5 if spec.active and grad is not None else grad

    monkeypatch.setattr(native, "forward", wrong_bonus_path)
    options = dict(label_smoothing=0.1, bonus_rho=0.8, bonus_schedule="linear", bonus_schedule_updates=100)
    with metrics.aggregate("train"):
        metrics.log_scalar("num_updates", 0, weight=0)  # what Trainer.set_num_updates does
        with pytest.warns(RuntimeWarning, match="the native kernel failed its self-check"):
            step(True, True, **options)
    reason = self_check._results[("native", torch.float32, "cpu")][1]
    assert "gradient off by" in reason and "at rho 0.8" in reason, reason

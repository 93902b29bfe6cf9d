"""el_fairseq.torchtitan (issue 27 item 5): the encouraging loss as torchtitan's `Trainer.Config.loss` (torchtitan
0.3.0). With the bonus off it is torchtitan's CrossEntropyLoss (value and gradient: the sum over labels != -100
divided by the step's global_valid_tokens); with it, `encouraging_loss` under that normalisation; the same inside
ChunkedLossWrapper; configured as torchtitan configures a loss (config functions, --loss.* overrides). Tensor
parallel (torchtitan_child.py, gloo groups of 1 and 2 processes): the logits' vocabulary split over the ranks under
each SPMD backend runs the vocabulary-parallel loss, equal to one process. torchtitan's Trainer
(torchtitan_trainer_child.py) trains its llama3 debug model a few steps on the CPU with this loss: with the bonus off
as with its own cross-entropy, chunked as unchunked, tensor parallel over 2 processes as in one."""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

import torchtitan  # noqa: F401  (requirements.txt installs it: these tests run wherever `make test` does)
from test_layout import GRAPH
from test_vocab_parallel import assert_every_case_ok, run_group
from torchtitan.components.loss import IGNORE_INDEX, ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.config import ConfigManager

from el_fairseq import encouraging_loss
from el_fairseq.torchtitan import EL_OPTIONS, EncouragingLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, L, V, D = 3, 8, 13, 6
EL = {"log_end": 0.5, "bonus_rho": 0.7, "bonus_label_smoothing": 0.1, "label_smoothing": 0.1, "bonus_start": 0.05}


def batch(dtype=torch.float32, seed=0):
    """Logits (B, L, V), labels (B, L) with three ignored, and a step's token count larger than theirs (as when the
    step holds other micro-batches or ranks)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L, V, generator=g) * 2.0).to(dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 0] = labels[1, 5] = labels[2, 7] = IGNORE_INDEX
    return logits, labels, (labels != IGNORE_INDEX).sum() * 2


def value_and_grad(loss_fn, logits, labels, tokens):
    z = logits.detach().clone().requires_grad_(True)
    loss, metrics = loss_fn(z, labels, tokens)
    loss.backward()
    assert metrics == {}
    return loss.detach(), z.grad


def python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_importing_el_fairseq_imports_no_torchtitan():
    out = python("import sys, torch, el_fairseq, el_fairseq.hf, el_fairseq.parallel; "
                 "el_fairseq.encouraging_loss(torch.randn(3, 5), torch.tensor([0, 1, 2])); "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchtitan', 'spmd_types')))")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_without_torchtitan_the_import_names_the_package():
    out = python("import sys; sys.modules['torchtitan'] = None\n"
                 "try:\n    import el_fairseq.torchtitan\nexcept ImportError as err:\n    print(repr(str(err)))")
    assert out.returncode == 0, out.stderr[-2000:]
    message = eval(out.stdout.strip())
    assert "\n" not in message and "pip install torchtitan" in message, message


def test_the_integration_sits_above_the_loss():
    assert {"el_fairseq.loss.api", "el_fairseq.parallel"} <= GRAPH["el_fairseq.torchtitan"]
    assert not [name for name, deps in GRAPH.items() if "el_fairseq.torchtitan" in deps]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_tokens", [True, False])
def test_bonus_off_is_torchtitans_cross_entropy(dtype, with_tokens):
    """Value and gradient, float32 and bfloat16 logits (both compute in float32, a float32 loss), the sum over the
    labels != -100 divided by global_valid_tokens (or the sum, without it)."""
    logits, labels, tokens = batch(dtype)
    tokens = tokens if with_tokens else None
    want, want_grad = value_and_grad(CrossEntropyLoss.Config().build(), logits, labels, tokens)
    got, grad = value_and_grad(EncouragingLoss.Config(bonus_rho=0.0).build(), logits, labels, tokens)
    assert got.dtype == want.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    assert bool(grad[labels == IGNORE_INDEX].eq(0).all())


def test_the_loss_is_el_summed_over_the_steps_tokens():
    """The options reach `encouraging_loss`: the float64 reference loss summed over the labels, over
    global_valid_tokens (twice the batch's count here: half the batch's mean); its gradient too."""
    logits, labels, tokens = batch()
    got, grad = value_and_grad(EncouragingLoss.Config(**EL).build(), logits, labels, tokens)
    z = logits.double().requires_grad_(True)
    want = encouraging_loss(z.reshape(-1, V), labels.reshape(-1), reduction="sum", impl="reference", **EL) / tokens
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.double(), z.grad, rtol=1e-5, atol=1e-7)
    mean = encouraging_loss(logits.reshape(-1, V), labels.reshape(-1), **EL)
    torch.testing.assert_close(got, mean / 2, rtol=2e-6, atol=0)


def test_the_config_defaults_are_the_losss():
    defaults = {n: p.default for n, p in inspect.signature(encouraging_loss).parameters.items() if n in EL_OPTIONS}
    config = EncouragingLoss.Config()
    assert {n: getattr(config, n) for n in EL_OPTIONS} == defaults and config.global_vocab_size is None


@pytest.mark.parametrize("options, named", [({"log_end": 1.5}, "log_end 1.5"), ({"bonus": "exp"}, "bonus 'exp'"),
                                            ({"label_smoothing": -0.1}, "label_smoothing -0.1"),
                                            ({"bonus_label_smoothing": 1.0}, "bonus_label_smoothing 1.0")])
def test_a_bad_option_fails_when_the_config_is_made(options, named):
    with pytest.raises(ValueError) as err:
        EncouragingLoss.Config(**options)
    assert str(err.value).startswith(named) and "\n" not in str(err.value)


def el_trainer():
    """A config function (what `--module ... --config ...` names, as torchtitan's config registries hold)."""
    from torchtitan.trainer import Trainer
    return Trainer.Config(loss=EncouragingLoss.Config(global_vocab_size=V, log_end=0.5))


def el_chunked_trainer():
    from torchtitan.trainer import Trainer
    return Trainer.Config(loss=ChunkedLossWrapper.Config(loss_fn=EncouragingLoss.Config(global_vocab_size=V)))


def test_the_loss_is_configured_as_torchtitan_configures_one():
    """A config function sets Trainer.Config.loss; its options take torchtitan's --loss.* command-line overrides."""
    manager = ConfigManager()
    loss = manager.parse_args(["--module", "test_torchtitan", "--config", "el_trainer",
                               "--loss.bonus_rho", "0.25", "--loss.bonus", "power", "--loss.bonus_gamma", "2"]).loss
    assert loss == EncouragingLoss.Config(global_vocab_size=V, log_end=0.5, bonus_rho=0.25, bonus="power",
                                          bonus_gamma=2.0)
    chunked = manager.parse_args(["--module", "test_torchtitan", "--config", "el_chunked_trainer",
                                  "--loss.num_chunks", "4", "--loss.loss_fn.label_smoothing", "0.1"]).loss
    assert chunked.num_chunks == 4 and chunked.loss_fn == EncouragingLoss.Config(global_vocab_size=V,
                                                                               label_smoothing=0.1)
    assert isinstance(loss.build(), EncouragingLoss) and isinstance(chunked.build().loss_fn, EncouragingLoss)


class Decoder(torch.nn.Module):
    """A stand-in for torchtitan's decoder: hidden states (B, L, D), and an lm_head (V, D)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.body = torch.nn.Linear(D, D)
        self.lm_head = torch.nn.Linear(D, V, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def gradients(self, loss_fn, chunked):
        """The loss and the parameters' gradients of one step: ChunkedLossWrapper gets the hidden states (the
        model's forward with _skip_lm_head), a plain loss the logits."""
        x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2))
        labels = batch()[1]
        self.zero_grad()
        if chunked:
            loss_fn.set_lm_head(self.lm_head)
        hidden = self.body(x)
        loss, _ = loss_fn(hidden if chunked else self.lm_head(hidden), labels, batch()[2])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in self.parameters()]


@pytest.mark.parametrize("options", [{"bonus_rho": 0.0}, EL])
def test_chunked_wrapper_equals_the_unchunked_loss(options):
    """ChunkedLossWrapper (L = 8 tokens in 4 chunks) around EncouragingLoss: the unchunked loss and gradients of
    every parameter (the lm_head's, and the decoder's through the hidden states); bonus off, its CrossEntropyLoss."""
    model = Decoder()
    want, want_grads = model.gradients(EncouragingLoss.Config(**options).build(), chunked=False)
    wrapper = ChunkedLossWrapper.Config(num_chunks=4, loss_fn=EncouragingLoss.Config(**options))
    got, grads = model.gradients(wrapper.build(), chunked=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for grad, want_grad in zip(grads, want_grads):
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    if not options["bonus_rho"]:
        ce = ChunkedLossWrapper.Config(num_chunks=4, loss_fn=CrossEntropyLoss.Config())
        ce_loss, ce_grads = model.gradients(ce.build(), chunked=True)
        torch.testing.assert_close(got, ce_loss, rtol=1e-6, atol=1e-6)
        for grad, ce_grad in zip(grads, ce_grads):
            torch.testing.assert_close(grad, ce_grad, rtol=1e-5, atol=1e-6)


# torchtitan_child.py: 5 cases (partial_dtensor, spmd_types, spmd_types typechecked, full_dtensor on the vocabulary,
# full_dtensor on the batch) x 5 option sets, and the refusal of global_vocab_size=None
TP_CASES = 5 * 5 + 1


@pytest.mark.parametrize("world", [1, 2])
def test_tensor_parallel_equals_one_process(world):
    assert_every_case_ok(run_group(world, "torchtitan_child.py", 120), TP_CASES)


TRAINER_LIMIT_S = 400


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """torchtitan_trainer_child.py's runs, one process then two: {(backend, run, world): logged}, and the folder."""
    folder = tmp_path_factory.mktemp("torchtitan_trainer")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHTITAN_TRAINER_DIR", str(folder))
        for world in (1, 2):
            outputs = run_group(world, "torchtitan_trainer_child.py", TRAINER_LIMIT_S)
            for rank, (code, out, err) in enumerate(outputs):
                assert code == 0 and "all runs ended" in out, f"rank {rank} of {world}: {code}\n{err[-4000:]}"
            for line in outputs[0][1].splitlines():
                if line.startswith("RUN "):
                    _, backend, name, logged = line.split(" ", 3)
                    runs[backend, name, world] = json.loads(logged)
    return runs, folder


def same_training(trained, a, b, tol=2e-4, param_tol=2.5e-4):
    """Runs a and b logged the same loss and gradient norm at every step, and ended at the same parameters."""
    runs, folder = trained
    for what in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(runs[a][what]), torch.tensor(runs[b][what]), rtol=tol, atol=0)
    params = [torch.load(folder / f"{name}-{backend}-{world}.pt") for backend, name, world in (a, b)]
    assert params[0].keys() == params[1].keys()
    worst = max(float((params[0][k] - params[1][k]).abs().max()) for k in params[0])
    assert worst <= param_tol, f"parameters differ by {worst}"


ONE = ("spmd_types", "ce", 1)


def test_trainer_with_the_bonus_off_trains_as_its_cross_entropy(trained):
    same_training(trained, ONE, ("spmd_types", "el-off", 1))
    assert trained[0][ONE]["loss"][-1] < trained[0][ONE]["loss"][0]  # it trains


def test_trainer_chunked_as_unchunked(trained):
    same_training(trained, ("spmd_types", "el", 1), ("spmd_types", "el-unchunked", 1))


def test_trainer_tensor_parallel_as_one_process(trained):
    """Two ranks, vocabulary split: each step runs the vocabulary-parallel loss (8 chunks, forward only: the
    backward recomputes nothing), and trains as one process does, with the bonus (both DTensor backends) and
    without (as torchtitan's cross-entropy in one process)."""
    runs = trained[0]
    for backend in ("partial_dtensor", "full_dtensor"):
        same_training(trained, ("spmd_types", "el", 1), (backend, "el", 2))
        assert runs[backend, "el", 2]["vocab_parallel_calls"] == 3 * 8
    same_training(trained, ONE, ("partial_dtensor", "el-off", 2))
    assert runs["spmd_types", "el", 1]["vocab_parallel_calls"] == 0


def test_trainer_with_the_bonus_trains_otherwise(trained):
    """The control: the bonus changes the training by far more than the tolerances of the comparisons above."""
    with pytest.raises(AssertionError):
        same_training(trained, ONE, ("spmd_types", "el", 1), tol=1e-3, param_tol=5e-4)

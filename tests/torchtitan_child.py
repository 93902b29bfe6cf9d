"""One rank of a gloo group, run by test_torchtitan.py: argv world rank port. Logits (B, L, V) with V = 11 split
torch.chunk-style over the ranks (6 + 5 classes on 2), as torchtitan's loss parallel holds them, under each of
torchtitan's SPMD backends: "partial_dtensor" (a DTensor Shard(-1) built with distribute_tensor, plain labels),
"spmd_types" (each rank's plain shard, the mesh current; also under its type checking) and "full_dtensor" (logits
and labels DTensors; also logits sharded on the batch, a Partial loss). Each case prints "CASE <rank> <name> ok"
when el_fairseq.torchtitan's EncouragingLoss equals, in value and in this rank's part of the gradient, the same
loss of the whole logits in this one process (no collective), runs the vocabulary-parallel loss's all-reduces
(2, 3 with bonus smoothing; none in the backward) where the vocabulary is split, and with bonus_rho=0 equals
torchtitan's CrossEntropyLoss under the same backend."""
import contextlib
import os
import sys

import spmd_types as spmd
import torch
from spmd_types.checker import typecheck as spmd_typecheck
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vocab_parallel_child import Rank, run_rank  # noqa: E402

from el_fairseq.torchtitan import EncouragingLoss  # noqa: E402
from torchtitan.components.loss import IGNORE_INDEX, CrossEntropyLoss  # noqa: E402
from torchtitan.distributed.spmd_types import set_current_spmd_mesh  # noqa: E402
from torchtitan.distributed.utils import get_spmd_backend, set_spmd_backend  # noqa: E402

B, L, V = 2, 6, 11
# case: torchtitan's SPMD backend
BACKENDS = {"partial_dtensor": "partial_dtensor", "spmd_types": "spmd_types", "spmd_types_checked": "spmd_types",
            "full_dtensor": "full_dtensor", "full_dtensor_batch": "full_dtensor"}
OPTIONS = {
    "ce": {"bonus_rho": 0.0},
    "ce-smoothed": {"bonus_rho": 0.0, "label_smoothing": 0.1},
    "el-default": {},
    "el-smoothings": {"label_smoothing": 0.1, "bonus_label_smoothing": 0.2, "log_end": 0.5, "bonus_rho": 1.5},
    "el-power-start": {"bonus": "power", "bonus_gamma": 2.0, "bonus_start": 0.1, "bonus_label_smoothing": 0.1},
}


def data():
    """Logits (B, L, V) float32, labels (B, L) with two ignored, one confident row; their count."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, L, V, generator=g) * 2.0
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 1] = labels[1, 4] = IGNORE_INDEX
    logits[1, 0, labels[1, 0]] += 15.0
    return logits, labels, (labels != IGNORE_INDEX).sum()


def one_process(config, logits, labels, tokens):
    """The loss and gradient of the whole logits in this process: torchtitan's plain path, no collective."""
    z = logits.clone().requires_grad_(True)
    loss, _ = config.build()(z, labels, tokens)
    loss.backward()
    return loss.detach(), z.grad


def close(got, want, what, tol=2e-6):
    got, want = (t.full_tensor() if isinstance(t, DTensor) else t for t in (got, want))
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= tol * (1.0 + float(want.abs().max())), f"{what}: max error {err}"


class Layouts:
    """How each case hands this rank its logits; returns (pred, labels, the part of the whole gradient that
    pred's gradient holds, as a function of the whole gradient)."""

    def __init__(self, world, rank):
        # torchtitan's dense mesh: axes dp, cp, tp (dp = cp = 1 here); the DTensors live on its "tp" axis
        self.mesh = init_device_mesh("cpu", (1, 1, world), mesh_dim_names=("dp", "cp", "tp"))
        self.tp = self.mesh["tp"]
        chunk = -(-V // world)
        self.classes = slice(min(V, chunk * rank), min(V, chunk * (rank + 1)))

    def partial_dtensor(self, logits, labels):
        return distribute_tensor(logits, self.tp, [Shard(-1)]), labels, lambda g: g

    def spmd_types(self, logits, labels):
        return logits[..., self.classes].contiguous(), labels, lambda g: g[..., self.classes]

    spmd_types_checked = spmd_types

    def full_dtensor(self, logits, labels):
        return (distribute_tensor(logits, self.tp, [Shard(2)]), distribute_tensor(labels, self.tp, [Replicate()]),
                lambda g: g)

    def full_dtensor_batch(self, logits, labels):
        return (distribute_tensor(logits, self.tp, [Shard(0)]), distribute_tensor(labels, self.tp, [Shard(0)]),
                lambda g: g)


def region(layouts, case, pred, labels):
    """The runtime region torchtitan's trainer opens (get_spmd_context): for spmd_types the current mesh, and with
    its type checking (debug.spmd_typechecking) the checker, the inputs typed as torchtitan's decoder types them."""
    stack = contextlib.ExitStack()
    if BACKENDS[case] == "spmd_types":
        stack.enter_context(set_current_spmd_mesh(layouts.mesh))
    if case == "spmd_types_checked":
        stack.enter_context(spmd_typecheck(local=False))
        spmd.assert_type(pred, {"dp": spmd.S(0), "cp": spmd.S(1), "tp": spmd.S(2)})
        spmd.assert_type(labels, {"dp": spmd.S(0), "cp": spmd.S(1), "tp": spmd.I})
    return stack


def run_backend(layouts, case, config, pred, labels, tokens, counter=None):
    """(loss, pred's gradient) of `config`'s loss in `case`'s region and SPMD backend; with a
    vocab_parallel_child.Counter, also the collectives of the forward and of the backward."""
    previous = get_spmd_backend()
    set_spmd_backend(BACKENDS[case])
    if counter:
        counter.take()  # counts from here
    try:
        pred = pred.detach().requires_grad_(True)
        with region(layouts, case, pred, labels):
            loss, _ = config.build()(pred, labels, tokens)
        forward = counter.take() if counter else None
        loss.backward()
        return loss.detach(), pred.grad, (forward, counter.take() if counter else None)
    finally:
        set_spmd_backend(previous)


def collectives(world, case, options):
    """The all-reduces of the vocabulary-parallel loss (forward, backward): 2 in the forward, 3 with bonus
    smoothing, none in the backward; none where the vocabulary is not split (a batch-sharded DTensor, and the
    spmd_types backend of one rank, which takes the plain path as torchtitan's does)."""
    if case == "full_dtensor_batch" or (BACKENDS[case] == "spmd_types" and world == 1):
        return [], []
    smoothed = options.get("bonus_label_smoothing", 0.0) > 0.0 and options.get("bonus_rho", 1.0) > 0.0
    return ["all_reduce"] * (3 if smoothed else 2), []


def check(me, layouts, case, options):
    """`case`'s loss and gradient on this rank against one process (and CrossEntropyLoss with the bonus off)."""
    logits, labels, tokens = data()
    config = EncouragingLoss.Config(global_vocab_size=V, **options)
    want, want_grad = one_process(config, logits, labels, tokens)
    pred, labels_here, part = getattr(layouts, case)(logits, labels)
    loss, grad, calls = run_backend(layouts, case, config, pred, labels_here, tokens, me.counter)
    assert calls == collectives(me.world, case, options), f"collectives (forward, backward): {calls}"
    close(loss, want, "loss")
    close(grad, part(want_grad), "gradient")
    if isinstance(pred, DTensor):
        assert isinstance(grad, DTensor) and grad.placements == pred.placements, grad
    if options.get("bonus_rho", 1.0) == 0.0 and "label_smoothing" not in options:
        ce_config = CrossEntropyLoss.Config(global_vocab_size=V)
        ce, ce_grad, _ = run_backend(layouts, case, ce_config, pred, labels_here, tokens)
        close(loss, ce, "loss against CrossEntropyLoss")
        close(grad, ce_grad, "gradient against CrossEntropyLoss")


def torchtitan_cases(me):
    layouts = Layouts(me.world, me.rank)
    for case in BACKENDS:
        for name, options in OPTIONS.items():
            me.run(f"{case}-{name}", lambda: check(me, layouts, case, options))
    me.run("spmd_types-no-vocabulary-size", lambda: refused_without_vocabulary_size(layouts, me.world))


def refused_without_vocabulary_size(layouts, world):
    """global_vocab_size None: one line under tensor parallelism (as torchtitan's, which needs it too)."""
    logits, labels, tokens = data()
    pred, labels, _ = layouts.spmd_types(logits, labels)
    try:
        run_backend(layouts, "spmd_types", EncouragingLoss.Config(), pred, labels, tokens)
    except ValueError as err:
        assert world > 1 and "global_vocab_size" in str(err) and "\n" not in str(err), err
    else:
        assert world == 1, "no error"


if __name__ == "__main__":
    run_rank(Rank, torchtitan_cases)

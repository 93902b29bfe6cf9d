"""The encouraging loss as torchtitan's training loss (`Trainer.Config.loss`, a `BaseLoss`; tested with 0.3.0).

    from el_fairseq.torchtitan import EncouragingLoss
    config.loss = EncouragingLoss.Config(global_vocab_size=decoder_vocab_size(model_spec), log_end=0.75)
    config.loss = ChunkedLossWrapper.Config(loss_fn=EncouragingLoss.Config(...))   # chunked lm_head + loss

torchtitan's convention, as its `CrossEntropyLoss`: per micro-batch

    loss = sum_{t: label_t != -100} EL(z_t, label_t) / global_valid_tokens

with z the logits (B, L, V) upcast to float32 and global_valid_tokens the count of labels != -100 over the
whole optimizer step (all micro-batches, all data-parallel ranks), so the step's gradient does not depend on
how it is split; EL is `el_fairseq.encouraging_loss` (bonus_rho=0: torchtitan's cross-entropy). Under tensor
parallelism with loss parallel (the logits sharded on the vocabulary) every rank runs the vocabulary-parallel
loss (el_fairseq.parallel) on its shard, for each of torchtitan's SPMD backends: "spmd_types" (plain local
shards, torch.chunk-style; needs global_vocab_size, as torchtitan's), "partial_dtensor" (DTensor logits sharded
on the vocabulary) and "full_dtensor" (logits and labels DTensors). Importing el_fairseq does not import this
module nor torchtitan; the loss never imports it.
"""
from dataclasses import dataclass
from functools import partial
from typing import Literal

try:
    import torchtitan  # noqa: F401
except ModuleNotFoundError as err:
    if err.name != "torchtitan":
        raise
    raise ImportError("el_fairseq.torchtitan needs torchtitan (tested with 0.3.0): pip install torchtitan") from None
import spmd_types as spmd
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.experimental import local_map
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss
from torchtitan.config import CompileConfig
from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
from torchtitan.distributed.utils import get_spmd_backend

from .loss.api import check_options, encouraging_loss, make_spec
from .parallel import vocab_parallel_encouraging_loss

EL_OPTIONS = ("label_smoothing", "log_end", "bonus", "bonus_rho", "bonus_label_smoothing", "bonus_gamma",
              "bonus_start")


class EncouragingLoss(BaseLoss):
    """torchtitan loss: the encouraging loss summed over the labels != -100, divided by the step's
    global_valid_tokens (BaseLoss.__call__); metrics: none. Options: `el_fairseq.encouraging_loss`'s."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """Full vocabulary size, needed for the spmd_types backend's loss parallel (as CrossEntropyLoss's)."""
        label_smoothing: float = 0.0
        """eps in [0, 1]: torch's label smoothing of the cross-entropy term (eps / V on every class)."""
        log_end: float = 0.75
        """LE in (0, 1]: the log bonus continues along its tangent beyond p = LE (1: plain log bonus)."""
        bonus: Literal["log", "power", "cosine"] = "log"
        """log(1 - p), -p^gamma or cos(pi p) - 1."""
        bonus_rho: float = 1.0
        """rho >= 0, the bonus weight (0: torchtitan's cross-entropy)."""
        bonus_label_smoothing: float = 0.0
        """eps_b in [0, 1): the share of the bonus spread over all classes."""
        bonus_gamma: float = 1.0
        """gamma >= 1 of the power bonus."""
        bonus_start: float = 0.0
        """s in [0, 1): the bonus counts from p = s."""

        def __post_init__(self):  # a bad value fails when the config is made, not at the first step
            check_options(self.label_smoothing, "sum", "auto")
            make_spec(self.bonus, self.log_end, self.bonus_gamma, self.bonus_start, self.bonus_label_smoothing,
                      self.bonus_rho)

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        options = {name: getattr(config, name) for name in EL_OPTIONS}
        self.fn = partial(encouraging_loss_sum, global_vocab_size=config.global_vocab_size, **options)
        self._maybe_compile(compile_config)


def encouraging_loss_sum(pred, labels, *, global_vocab_size=None, **options):
    """sum_{t: labels_t != -100} EL(pred_t, labels_t) of logits pred (B, L, V) (float32 computation) and labels
    (B, L): torchtitan's `cross_entropy_loss` with the bonus, on each of its SPMD backends (module docstring).
    options: `encouraging_loss`'s EL options (EL_OPTIONS)."""
    if isinstance(pred, DTensor) and isinstance(labels, DTensor):
        return _full_dtensor_sum(pred, labels, options)
    if isinstance(pred, DTensor):  # partial_dtensor: encouraging_loss's DTensor hook runs the vocabulary-parallel loss
        loss = _summed(pred, labels, None, 0, options)
        return loss.to_local() if isinstance(loss, DTensor) else loss  # a plain tensor, as torchtitan's
    if get_spmd_backend() == "spmd_types":  # pred: plain local tensors, this rank's vocabulary shard under TP
        group = current_spmd_mesh().get_group("tp") if spmd_mesh_size("tp") > 1 else None
        start = 0 if group is None else _chunk_start(global_vocab_size, group)
        return _typed(pred, group, lambda: _summed(pred, labels, group, start, options))
    return _summed(pred, labels, None, 0, options)


def _typed(logits, group, loss_of):
    """loss_of() under the spmd_types backend; with its type checking (debug.spmd_typechecking) computed unchecked
    and typed as torchtitan types its loss-parallel cross-entropy: the logits' local types, invariant (I) on the
    TP group (when the vocabulary is split)."""
    if not spmd.is_type_checking():
        return loss_of()
    with spmd.no_typecheck():
        loss = loss_of()
    types = dict(spmd.get_local_type(logits))
    if group is not None:
        types[group] = spmd.I
    spmd.assert_type(loss, types)
    return loss


def _summed(logits, labels, group, vocab_start, options):
    """The summed loss of logits (..., V) in float32: the whole vocabulary (group None), or this rank's shard of
    the classes [vocab_start, vocab_start + V_r) of `group`'s vocabulary."""
    z, y = logits.flatten(0, -2).float(), labels.flatten()
    if group is None:
        return encouraging_loss(z, y, ignore_index=IGNORE_INDEX, reduction="sum", **options)
    return vocab_parallel_encouraging_loss(z, y, group=group, vocab_start=vocab_start, ignore_index=IGNORE_INDEX,
                                           reduction="sum", **options)


def _chunk_start(global_vocab_size, group):
    """This rank's first class under the spmd_types backend: the vocabulary split torch.chunk-style,
    ceil(V / world) classes per rank (as torchtitan's loss-parallel cross-entropy)."""
    if global_vocab_size is None:
        raise ValueError("global_vocab_size is None: tensor-parallel loss under spmd_backend 'spmd_types' needs "
                         "EncouragingLoss.Config(global_vocab_size=decoder_vocab_size(model_spec))")
    chunk = -(-global_vocab_size // dist.get_world_size(group))
    return min(global_vocab_size, chunk * dist.get_rank(group))


def _full_dtensor_sum(pred, labels, options):
    """Logits and labels DTensors (full_dtensor): each rank's loss of its local tokens under local_map, summed
    over the mesh dimensions that shard the tokens (Partial) and the same on those that shard the vocabulary
    (the vocabulary-parallel loss on that dimension's group) or replicate (Replicate)."""
    mesh, vocab_dim = pred.device_mesh, pred.ndim - 1
    sharded = [isinstance(p, Shard) and p.dim % pred.ndim == vocab_dim for p in pred.placements]
    group = mesh.get_group(sharded.index(True)) if any(sharded) else None
    vocab_start = compute_local_shape_and_global_offset(pred.shape, mesh, pred.placements)[1][vocab_dim]
    out = [Partial() if isinstance(p, Shard) and not s else Replicate() for p, s in zip(pred.placements, sharded)]

    @local_map(out_placements=out, in_placements=(pred.placements, labels.placements),
               in_grad_placements=(pred.placements, labels.placements), device_mesh=mesh)
    def local_sum(pred_local, labels_local):
        return _summed(pred_local, labels_local, group, vocab_start, options)

    return local_sum(pred, labels)

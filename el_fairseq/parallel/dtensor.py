"""DTensor logits sharded on the class dimension (a tensor-parallel head: `ColwiseParallel(output_layouts=Shard(-1))`)
run the vocabulary-parallel loss on the mesh's process group: `encouraging_loss` / `EncouragingLoss` call
`class_sharded_loss` (api.py's hook, impl="auto") and get its result, or None where it does not apply.

Each rank's shard is `logits.to_local()`, its first class the shard's offset (DTensor's Shard splits like
torch.chunk: ceil(C / world) classes per rank, the last ones smaller or empty). As torch's `loss_parallel()`
cross-entropy, the loss comes back as a Replicate DTensor, and the logits' gradient as a DTensor of their
placement (Shard on the classes): the shard's gradient, computed without communication.
"""
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .vocab_parallel import sharded_loss


def class_dim_shard(logits) -> bool:
    """Whether `logits` (N, C, d1, ...) is a DTensor on a 1-D mesh sharded (torch.chunk-style) on the class
    dimension 1 (Shard(1), or Shard(-1) for (N, C))."""
    if not isinstance(logits, DTensor) or logits.dim() < 2 or logits.device_mesh.ndim != 1:
        return False
    placement = logits.placements[0]
    return type(placement) is Shard and placement.dim % logits.dim() == 1


def class_sharded_loss(logits, target, weight, ignore_index, reduction, label_smoothing, spec):
    """`encouraging_loss` of DTensor logits sharded on the classes, as a Replicate DTensor (reduction "none":
    shaped like target), computed by the vocabulary-parallel loss; None where the logits are not sharded so,
    or the target holds class probabilities (the plain-torch path, which gathers the logits, takes them)."""
    if not class_dim_shard(logits) or tuple(target.shape) == tuple(logits.shape):
        return None
    mesh = logits.device_mesh
    _, offset = compute_local_shape_and_global_offset(logits.shape, mesh, logits.placements)
    local = logits.to_local()  # differentiable: the gradient returns to `logits` as a Shard DTensor
    loss = sharded_loss(local.movedim(1, -1), _replicated(target), mesh.get_group(0), offset[1], _replicated(weight),
                        ignore_index, reduction, label_smoothing, spec)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def _replicated(tensor):
    """The full value of a target or weight: a plain tensor as it is, a DTensor gathered (a Replicate one
    without communication)."""
    if not isinstance(tensor, DTensor):
        return tensor
    if all(p.is_replicate() for p in tensor.placements):
        return tensor.to_local()
    return tensor.full_tensor()


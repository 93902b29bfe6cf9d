"""DTensor logits sharded on the class dimension (a tensor-parallel head: `ColwiseParallel(output_layouts=Shard(-1))`)
run the vocabulary-parallel loss on the mesh's process group: `encouraging_loss` / `EncouragingLoss` call
`class_sharded_loss` (api.py's hook, impl="auto") and get its result, or None where it does not apply. A DTensor
projection weight sharded on the classes (Shard(0): ColwiseParallel's weight, a vocabulary-parallel embedding)
runs the vocabulary-parallel linear loss: `encouraging_linear_loss` / `EncouragingLinearLoss` call
`class_sharded_linear_loss` (linear.py's hook, impl="auto").

Each rank's shard is `logits.to_local()`, its first class the shard's offset (DTensor's Shard splits like
torch.chunk: ceil(C / world) classes per rank, the last ones smaller or empty). As torch's `loss_parallel()`
cross-entropy, the loss comes back as a Replicate DTensor, and the logits' gradient as a DTensor of their
placement (Shard on the classes): the shard's gradient, computed without communication. For the projection,
the weight's (and bias's) gradient is a Shard(0) DTensor, the input's the all-reduced one-process gradient, a
Replicate DTensor (or a plain tensor for a plain input).
"""
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .vocab_parallel import sharded_loss
from .vocab_parallel_linear import sharded_linear_loss


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


def class_sharded_linear_loss(input, weight, bias, target, class_weight, ignore_index, reduction, label_smoothing,
                              spec, chunk_size):
    """`encouraging_linear_loss` of a DTensor weight (V, D) sharded torch.chunk-style on its rows, the classes
    (Shard(0), a 1-D mesh), a bias sharded alike or None, and an input the same on every rank (a Replicate
    DTensor of that mesh; a plain input is refused, see below), as a Replicate DTensor (reduction "none": shaped like target),
    computed by the vocabulary-parallel linear loss on the mesh's group, the shard's first class its offset;
    None where the tensors are not laid out so, or the target holds class probabilities (plain torch takes them)."""
    if not _rows_sharded(weight, 2) or tuple(target.shape) != tuple(input.shape[:-1]):
        return None
    mesh = weight.device_mesh
    if not isinstance(input, DTensor):
        # A row-sharded weight beside a plain input is ambiguous: a vocabulary shard with the input the same on
        # every rank, or an FSDP2 parameter shard (fully_shard's parameters are Shard(0) DTensors too) with each
        # rank's own batch, where the vocabulary-parallel loss would be silently wrong.
        raise ValueError(f"linear_weight is a DTensor sharded on its rows {tuple(weight.placements)} and input a "
                         f"plain tensor: pass the input as a Replicate DTensor on the weight's mesh for the "
                         f"vocabulary-parallel loss, or, for an FSDP2 shard, compute the loss where FSDP2 unshards "
                         f"the weight (inside the head's forward, as el_fairseq.hf.fuse_encouraging_loss does)")
    if (bias is not None and not (_rows_sharded(bias, 1) and bias.device_mesh == mesh)) or not _same_everywhere(
            input, mesh):
        return None
    _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    local_input = input.to_local()  # the gradient returns as a Replicate
    loss = sharded_linear_loss(local_input, weight.to_local(), None if bias is None else bias.to_local(),
                               _replicated(target), mesh.get_group(0), offset[0], _replicated(class_weight),
                               ignore_index, reduction, label_smoothing, spec, chunk_size)
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)


def tensor_parallel_input(linear, input):
    """`input` as the Replicate DTensor that a tensor-parallel `linear` (parallelize_module with
    ColwiseParallel: its weight a Shard(0) DTensor) would make of it in its own forward, which
    EncouragingLinearLoss does not call (it reads the weight); refused in one line for an FSDP2-sharded
    `linear`, whose weight shard is not a vocabulary shard."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(input, DTensor):  # laid out by the caller already
        return input
    if isinstance(linear, FSDPModule):
        raise ValueError(f"EncouragingLinearLoss's projection {type(linear).__name__} is sharded by FSDP2 "
                         f"(fully_shard) and the loss reads its weight outside its forward: shard the "
                         f"EncouragingLinearLoss module itself (fully_shard(head)), not head.linear alone")
    if not _rows_sharded(linear.weight, 2):
        return input
    return DTensor.from_local(input, linear.weight.device_mesh, [Replicate()], run_check=False)


def _rows_sharded(tensor, dims):
    """A DTensor of `dims` dimensions on a 1-D mesh, Shard on its first dimension."""
    if not isinstance(tensor, DTensor) or tensor.dim() != dims or tensor.device_mesh.ndim != 1:
        return False
    placement = tensor.placements[0]
    return type(placement) is Shard and placement.dim % dims == 0


def _same_everywhere(tensor, mesh):
    """A DTensor replicated on `mesh`."""
    return tensor.device_mesh == mesh and all(p.is_replicate() for p in tensor.placements)


def _replicated(tensor):
    """The full value of a target or weight: a plain tensor as it is, a DTensor gathered (a Replicate one
    without communication)."""
    if not isinstance(tensor, DTensor):
        return tensor
    if all(p.is_replicate() for p in tensor.placements):
        return tensor.to_local()
    return tensor.full_tensor()


"""Make fairseq 0.12 usable with recent torch. Nothing happens on import: apply() patches fairseq
when the plugin is loaded (fairseq's --user-dir, or `import el_fairseq.criterions`), never on
`import el_fairseq` (the public PyTorch loss).

1. torch >= 2.6 loads with weights_only=True, and fairseq checkpoints (which pickle an
   argparse.Namespace, numpy arrays) then fail: "Unsupported global: argparse.Namespace".
   fairseq.checkpoint_utils and fairseq.distributed.utils (rank 0 sends a loaded checkpoint to
   the other ranks) get a `torch` whose load() is el_fairseq.safe_loading's: weights_only=True with
   the globals fairseq checkpoints contain allowed for that load only; a file needing anything
   else is refused (one line) unless named in EL_FAIRSEQ_TRUST_CHECKPOINT.
2. ve-fairseq 0.12.3's data_utils.batch_by_size drops the last batch when its size is not a
   multiple of --required-batch-size-multiple (default 8): 100 test sentences gave 96 batched
   ones, so fairseq-generate scored only part of a test set. We call the same cython batching
   and keep every batch.
3. An out-of-range criterion option raises EncouragingLossOptionError, a refused checkpoint
   UntrustedCheckpointError; fairseq's command-line tools would print them under a traceback
   wall. A chained sys.excepthook prints such an error alone, as one line, and exits with status
   2 like argparse does.
4. fairseq's distributed training assumes one worker per CUDA device: on a single node it asserts
   `--distributed-world-size <= torch.cuda.device_count()` and spawns min(device count, world size)
   workers, its default backend is nccl, and its DistributedDataParallel wrapper passes
   device_ids=[rank], which torch refuses for a CPU module. With --cpu we give it what it gives
   GPUs: one spawned worker per --distributed-world-size on this node (gloo instead of nccl, a
   free local port), and torch's DDP without device ids. fairseq's default world size is the CUDA
   device count, so --cpu on a machine with GPUs would spawn one CPU worker per GPU: with --cpu it
   is one worker unless the command line sets --distributed-world-size. torchrun and SLURM
   launches with --cpu keep fairseq's own set-up and get gloo. Nothing changes without --cpu.
"""
import os
import socket
import sys

import torch

from . import safe_loading
from .loss.bonus import EncouragingLossOptionError


class _TorchWithLoad:
    """Stands in for the `torch` module inside one fairseq module: torch, with its own load()."""

    def __init__(self, load):
        self.load = load
        self._el_fairseq = True

    def __getattr__(self, name):
        return getattr(torch, name)


def patch_fairseq_checkpoint_loading():
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils

    for module, load in ((checkpoint_utils, safe_loading.load), (distributed_utils, safe_loading.load_broadcast_state)):
        if not getattr(module.torch, "_el_fairseq", False):
            module.torch = _TorchWithLoad(load)


def _keeping_the_last_batch(batch_by_size):
    """fairseq's batch_by_size without the line that drops the last batch: the same cython batching
    (batch_by_size_vec / batch_by_size_fn), every batch returned. `num_tokens_vec` is aligned with
    `indices` by position, as fairseq passes it (FairseqDataset.num_tokens_vec(indices)); fixed
    shapes go to fairseq's own code unchanged."""
    import numpy as np

    def patched(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                required_batch_size_multiple=1, fixed_shapes=None):
        if fixed_shapes is not None:
            return batch_by_size(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                                 required_batch_size_multiple, fixed_shapes)
        from fairseq.data.data_utils_fast import batch_by_size_fn, batch_by_size_vec

        max_tokens = int(max_tokens) if max_tokens is not None else -1
        max_sentences = max_sentences if max_sentences is not None else -1
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        if num_tokens_vec is None:
            return batch_by_size_fn(indices, num_tokens_fn, max_tokens, max_sentences, required_batch_size_multiple)
        if not isinstance(num_tokens_vec, np.ndarray):
            num_tokens_vec = np.fromiter(num_tokens_vec, dtype=np.int64, count=-1)
        return batch_by_size_vec(indices, num_tokens_vec, max_tokens, max_sentences, required_batch_size_multiple)

    patched._el_fairseq = True
    return patched


def patch_fairseq_batching():
    from fairseq.data import data_utils

    if not getattr(data_utils.batch_by_size, "_el_fairseq", False):
        data_utils.batch_by_size = _keeping_the_last_batch(data_utils.batch_by_size)


def _free_local_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched_from_outside(dt):
    """torchrun/torch.distributed.launch (its environment), SLURM (a --distributed-port), or an explicit
    --distributed-init-method: fairseq sets these up itself."""
    env_launch = all(k in os.environ for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"))
    return dt.distributed_init_method is not None or env_launch or dt.distributed_port > 0


WORLD_SIZE_FLAGS = ("--distributed-world-size", "distributed_training.distributed_world_size")


def cpu_world_size(world_size, argv=None):
    """The number of --cpu workers on this node: fairseq's default --distributed-world-size is the CUDA
    device count, a GPU default that would spawn one CPU worker per GPU; so 1 unless `argv` (the command
    line, or hydra's overrides) sets the world size."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a.lstrip("+").split("=", 1)[0] in WORLD_SIZE_FLAGS for a in argv):
        return world_size
    return 1 if world_size == max(1, torch.cuda.device_count()) else world_size


def _cpu_workers(call_main, distributed_main, worker):
    """fairseq's call_main, with --cpu: gloo, and on one node one spawned worker per world-size slot,
    each running worker(i, distributed_main, main, cfg, kwargs) (el_fairseq.criterions.spawned_worker)."""
    import torch.multiprocessing as mp

    def patched(cfg, main, **kwargs):
        dt = cfg.distributed_training
        if not cfg.common.cpu:
            return call_main(cfg, main, **kwargs)
        if _launched_from_outside(dt):  # the launcher set the world size
            if dt.distributed_backend == "nccl":  # fairseq's default; nccl has no CPU tensors
                dt.distributed_backend = "gloo"
            return call_main(cfg, main, **kwargs)
        dt.distributed_world_size = cpu_world_size(dt.distributed_world_size)
        if dt.distributed_world_size <= 1:
            return call_main(cfg, main, **kwargs)
        if dt.distributed_backend == "nccl":
            dt.distributed_backend = "gloo"
        if dt.distributed_no_spawn:
            return call_main(cfg, main, **kwargs)
        dt.distributed_init_method = f"tcp://127.0.0.1:{_free_local_port()}"
        kwargs["start_rank"] = dt.distributed_rank
        dt.distributed_rank = None  # assigned per worker by distributed_main, as fairseq does for GPUs
        mp.spawn(fn=worker, args=(distributed_main, main, cfg, kwargs), nprocs=dt.distributed_world_size, join=True)

    patched._el_fairseq = True
    return patched


def _cpu_aware_ddp(ddp_class):
    """torch's DistributedDataParallel, without device ids for a module on the CPU (torch refuses them)."""

    class DistributedDataParallel(ddp_class):
        def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
            if all(p.device.type == "cpu" for p in module.parameters()):
                device_ids = output_device = None
            super().__init__(module, device_ids, output_device, *args, **kwargs)

    DistributedDataParallel._el_fairseq = True
    return DistributedDataParallel


def patch_fairseq_distributed_cpu(spawn_worker):
    from fairseq.distributed import utils as distributed_utils
    from fairseq.models import distributed_fairseq_model

    if spawn_worker is not None and not getattr(distributed_utils.call_main, "_el_fairseq", False):
        distributed_utils.call_main = _cpu_workers(distributed_utils.call_main, distributed_utils.distributed_main,
                                                   spawn_worker)
    ddp = distributed_fairseq_model.DistributedDataParallel
    if not getattr(ddp, "_el_fairseq", False):
        distributed_fairseq_model.DistributedDataParallel = _cpu_aware_ddp(ddp)


def _one_line_option_errors(previous_hook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (EncouragingLossOptionError, safe_loading.UntrustedCheckpointError)):
            prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "fairseq"
            sys.stderr.write(f"{prog}: error: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(2)
        previous_hook(exc_type, exc, tb)

    hook._el_fairseq = True
    return hook


def install_excepthook():
    if not getattr(sys.excepthook, "_el_fairseq", False):
        sys.excepthook = _one_line_option_errors(sys.excepthook)


def apply(spawn_worker=None):
    """Patch fairseq (1-4 above); idempotent. Called when the plugin is loaded, never on `import el_fairseq`.
    spawn_worker: what each spawned --cpu worker runs (el_fairseq.criterions.spawned_worker.run, given
    by the plugin); without it, 4 is left out (el_fairseq.pipeline.analysis only loads checkpoints)."""
    patch_fairseq_checkpoint_loading()
    patch_fairseq_batching()
    patch_fairseq_distributed_cpu(spawn_worker)
    install_excepthook()

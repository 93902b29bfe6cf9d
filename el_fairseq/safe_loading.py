"""Loading fairseq checkpoints without running code from them.

torch >= 2.6 loads with weights_only=True, which refuses fairseq checkpoints; the usual way out,
weights_only=False, lets a crafted .pt run any code on load. Here a checkpoint loads with
weights_only=True and, for the time of that load only (torch.serialization.safe_globals), the
globals that fairseq 0.12 checkpoints contain and nothing else:

    CHECKPOINT_GLOBALS   argparse.Namespace (the legacy args; cfg.model of an --arch model) and,
                         with --eval-bleu, numpy arrays (the BLEU counts in the metrics: int64, and
                         float64 once summed over workers): numpy's _reconstruct, ndarray, dtype and
                         its int64 and float64 dtype classes.
    STATE_GLOBALS        the above and what a loaded checkpoint holds once fairseq has read it:
                         omegaconf's DictConfig/ListConfig, their metadata and AnyNode leaves,
                         typing.Any, dict/int/list/defaultdict, fairseq's tensor placeholder. In
                         multi-worker training rank 0 loads the file and sends this state to the
                         other ranks through torch.save/torch.load (distributed.utils.broadcast_object).

Found with torch.serialization.get_unsafe_globals_in_checkpoint on real checkpoints of the recipes
(tests/test_safe_loading.py trains them): best/last, epoch and --save-interval-updates checkpoints,
--eval-bleu, resumed, 2-worker, averaged (el_fairseq.pipeline.checkpoints), fairseq-hydra-train,
--memory-efficient-fp16 and --amp runs.

A file that needs any other global is refused with UntrustedCheckpointError, one line naming the
globals. To load such a file you trust (say a checkpoint of another fairseq version), name it in
EL_FAIRSEQ_TRUST_CHECKPOINT (paths separated by os.pathsep): it then loads with weights_only=False.
"""
import os
import pickle
import re

import torch

TRUST_ENV = "EL_FAIRSEQ_TRUST_CHECKPOINT"


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs a global outside the allow-list; nothing of it was run."""


def checkpoint_globals():
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    # A file keeps the module path of the numpy that wrote it: numpy 2 writes numpy._core, numpy 1 numpy.core.
    return [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.int64)), type(np.dtype(np.float64)),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), (_reconstruct, "numpy.core.multiarray._reconstruct")]


def state_globals():
    import collections
    import typing

    from fairseq.distributed.utils import _TensorPlaceholder
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode

    return checkpoint_globals() + [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any,
                                   dict, int, list, collections.defaultdict, _TensorPlaceholder]


def trusted_paths():
    return {os.path.realpath(p) for p in os.environ.get(TRUST_ENV, "").split(os.pathsep) if p}


def _path_of(f):
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else None


def _refused_globals(f, allowed, err):
    """The globals of `f` outside `allowed`, as module.name strings (from the file, else from torch's error)."""
    names = []
    try:
        if hasattr(f, "seek"):
            f.seek(0)
        with torch.serialization.safe_globals(allowed):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception:  # not a zip checkpoint (legacy format) or unreadable: torch's message names one
        pass
    if names:
        return sorted(names)
    return [a or b for a, b in re.findall(r"GLOBAL (\S+) was not an allowed global|but got <class '([^']+)'>", str(err))]


def restricted_load(f, allowed, what, hint, map_location=None, **kwargs):
    """torch.load(weights_only=True) with `allowed` as safe globals during this load only."""
    kwargs["weights_only"] = True
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(f, map_location=map_location, **kwargs)
    except pickle.UnpicklingError as err:
        names = _refused_globals(f, allowed, err)
        if not names:
            raise
        raise UntrustedCheckpointError(
            f"{what}: not loaded: it needs {', '.join(names)}, which fairseq checkpoints do not contain "
            f"(loading it could run code); {hint}") from None


def load(f, map_location=None, **kwargs):
    """torch.load for a fairseq checkpoint file: weights_only with CHECKPOINT_GLOBALS, or weights_only=False
    for a file named in EL_FAIRSEQ_TRUST_CHECKPOINT."""
    path = _path_of(f)
    if path is not None and os.path.realpath(path) in trusted_paths():
        kwargs["weights_only"] = False
        return torch.load(f, map_location=map_location, **kwargs)
    what = path or "checkpoint"
    hint = (f"if you trust this file, load it with {TRUST_ENV}={path}" if path else
            f"if you trust it, save it to a file and name that file in {TRUST_ENV}")
    return restricted_load(f, checkpoint_globals(), what, hint, map_location, **kwargs)


def load_broadcast_state(f, map_location=None, **kwargs):
    """torch.load for the checkpoint state rank 0 sends to the other ranks (STATE_GLOBALS)."""
    hint = (f"pass --load-checkpoint-on-all-dp-ranks so that every rank reads the file itself "
            f"(and {TRUST_ENV} applies)")
    return restricted_load(f, state_globals(), "the checkpoint state broadcast from rank 0", hint, map_location,
                           **kwargs)

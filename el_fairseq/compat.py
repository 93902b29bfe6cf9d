"""Make fairseq 0.12 usable with recent torch; applied when the plugin is imported.

1. torch >= 2.6 loads with weights_only=True, and fairseq checkpoints (which pickle an
   argparse.Namespace / omegaconf config) then fail: "Unsupported global: argparse.Namespace".
   We give fairseq.checkpoint_utils, and only it, a `torch` whose load() defaults to
   weights_only=False. That covers fairseq-generate, resuming training and model loading; these
   files are the user's own checkpoints, the trust model fairseq was written for.
2. ve-fairseq 0.12.3's compiled batch_by_size drops the last remainder batch when
   --required-batch-size-multiple > 1 (the default is 8): 100 test sentences gave 96 batched
   ones, so fairseq-generate scored only part of a test set. The dropped indices are appended
   again as final batches (bounded by --max-tokens / --batch-size).
3. An out-of-range criterion option raises EncouragingLossOptionError; fairseq's command-line
   tools would print it under a traceback wall. A chained sys.excepthook prints that error
   alone, as one line, and exits with status 2 like argparse does.
"""
import sys

import torch

from .loss.bonus import EncouragingLossOptionError


class _TorchWithTrustedLoad:
    """Stands in for the `torch` module inside fairseq.checkpoint_utils only."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return torch.load(*args, **kwargs)


def trusted_torch_load(path, map_location="cpu"):
    """torch.load for fairseq checkpoints (see 1. above)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def patch_fairseq_checkpoint_loading():
    try:
        from fairseq import checkpoint_utils
    except ImportError:  # the loss package is usable without fairseq
        return
    if not isinstance(checkpoint_utils.torch, _TorchWithTrustedLoad):
        checkpoint_utils.torch = _TorchWithTrustedLoad()


def _with_remainder(batch_by_size):
    import numpy as np

    def patched(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                required_batch_size_multiple=1, fixed_shapes=None):
        batches = batch_by_size(indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
                                required_batch_size_multiple, fixed_shapes)
        indices = np.asarray(indices, dtype=np.int64)
        if fixed_shapes is not None or sum(len(b) for b in batches) >= len(indices):
            return batches
        seen = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
        batches = list(batches)
        current, longest = [], 0
        for idx in indices[~np.isin(indices, seen)]:
            size = int(num_tokens_vec[idx]) if num_tokens_vec is not None else int(num_tokens_fn(idx))
            grown = max(longest, size) * (len(current) + 1)
            if current and ((max_tokens and grown > max_tokens) or (max_sentences and len(current) >= max_sentences)):
                batches.append(np.array(current, dtype=np.int64))
                current, longest = [], 0
            current.append(int(idx))
            longest = max(longest, size)
        if current:
            batches.append(np.array(current, dtype=np.int64))
        return batches

    patched._el_fairseq = True
    return patched


def patch_fairseq_batching():
    try:
        from fairseq.data import data_utils
    except ImportError:
        return
    if not getattr(data_utils.batch_by_size, "_el_fairseq", False):
        data_utils.batch_by_size = _with_remainder(data_utils.batch_by_size)


def _one_line_option_errors(previous_hook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, EncouragingLossOptionError):
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


patch_fairseq_checkpoint_loading()
patch_fairseq_batching()
install_excepthook()

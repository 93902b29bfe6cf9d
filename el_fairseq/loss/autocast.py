"""torch.autocast as torch applies it to its cross-entropy: the "fp32" cast policy.

Inside `torch.autocast(device_type, dtype)` torch casts the 16-bit floating inputs of cross_entropy
(and nll_loss, log_softmax) to float32 and returns a float32 loss; the gradients flow back through that
cast, so each input's gradient has the input's own dtype. The public losses do the same: `active`
tells whether autocast is on for a tensor's device, `float32` makes the cast, and `suspended` turns
autocast off for what runs inside the loss, so that no op there (the linear loss's chunk matmuls
above all, which autocast would run in bfloat16 and hand to a float32 kernel) changes dtype behind
the kernels' backs. float64 is left alone, as autocast leaves it.
"""
import contextlib

import torch

HALF = (torch.float16, torch.bfloat16)


def active(tensor) -> bool:
    """Whether torch.autocast is enabled for `tensor`'s device type."""
    device_type = tensor.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def float32(*tensors):
    """Each tensor with a 16-bit floating dtype cast to float32 (differentiably); others (None, integer,
    float32, float64) as they are."""
    return tuple(t.float() if torch.is_tensor(t) and t.dtype in HALF else t for t in tensors)


def suspended(tensor):
    """A context without autocast on `tensor`'s device type (a no-op context where autocast is off)."""
    if not active(tensor):
        return contextlib.nullcontext()
    return torch.autocast(tensor.device.type, enabled=False)

"""The autograd Function shared by the fused paths (chunked, native, triton).

Each path's `forward(logits, target, epsilon, spec, ignore_index)` returns per-token loss, nll,
stats and the gradient of the summed loss w.r.t. the logits, computed with the loss. Backward only
scales that gradient, in place: it is the only (N, V) tensor kept (no second copy), which makes
the Function once-differentiable: double backward (create_graph=True) and a second backward through
the same graph (retain_graph=True, gradcheck) raise one line naming impl='reference' (plain torch,
autograd) instead of returning a wrong gradient.
"""
import torch


def refuse_double_backward(what):
    """Call first in a fused backward: its gradient is not a function of the inputs that autograd can
    differentiate again, so create_graph=True (autograd runs backward in grad mode only then) raises."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"el_fairseq: {what} are once differentiable; double backward (create_graph=True) "
                           f"needs impl='reference'")


class FusedEncouragingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, epsilon, spec, ignore_index, kernel):
        loss, nll, stats, grad = kernel(logits, target, epsilon, spec, ignore_index)
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(nll, stats)
        return loss, nll, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_nll, grad_stats):
        refuse_double_backward("the fused loss paths (chunked, native, triton)")
        if getattr(ctx, "used", False):  # the kept gradient has been scaled in place already
            raise RuntimeError("el_fairseq: the fused loss paths (chunked, native, triton) backpropagate once; a "
                               "second backward through the same graph (retain_graph, gradcheck) needs impl='reference'")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # A reduced loss gives a stride-0 grad_loss, so one multiply by a scalar suffices.
        if grad_loss.numel() > 0 and grad_loss.stride(0) == 0:
            grad.mul_(grad_loss[0].to(grad.dtype))
        else:
            grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        # fp16 logits keep a float32 gradient (chunked.gradient_dtype): scaled above in float32,
        # rounded to fp16 once here.
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def fused_encouraging_loss(kernel, logits, target, epsilon, spec, ignore_index=None):
    """Per-token (loss, nll, stats[z_y, margin]) from logits (N, V) with `kernel`'s fused gradient."""
    return FusedEncouragingLoss.apply(logits, target, epsilon, spec, ignore_index, kernel)

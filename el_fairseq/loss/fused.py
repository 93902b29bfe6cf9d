"""The autograd rule shared by the fused kernel operators (ops.py: native_loss, chunked_loss, triton_loss).

Each kernel returns per-token loss, nll, stats and the gradient of the summed loss w.r.t. the logits,
computed with the loss. Backward only scales that gradient by the incoming one, in place on a plain
tensor: it is the only (N, V) tensor kept (no second copy), which makes the operators once-differentiable:
double backward (create_graph=True) and a second backward through the same graph (retain_graph=True,
gradcheck) raise one line naming impl='reference' (plain torch, autograd) instead of returning a wrong
gradient. Where the gradient is not a plain tensor (a FakeTensor or functional tensor while
torch.compile traces the backward, a torch.func wrapper under vmap) it is scaled out of place: a traced
graph has no in-place buffer to reuse, and the compiled backward allocates what it needs.
"""
import torch

from . import kernel_inputs

# The operators' inputs after the logits (target, epsilon, ignore_index, need_grad and the six bonus
# primitives): none of them has a gradient.
_OTHER_INPUTS = 10


def refuse_double_backward(what):
    """Call first in a fused backward: its gradient is not a function of the inputs that autograd can
    differentiate again, so create_graph=True (autograd runs backward in grad mode only then) raises."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"el_fairseq: {what} are once differentiable; double backward (create_graph=True) "
                           f"needs impl='reference'")


def setup_context(ctx, inputs, output):
    """Keep the kernel's gradient (detached: an output kept on ctx would otherwise hold its own graph node
    alive, a reference cycle) and the logits' dtype; nll, stats and the gradient output are not
    differentiable."""
    ctx.grad = output[3].detach()
    ctx.logits_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(*output[1:])
    # No zeros for the outputs that get no gradient (nll, stats and the (N, V) gradient output): autograd
    # would otherwise fill an (N, V) tensor with zeros at every backward, only for backward to ignore it.
    ctx.set_materialize_grads(False)


def backward(ctx, grad_loss, grad_nll, grad_stats, grad_grad):
    grad = ctx.grad
    in_place = kernel_inputs.plain_dense(grad)
    if in_place:  # eager: autograd runs backward in grad mode only for create_graph=True
        refuse_double_backward("the fused loss paths (chunked, native, triton)")
    if grad is None:  # the kept gradient has been scaled in place already
        raise RuntimeError("el_fairseq: the fused loss paths (chunked, native, triton) backpropagate once; a "
                           "second backward through the same graph (retain_graph, gradcheck) needs impl='reference'")
    if in_place:
        ctx.grad = None
        # A reduced loss gives a stride-0 grad_loss, so one multiply by a scalar suffices.
        if grad_loss.numel() > 0 and grad_loss.stride(0) == 0:
            grad.mul_(grad_loss[0].to(grad.dtype))
        else:
            grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
    else:
        grad = grad * grad_loss.unsqueeze(-1).to(grad.dtype)
    # fp16 logits keep a float32 gradient (chunked.gradient_dtype): scaled above in float32, rounded to
    # fp16 once here.
    return (grad.to(ctx.logits_dtype),) + (None,) * _OTHER_INPUTS

"""Fused encouraging loss over row chunks of the logits (plain torch ops; CPU and CUDA).

One pass over the logits computes the per-token loss and the gradient, which is kept instead of
the log-probabilities. With p = softmax(z), a the smoothed CE target (1 - eps at y, eps/(V-1)
elsewhere) and c_j = rho * w_j * b'(p_j), w_j = eps_b / V + (1 - eps_b) [j = y]:

    dL/dz_k = p_k - a_k + p_k * (c_k - sum_j c_j p_j)

Memory: the only (N, V) tensor that outlives the call is that gradient, in the logits' dtype.
fairseq's LS-CE keeps its float32 log-softmax output (N x V x 4 bytes) for backward and builds
two more (N, V) tensors there (the gradient w.r.t. lprobs and w.r.t. the logits); here the
temporaries are bounded by one chunk of rows (CHUNK_ELEMENTS floats each).
Computation is in float32 whatever the logits' dtype, so fp16/bf16 logits stay finite.
"""
import torch

from .bonus import BonusSpec, bonus_grad, bonus_value

# ~2^18 float32 = 1 MiB per temporary: a handful of them stay within a core's L2 cache.
CHUNK_ELEMENTS = 1 << 18


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_forward(z, y, epsilon, spec: BonusSpec):
    """Loss, nll, stats and gradient for one chunk of non-padding rows. z: (n, V) float32."""
    n, vocab = z.shape
    idx = y.unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    lp = z - lse
    p = lp.exp()
    lp_y = lp.gather(-1, idx).squeeze(-1)
    nll = -lp_y
    eps_i = epsilon / (vocab - 1)
    loss = (1.0 - epsilon - eps_i) * nll - eps_i * lp.sum(-1)

    # Gradient of the CE part: p - a.  Built in place in the buffer `p` is about to leave.
    grad = p.clone() if spec.active else p
    if spec.active:
        one_minus_p = torch.expm1(lp).neg_()
        p_y = lp_y.exp()
        omp_y = one_minus_p.gather(-1, idx).squeeze(-1)
        b_y = bonus_value(p_y, omp_y, spec)
        db_y = bonus_grad(p_y, omp_y, spec)
        w_y = spec.rho * (1.0 - spec.epsilon)
        w_all = spec.rho * spec.epsilon / vocab
        if spec.epsilon > 0.0:
            b_sum = bonus_value(p, one_minus_p, spec).sum(-1)
            loss = loss + w_y * b_y + w_all * b_sum
            c = bonus_grad(p, one_minus_p, spec).mul_(w_all)
        else:
            loss = loss + w_y * b_y
            c = torch.zeros_like(p)
        c.scatter_add_(-1, idx, (w_y * db_y).unsqueeze(-1))
        s = (c * p).sum(-1, keepdim=True)
        grad.add_(c.sub_(s).mul_(p))
    grad.sub_(eps_i)
    grad.scatter_add_(-1, idx, torch.full_like(lp_y, -(1.0 - epsilon - eps_i)).unsqueeze(-1))

    # Diagnostics (issue 6) from this chunk: z_y and the margin z_y - max_{j != y} z_j.
    z_y = z.gather(-1, idx).squeeze(-1)
    top2 = z.topk(2, dim=-1).values if vocab > 1 else torch.cat([z, z], -1)
    top_is_y = top2[:, 0] <= z_y  # ties count as "not well separated": margin 0
    other = torch.where(top_is_y, top2[:, 1], top2[:, 0])
    stats = torch.stack([z_y, z_y - other], dim=-1)
    return loss, nll, stats, grad


class ChunkedEncouragingLoss(torch.autograd.Function):
    """Per-token (loss, nll, stats) from logits (N, V); the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, logits, target, epsilon, spec, ignore_index):
        n_rows, vocab = logits.shape
        loss = logits.new_zeros(n_rows, dtype=torch.float32)
        nll = torch.zeros_like(loss)
        stats = logits.new_zeros(n_rows, 2, dtype=torch.float32)
        # Written row by row below; padding rows stay zero.
        grad = torch.zeros_like(logits) if ignore_index is not None else torch.empty_like(logits)
        keep = target.ne(ignore_index) if ignore_index is not None else None
        step = chunk_rows(vocab)
        for start in range(0, n_rows, step):
            rows = slice(start, min(start + step, n_rows))
            z, y = logits[rows], target[rows]
            if keep is not None:
                k = keep[rows]
                if not bool(k.any()):
                    continue
                if not bool(k.all()):
                    sel = k.nonzero().squeeze(-1)
                    out = _chunk_forward(z[sel].float(), y[sel], epsilon, spec)
                    for dst, src in zip((loss[rows], nll[rows], stats[rows], grad[rows]), out):
                        dst.index_copy_(0, sel, src.to(dst.dtype))
                    continue
            out = _chunk_forward(z.float(), y, epsilon, spec)
            for dst, src in zip((loss[rows], nll[rows], stats[rows], grad[rows]), out):
                dst.copy_(src)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(nll, stats)
        return loss, nll, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_nll, grad_stats):
        (grad,) = ctx.saved_tensors
        # Scaling in place: this buffer is the gradient's only copy (no second (N, V) tensor).
        # A reduced loss gives a stride-0 grad_loss, so one multiply by a scalar suffices.
        if grad_loss.numel() > 0 and grad_loss.stride(0) == 0:
            grad.mul_(grad_loss[0].to(grad.dtype))
        else:
            grad.mul_(grad_loss.unsqueeze(-1).to(grad.dtype))
        return grad, None, None, None, None


def chunked_encouraging_loss(logits, target, epsilon, spec: BonusSpec, ignore_index=None):
    """Per-token (loss, nll, stats[z_y, margin]) with a fused backward. logits: (N, V)."""
    return ChunkedEncouragingLoss.apply(logits, target, epsilon, spec, ignore_index)

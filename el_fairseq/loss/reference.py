"""Plain-torch encouraging loss on log-probabilities: the reference and the fallback of every fused path.

Shapes follow fairseq's `label_smoothed_nll_loss`: lprobs (N, V) float log-probabilities, target (N,).
Per token y (padding excluded):

    ce    = (1 - eps - eps/(V-1)) * (-lp_y) + eps/(V-1) * sum_j (-lp_j)      fairseq's LS-CE, exactly
    bonus = (1 - eps_b) * b(p_y) + eps_b / V * sum_j b(p_j)                 see bonus.py for b
    loss  = ce + rho * bonus

Autograd differentiates it. It holds several (N, V) temporaries; the fused paths avoid them.
"""
import torch

from .bonus import BonusSpec, bonus_value


def label_smoothed_ce(lprobs, target, epsilon):
    """Per-token (loss, nll) of fairseq's label_smoothed_nll_loss (0.12 formula), no masking."""
    nll = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(dim=-1)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


def bonus_per_token(lprobs, target, spec: BonusSpec):
    """(1 - eps_b) * b(p_y) + eps_b / V * sum_j b(p_j), per token, before rho."""
    lp_y = lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    # 1 - p = -expm1(log p): exact for p near 1, where float32 `1 - p` would round to 0.
    b_y = bonus_value(lp_y.exp(), -torch.expm1(lp_y), spec)
    if spec.epsilon == 0.0:
        return b_y
    b_all = bonus_value(lprobs.exp(), -torch.expm1(lprobs), spec)
    return (1.0 - spec.epsilon) * b_y + (spec.epsilon / lprobs.size(-1)) * b_all.sum(dim=-1)


def encouraging_nll_loss(lprobs, target, epsilon, spec: BonusSpec, ignore_index=None, reduce=True):
    """(loss, nll_loss) like fairseq's label_smoothed_nll_loss, with the encouraging bonus added.

    reduce=False returns per-token vectors of shape (N,) with zeros at padding.
    """
    lprobs = lprobs.view(-1, lprobs.size(-1))
    target = target.view(-1)
    pad_mask = target.eq(ignore_index) if ignore_index is not None else None
    safe_target = target.masked_fill(pad_mask, 0) if pad_mask is not None else target
    loss, nll = label_smoothed_ce(lprobs, safe_target, epsilon)
    if spec.active:
        loss = loss + spec.rho * bonus_per_token(lprobs, safe_target, spec)
    if pad_mask is not None:
        loss = loss.masked_fill(pad_mask, 0.0)
        nll = nll.masked_fill(pad_mask, 0.0)
    if reduce:
        return loss.sum(), nll.sum()
    return loss, nll

"""The paper's optimisation diagnostics per target token: energy, margin, p_y, well-classified share.

    energy  E(y|x) = -z_y                          (conditional energy, the paper's Sec. 4)
    margin  m      = z_y - max_{j != y} z_j
    p_y            = softmax(z)_y;  well-classified:  p_y > 0.5

Summed over non-padding tokens they are summable logging outputs (means = sum / count).
"""
import torch

WELL_CLASSIFIED_P = 0.5


def token_stats_from_logits(logits, target, ignore_index=None):
    """(N, 2) float32 [z_y, margin] from logits (N, V); zeros at padding. No (N, V) temporary
    beyond topk's (N, 2) output."""
    z = logits.reshape(-1, logits.size(-1))
    target = target.reshape(-1)
    safe = target.masked_fill(target.eq(ignore_index), 0) if ignore_index is not None else target
    z_y = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1).float()
    top2 = z.topk(min(2, z.size(-1)), dim=-1).values.float()
    # one class: no other class, the margin is 0
    other = torch.where(top2[:, 0] <= z_y, top2[:, -1], top2[:, 0]) if z.size(-1) > 1 else z_y
    stats = torch.stack([z_y, z_y - other], dim=-1)
    if ignore_index is not None:
        stats = stats.masked_fill(target.eq(ignore_index).unsqueeze(-1), 0.0)
    return stats


def summarize(stats, nll, target, ignore_index=None):
    """Summable sums over non-padding tokens: energy, margin, p_y, well-classified count, count."""
    target = target.reshape(-1)
    keep = target.ne(ignore_index) if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    p_y = torch.exp(-nll.detach().float()).masked_fill(~keep, 0.0)
    stats = stats.detach()
    # Tensors, not Python numbers: no device synchronisation on the training step.
    return {
        "energy_sum": -stats[:, 0].sum(),
        "margin_sum": stats[:, 1].sum(),
        "p_y_sum": p_y.sum(),
        "well_classified": (p_y > WELL_CLASSIFIED_P).sum(),
        "diag_tokens": keep.sum(),
    }

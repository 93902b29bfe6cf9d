"""Plain-torch encouraging loss on log-probabilities: the reference and the fallback of every fused path.

Shapes follow fairseq's `label_smoothed_nll_loss`: lprobs (N, V) float log-probabilities, target (N,).
Per token y (padding excluded):

    ce    = (1 - eps - eps/(V-1)) * (-lp_y) + eps/(V-1) * sum_j (-lp_j)      fairseq's LS-CE, exactly
    bonus = (1 - eps_b) * b(p_y) + eps_b / V * sum_j b(p_j)                 see bonus.py for b
    loss  = ce + rho * bonus

Masked classes (logit -inf, p_j = 0): a term whose weight is 0 counts 0, though its -lp_j is inf
(no 0 * inf = nan), and b(0) = 0 for every bonus. Without label smoothing the loss and its gradient
are then those of the remaining classes, as in torch's cross-entropy; with it, -lp_j = inf carries
the weight eps/(V-1) and the loss is inf, as in torch's and fairseq's (the gradient stays finite).
Every fused path follows this convention.

Autograd differentiates it. It holds several (N, V) temporaries; the fused paths avoid them.
"""
import torch

from .bonus import BonusSpec, bonus_value


def label_smoothed_ce(lprobs, target, epsilon):
    """Per-token (loss, nll) of fairseq's label_smoothed_nll_loss (0.12 formula), no masking."""
    nll = -lprobs.gather(dim=-1, index=target.unsqueeze(-1)).squeeze(-1)
    if epsilon == 0.0:  # no smoothing term, also where a masked class makes it -inf
        return nll, nll
    smooth = -lprobs.sum(dim=-1)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


def bonus_per_token(lprobs, target, spec: BonusSpec):
    """(1 - eps_b) * b(p_y) + eps_b / V * sum_j b(p_j), per token, before rho."""
    index = target.unsqueeze(-1)
    lp_y = lprobs.gather(dim=-1, index=index).squeeze(-1)
    probs = lprobs.exp()
    # 1 - p_y as the sum of the other classes' p_j, to float precision for p_y near 1 too, as the fused
    # paths compute it. -expm1(log p_y) keeps only the absolute precision of a float32 log-probability
    # (~1e-6 for logits ~10): at 1 - p_y = 3e-5 that was a 3% error, 0.05 in the log bonus.
    b_y = bonus_value(lp_y.exp(), probs.scatter(-1, index, 0.0).sum(-1), spec)
    if spec.epsilon == 0.0:
        return b_y
    b_all = bonus_value(probs, one_minus_probs(probs, lprobs), spec)
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


def class_weighted_loss(lprobs, target, weight, label_smoothing, spec: BonusSpec):
    """Per-row loss in torch's conventions, with per-class weights w (all 1 when `weight` is None), for
    class indices `target` (N,) or class probabilities `target` (N, V):

        loss = sum_j w_j [ q_j (-lp_j) + rho * qb_j * b(p_j) ]
        q  = (1 - eps) t + eps / V        eps   = label_smoothing (F.cross_entropy's smoothing)
        qb = (1 - eps_b) t + eps_b / V    eps_b = the bonus label smoothing

    with t the one-hot of the index or the given probabilities. For an index y that is F.cross_entropy's
    (1 - eps) w_y (-lp_y) + eps / V sum_j w_j (-lp_j), plus rho [(1 - eps_b) w_y b(p_y) + eps_b / V sum_j w_j b(p_j)].
    A zero probability or weight makes its terms 0 even at a masked class (logit -inf), where torch's
    cross-entropy on probabilities gives nan. No row masking: the caller passes valid indices and
    masks ignored rows.
    """
    vocab = lprobs.size(-1)
    soft = target.is_floating_point()

    def weighted_sum(values, share):  # sum_j share_j values_j; a share of 0 counts 0 (masked class: lp_j = -inf)
        # 0 * inf is cleared in `values`, not in the product, so that d/d share_j = values_j also where
        # share_j = 0: a probability target's gradient, torch's -w_j lp_j, at a class of probability 0
        return (values.masked_fill((share == 0) & values.isinf(), 0.0) * share).sum(-1)

    def on_target(values):  # sum_j w_j t_j values_j
        if soft:
            return weighted_sum(values, target if weight is None else target * weight)
        picked = values.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        return picked if weight is None else picked * weight[target]

    def spread(values):  # sum_j w_j values_j / V
        return (values.sum(-1) if weight is None else weighted_sum(values, weight)) / vocab

    loss = -(1.0 - label_smoothing) * on_target(lprobs)
    if label_smoothing > 0.0:
        loss = loss - label_smoothing * spread(lprobs)
    if spec.active:
        probs = lprobs.exp()
        b_all = bonus_value(probs, one_minus_probs(probs, lprobs), spec)
        bonus = (1.0 - spec.epsilon) * on_target(b_all)
        if spec.epsilon > 0.0:
            bonus = bonus + spec.epsilon * spread(b_all)
        loss = loss + spec.rho * bonus
    return loss


def one_minus_probs(probs, lprobs):
    """1 - p_j for every class, to float precision near p = 1 too: -expm1(log p_j), except at each row's
    most probable class (the only one that can be near 1), where it is the sum of the other p_k
    (in float32, -expm1(log p) keeps only the absolute precision of the logits, too coarse for the
    bonus's 1e-5 clamp of 1 - p)."""
    top = lprobs.argmax(-1, keepdim=True)
    others = probs.scatter(-1, top, 0.0).sum(-1, keepdim=True)
    return (-torch.expm1(lprobs)).scatter(-1, top, others)

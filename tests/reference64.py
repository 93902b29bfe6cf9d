"""Independent float64 encouraging loss, written directly from the paper's formulas.

Deliberately naive (no expm1, no chunking, no shared code with el_fairseq.loss): the
implementations under test must agree with it.
"""
import math

import torch
import torch.nn.functional as F

FLOOR = 1e-5


def bonus64(p, kind="log", log_end=0.5, gamma=1.0, start=0.0):
    def raw(q):
        if kind == "log":
            value = torch.log(torch.clamp(1.0 - q, min=FLOOR))
            if log_end < 1.0:
                tangent = 1.0 / (log_end - 1.0) * (q - log_end) + math.log(1.0 - log_end)
                value = torch.where(q > log_end, tangent, value)
            return value
        if kind == "power":
            return -torch.pow(q, gamma)
        return torch.cos(q * math.pi) - 1.0

    value = raw(p)
    if start > 0.0:
        shift = raw(torch.tensor(start, dtype=torch.float64))
        value = torch.where(p >= start, value - shift, torch.zeros_like(value))
    return value


def el_loss64(logits, target, eps, eps_b, rho, pad=None, kind="log", log_end=0.5, gamma=1.0, start=0.0,
              num_classes=None):
    """Sum over non-padding tokens of LS-CE (fairseq 0.12) + rho * smoothed bonus. float64.

    A term whose weight is 0 counts 0, also where its -log p is infinite (a -inf logit, a masked class):
    without label smoothing the loss is then that of the remaining classes, as torch's cross-entropy;
    with it, -log 0 = inf has weight eps/(V-1) and the loss is inf, as in torch and fairseq.
    num_classes: V in the smoothing weights (default: the logits' width).
    """
    z = logits.double().reshape(-1, logits.size(-1))
    t = target.reshape(-1)
    V = num_classes or z.size(-1)
    total = torch.zeros((), dtype=torch.float64)
    nll_total = torch.zeros((), dtype=torch.float64)
    for i in range(z.size(0)):
        y = int(t[i])
        if pad is not None and y == pad:
            continue
        lp = z[i] - torch.logsumexp(z[i], 0)
        p = torch.softmax(z[i], 0)
        eps_i = eps / (V - 1)
        ce = (1 - eps - eps_i) * (-lp[y]) + (eps_i * (-lp.sum()) if eps_i else 0.0)
        b = bonus64(p, kind, log_end, gamma, start)
        bonus = (1 - eps_b) * b[y] + eps_b / V * b.sum()
        total = total + ce + rho * bonus
        nll_total = nll_total + (-lp[y])
    return total, nll_total


def torch_el_loss64(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                    rho=1.0, eps_b=0.0, kind="log", log_end=0.75, gamma=1.0, start=0.0):
    """F.cross_entropy's conventions + rho * bonus, float64, all rows at once.

    logits (N, C, d...) or unbatched (C,); target class indices (N, d...) (or ()) or probabilities shaped like
    logits; w the class weights (ones if None). Per row, with t the one-hot of y (or the row's probabilities):
        q = (1 - eps) t + eps / C,  qb = (1 - eps_b) t + eps_b / C,
        loss = sum_j w_j (q_j * -log p_j + rho * qb_j * b(p_j)).
    An ignored row (y == ignore_index, class indices only) costs 0.
    mean: sum / sum of w_y over non-ignored rows (class indices), sum / rows (probabilities).
    """
    if logits.dim() == 1:
        loss = torch_el_loss64(logits.unsqueeze(0), target.unsqueeze(0), weight, ignore_index, reduction,
                               label_smoothing, rho, eps_b, kind, log_end, gamma, start)
        return loss.squeeze(0) if reduction == "none" else loss
    C = logits.size(1)
    z = logits.double().movedim(1, -1).reshape(-1, C)
    w = torch.ones(C, dtype=torch.float64) if weight is None else weight.double()
    if tuple(target.shape) == tuple(logits.shape):
        dist = target.double().movedim(1, -1).reshape(-1, C)
        counted = torch.ones(z.size(0), dtype=torch.bool)
        denominator = torch.tensor(float(z.size(0)), dtype=torch.float64)
    else:
        y = target.reshape(-1)
        counted = y != ignore_index
        y = torch.where(counted, y, torch.zeros_like(y))
        dist = torch.zeros_like(z).scatter(1, y.unsqueeze(1), 1.0)
        denominator = (w[y] * counted).sum()
    lp = z - torch.logsumexp(z, 1, keepdim=True)
    b = bonus64(torch.softmax(z, 1), kind, log_end, gamma, start)
    q = (1 - label_smoothing) * dist + label_smoothing / C
    qb = (1 - eps_b) * dist + eps_b / C
    loss = torch.where(counted, (w * (q * -lp + rho * qb * b)).sum(1), torch.zeros((), dtype=torch.float64))
    if reduction == "none":
        return loss.reshape((logits.size(0), *logits.shape[2:]))
    return loss.sum() if reduction == "sum" else loss.sum() / denominator


def linear_logits64(input, linear_weight, linear_bias=None):
    """torch's linear_cross_entropy logits, float64: F.linear with the weight (C, d1, ..., dK, D) read as
    (C * d1 * ... * dK, D), reshaped to (*batch, C, d1, ..., dK) (torch's linear_cross_entropy_loss_reference)."""
    w = linear_weight.double()
    b = None if linear_bias is None else linear_bias.double().reshape(-1)
    return F.linear(input.double(), w.reshape(-1, w.size(-1)), b).reshape(*input.shape[:-1], *w.shape[:-1])

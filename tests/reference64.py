"""Independent float64 encouraging loss, written directly from the paper's formulas.

Deliberately naive (no expm1, no chunking, no shared code with el_fairseq.loss): the
implementations under test must agree with it.
"""
import math

import torch

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


def el_loss64(logits, target, eps, eps_b, rho, pad=None, kind="log", log_end=0.5, gamma=1.0, start=0.0):
    """Sum over non-padding tokens of LS-CE (fairseq 0.12) + rho * smoothed bonus. float64."""
    z = logits.double().reshape(-1, logits.size(-1))
    t = target.reshape(-1)
    V = z.size(-1)
    total = torch.zeros((), dtype=torch.float64)
    nll_total = torch.zeros((), dtype=torch.float64)
    for i in range(z.size(0)):
        y = int(t[i])
        if pad is not None and y == pad:
            continue
        lp = z[i] - torch.logsumexp(z[i], 0)
        p = torch.softmax(z[i], 0)
        eps_i = eps / (V - 1)
        ce = (1 - eps - eps_i) * (-lp[y]) + eps_i * (-lp.sum())
        b = bonus64(p, kind, log_end, gamma, start)
        bonus = (1 - eps_b) * b[y] + eps_b / V * b.sum()
        total = total + ce + rho * bonus
        nll_total = nll_total + (-lp[y])
    return total, nll_total

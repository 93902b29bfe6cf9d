"""The encouraging-loss bonus b(p), its derivative, option checks and the rho schedule.

Zhao et al., "Well-classified Examples are Underestimated in Classification with Deep Neural
Networks" (arXiv 2110.06537). With p = softmax(z) over V classes and y the target:

    loss = CE_ls(z, y) + rho * [ (1 - eps_b) * b(p_y) + eps_b / V * sum_j b(p_j) ]

where CE_ls is fairseq's label-smoothed cross-entropy and b is one of the bonuses

    log:     b(p) = log(max(1 - p, 1e-5))                   for p <= LE   (the authors' clamp)
             b(p) = (p - LE) / (LE - 1) + log(1 - LE)       for p >  LE   (tangent at LE, "conservative")
    power:   b(p) = -p ** gamma                              (gamma >= 1: below 1, b'(p) = -gamma p^(gamma-1)
                                                              is infinite where p underflows to 0)
    cosine:  b(p) = cos(pi * p) - 1

LE ("log end") = 1 gives the plain log bonus. With a bonus start s > 0 the bonus is shifted so it
begins at s: b_s(p) = b(p) - b(s) for p >= s and 0 below (the authors' `bonus_start`).

b is computed from (p, 1 - p) where the caller obtains 1 - p as -expm1(log p): for p close to 1 that
keeps the relative precision that 1 - p would lose in float32.
"""
import math
from dataclasses import dataclass

import torch

BONUS_KINDS = ("log", "power", "cosine")
SCHEDULES = ("constant", "linear", "exp", "cos")
# The authors clamp 1 - p at this value before the log (EncouragingLoss.py, encourage_loss.py).
ONE_MINUS_P_FLOOR = 1e-5


class EncouragingLossOptionError(ValueError):
    """An option of the encouraging loss is out of its range (one-line message)."""


@dataclass(frozen=True)
class BonusSpec:
    """Everything that defines the bonus term; rho is the effective weight (schedule applied)."""

    kind: str = "log"
    log_end: float = 0.5
    gamma: float = 1.0
    start: float = 0.0
    epsilon: float = 0.1  # bonus label smoothing eps_b
    rho: float = 1.0

    def __post_init__(self):
        check_bonus_options(self.kind, self.log_end, self.gamma, self.start, self.epsilon, self.rho)

    @property
    def active(self) -> bool:
        return self.rho != 0.0


def _refuse(option, value, allowed):
    raise EncouragingLossOptionError(f"{option} {value!r} is out of range: allowed {allowed}")


def check_bonus_options(kind, log_end, gamma, start, epsilon, rho):
    """Refuse out-of-range values with one line naming the flag and the allowed range."""
    if kind not in BONUS_KINDS:
        _refuse("--bonus", kind, "one of " + ", ".join(BONUS_KINDS))
    if not 0.0 < log_end <= 1.0:
        _refuse("--log-end", log_end, "0 < LE <= 1")
    # gamma < 1 would make b'(p) infinite at p = 0 (any probability that underflows) and every
    # gradient NaN; the authors' --bonus_gamma is a positive integer anyway. Finite by comparison, not
    # math.isfinite: under torch.compile(dynamic=True) a float default is a symbolic float, which it cannot take.
    if kind == "power" and not (1.0 <= gamma < math.inf):
        _refuse("--bonus-gamma", gamma, "gamma >= 1 for --bonus power")
    if not 0.0 <= start < 1.0:
        _refuse("--bonus-start", start, "0 <= start < 1")
    if not 0.0 <= epsilon < 1.0:
        _refuse("--bonus-label-smoothing", epsilon, "0 <= eps_b < 1")
    if not 0.0 <= rho < math.inf:
        _refuse("--bonus-rho", rho, "rho >= 0 (finite)")


def _raw_bonus(p, one_minus_p, spec: BonusSpec):
    if spec.kind == "log":
        value = torch.log(one_minus_p.clamp(min=ONE_MINUS_P_FLOOR))
        if spec.log_end < 1.0:
            le = spec.log_end
            tangent = (p - le) / (le - 1.0) + math.log(1.0 - le)
            value = torch.where(p > le, tangent, value)
        return value
    if spec.kind == "power":
        return -p.pow(spec.gamma)
    return torch.cos(math.pi * p) - 1.0


def _raw_bonus_grad(p, one_minus_p, spec: BonusSpec):
    if spec.kind == "log":
        # d/dp log(1 - p) = -1 / (1 - p); zero where the clamp is active, like autograd through clamp.
        grad = torch.where(
            one_minus_p > ONE_MINUS_P_FLOOR,
            -1.0 / one_minus_p.clamp(min=ONE_MINUS_P_FLOOR),
            torch.zeros_like(p),
        )
        if spec.log_end < 1.0:
            grad = torch.where(p > spec.log_end, torch.full_like(p, 1.0 / (spec.log_end - 1.0)), grad)
        return grad
    if spec.kind == "power":
        return -spec.gamma * p.pow(spec.gamma - 1.0)
    return -math.pi * torch.sin(math.pi * p)


def _scalar_bonus(p: float, spec: BonusSpec) -> float:
    t = torch.tensor([p], dtype=torch.float64)
    return float(_raw_bonus(t, 1.0 - t, spec)[0])


def bonus_value(p, one_minus_p, spec: BonusSpec):
    """b(p) elementwise (shifted by the bonus start when there is one)."""
    value = _raw_bonus(p, one_minus_p, spec)
    if spec.start > 0.0:
        value = torch.where(p >= spec.start, value - _scalar_bonus(spec.start, spec), torch.zeros_like(value))
    return value


def bonus_grad(p, one_minus_p, spec: BonusSpec):
    """db/dp elementwise."""
    grad = _raw_bonus_grad(p, one_minus_p, spec)
    if spec.start > 0.0:
        grad = torch.where(p >= spec.start, grad, torch.zeros_like(grad))
    return grad


def scheduled_rho(rho: float, schedule: str, step: int, horizon: int, exp_ratio: float = 5.0) -> float:
    """rho * f(t / T) with t the number of updates and T the horizon (the authors' el_schedule counts epochs:
    T_updates = epochs x updates per epoch).

    linear: t/T;  exp: exp((t/T - 1) * r) (r > 0) or 1 - exp(t/T * r) (r < 0);  cos: (cos(pi (1 + t/T)) + 1) / 2.
    t/T is capped at 1, so after the horizon the full rho applies.
    """
    if schedule == "constant":
        return rho
    if schedule not in SCHEDULES:
        _refuse("--bonus-schedule", schedule, "one of " + ", ".join(SCHEDULES))
    if horizon <= 0:
        _refuse("--bonus-schedule-updates", horizon, "a positive number of updates with --bonus-schedule " + schedule)
    frac = min(float(step) / float(horizon), 1.0)
    if schedule == "linear":
        factor = frac
    elif schedule == "exp":
        if exp_ratio == 0:
            _refuse("--bonus-schedule-exp-ratio", exp_ratio, "a non-zero ratio")
        factor = math.exp((frac - 1.0) * exp_ratio) if exp_ratio > 0 else 1.0 - math.exp(frac * exp_ratio)
    else:
        factor = (math.cos(math.pi * (1.0 + frac)) + 1.0) * 0.5
    return rho * factor

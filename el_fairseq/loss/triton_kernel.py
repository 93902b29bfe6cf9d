"""Fused encouraging loss for CUDA as a Triton kernel: reads fp32/fp16/bf16 logits, computes in
float32, writes the gradient once (in the logits' dtype).

One program per row, four passes over the row in blocks of BLOCK columns (same mathematics as
chunked.py / native_kernel.c):
  1. row max m, its index, and the runner-up max_{j != y} z_j (margin);
  2. e_j = exp(z_j - m): the sums without y and without the argmax (exact 1 - p for the only two
     entries that can have p >= 1/2), and sum z (smoothing term);
  3. sum_j b(p_j) and s_hat = sum_j c_j p_j, c_j = w_all b'(p_j);
  4. grad_k = p_k (1 + c_k - s) - eps_i, and the target entry from the exact 1 - p_y.
p is recomputed from z in each pass instead of being stored: the GPU is bound by memory traffic,
and this reads the logits four times and writes one (N, V) tensor, where fairseq's LS-CE writes
and reads several float32 (N, V) tensors.
Tested here with Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors; `available()` is False
where triton is not installed, and the dispatcher then uses the chunked torch path.
"""
import math
import os

import torch

try:  # GPU imports guarded: the plugin works without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

from . import kernel_inputs
from .bonus import BonusSpec, _scalar_bonus
from .chunked import gradient_dtype

KINDS = {"log": 0, "power": 1, "cosine": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the logits it reads; computed in float32
FLOOR = 1e-5


def available():
    return triton is not None


def interpreted():
    """Whether @triton.jit runs under Triton's CPU interpreter (TRITON_INTERPRET=1 when triton was imported):
    its kernels are then InterpretedFunctions, which torch.library.wrap_triton cannot trace."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_el_kernel, InterpretedFunction)


if triton is not None:

    @triton.jit
    def _bonus(p, omp, KIND: tl.constexpr, le, slope, at_le, gamma, start, b_start, HAS_START: tl.constexpr):
        if KIND == 0:
            v = tl.where(p > le, (p - le) * slope + at_le, tl.log(tl.maximum(omp, 1e-5)))
        elif KIND == 1:
            v = -tl.where(p > 0, tl.exp(gamma * tl.log(tl.maximum(p, 1e-38))), 0.0)
        else:
            v = tl.cos(3.141592653589793 * p) - 1.0
        if HAS_START:
            v = tl.where(p >= start, v - b_start, 0.0)
        return v

    @triton.jit
    def _bonus_grad(p, omp, KIND: tl.constexpr, le, slope, gamma, start, HAS_START: tl.constexpr):
        if KIND == 0:
            g = tl.where(p > le, slope, tl.where(omp > 1e-5, -1.0 / tl.maximum(omp, 1e-5), 0.0))
        elif KIND == 1:
            at_zero = tl.where(gamma == 1.0, -1.0, tl.where(gamma > 1.0, 0.0, -float("inf")))
            g = tl.where(p > 0, -gamma * tl.exp((gamma - 1.0) * tl.log(tl.maximum(p, 1e-38))), at_zero)
        else:
            g = -3.141592653589793 * tl.sin(3.141592653589793 * p)
        if HAS_START:
            g = tl.where(p >= start, g, 0.0)
        return g

    @triton.jit
    def _el_kernel(Z, T, LOSS, NLL, STATS, GRAD, stride_z, stride_g, V, ignore_index,
                   eps, eps_i, w_y, w_all, le, slope, at_le, gamma, start, b_start,
                   KIND: tl.constexpr, ACTIVE: tl.constexpr, SMOOTH: tl.constexpr, SMOOTH_CE: tl.constexpr,
                   HAS_START: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y_raw = tl.load(T + row)
        valid = y_raw != ignore_index
        y = tl.where(valid, y_raw, 0)
        z_row = Z + row * stride_z
        g_row = GRAD + row * stride_g
        cols = tl.arange(0, BLOCK)
        zy = tl.load(z_row + y).to(tl.float32)

        # pass 1: max, its index, runner-up over j != y
        m = -float("inf")
        jmax = 0
        other = -float("inf")
        for start_col in range(0, V, BLOCK):
            j = start_col + cols
            inside = j < V
            z = tl.load(z_row + j, mask=inside, other=-float("inf")).to(tl.float32)
            block_max = tl.max(z, axis=0)
            block_arg = tl.argmax(z, axis=0) + start_col
            jmax = tl.where(block_max > m, block_arg, jmax)
            m = tl.maximum(m, block_max)
            other = tl.maximum(other, tl.max(tl.where(j == y, -float("inf"), z), axis=0))

        # pass 2: sums of e_j without y, without the argmax, and sum z
        rest_y = 0.0
        rest_max = 0.0
        zsum = 0.0
        for start_col in range(0, V, BLOCK):
            j = start_col + cols
            inside = j < V
            z = tl.load(z_row + j, mask=inside, other=0.0).to(tl.float32)
            e = tl.where(inside, tl.exp(z - m), 0.0)
            rest_y += tl.sum(tl.where(j == y, 0.0, e), axis=0)
            rest_max += tl.sum(tl.where(j == jmax, 0.0, e), axis=0)
            zsum += tl.sum(z, axis=0)
        ey = tl.exp(zy - m)
        total = rest_y + ey
        inv_total = 1.0 / total
        log_total = tl.log(total)
        lse = m + log_total
        lp_y = zy - m - log_total
        p_y = ey * inv_total
        omp_y = rest_y * inv_total
        omp_max = rest_max * inv_total
        nll = -lp_y
        if SMOOTH_CE:
            loss = (1.0 - eps - eps_i) * nll - eps_i * (zsum - V * lse)
        else:  # no smoothing term: a masked class (z = -inf) would make it 0 * inf = nan
            loss = nll

        s_hat = 0.0
        d = 0.0
        c_y = 0.0
        if ACTIVE:
            b_y = _bonus(p_y, omp_y, KIND, le, slope, at_le, gamma, start, b_start, HAS_START)
            d = w_y * _bonus_grad(p_y, omp_y, KIND, le, slope, gamma, start, HAS_START)
            loss += w_y * b_y
            if SMOOTH:
                # pass 3: sum_j b(p_j) and s_hat
                bsum = 0.0
                for start_col in range(0, V, BLOCK):
                    j = start_col + cols
                    inside = j < V
                    z = tl.load(z_row + j, mask=inside, other=0.0).to(tl.float32)
                    p = tl.exp(z - m) * inv_total
                    omp = tl.where(j == y, omp_y, tl.where(j == jmax, omp_max, 1.0 - p))
                    b = _bonus(p, omp, KIND, le, slope, at_le, gamma, start, b_start, HAS_START)
                    c = w_all * _bonus_grad(p, omp, KIND, le, slope, gamma, start, HAS_START)
                    bsum += tl.sum(tl.where(inside, b, 0.0), axis=0)
                    s_hat += tl.sum(tl.where(inside, c * p, 0.0), axis=0)
                loss += w_all * bsum
                c_y = w_all * _bonus_grad(p_y, omp_y, KIND, le, slope, gamma, start, HAS_START)
        s_tot = s_hat + d * p_y
        grad_y = eps - omp_y + p_y * (c_y - s_hat + d * omp_y)

        # pass 4: the gradient, written once (skipped when no gradient is wanted)
        for start_col in range(0, V if WRITE_GRAD else 0, BLOCK):
            j = start_col + cols
            inside = j < V
            z = tl.load(z_row + j, mask=inside, other=0.0).to(tl.float32)
            p = tl.exp(z - m) * inv_total
            if ACTIVE and SMOOTH:
                omp = tl.where(j == y, omp_y, tl.where(j == jmax, omp_max, 1.0 - p))
                c = w_all * _bonus_grad(p, omp, KIND, le, slope, gamma, start, HAS_START)
                g = p * (1.0 + c - s_tot) - eps_i
            else:
                g = p * (1.0 - s_tot) - eps_i
            g = tl.where(j == y, grad_y, g)
            g = tl.where(valid, g, 0.0)
            tl.store(g_row + j, g.to(GRAD.dtype.element_ty), mask=inside)

        tl.store(LOSS + row, tl.where(valid, loss, 0.0))
        tl.store(NLL + row, tl.where(valid, nll, 0.0))
        tl.store(STATS + 2 * row, tl.where(valid, zy, 0.0))
        tl.store(STATS + 2 * row + 1, tl.where(valid, zy - other, 0.0))


def forward(logits, target, epsilon, spec: BonusSpec, ignore_index, block=None, need_grad=True):
    """(loss, nll, stats, grad) from logits (N, V) of any float dtype; grad in the logits' dtype,
    None without need_grad (the kernel then skips its gradient pass and no N x V buffer exists).
    Anything else (another dtype, a tensor subclass, CPU tensors outside Triton's interpreter) raises
    KernelInputError before a pointer is taken."""
    devices = ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)
    kernel_inputs.check("triton", logits, target, DTYPES, devices)
    logits = logits.detach()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, vocab = logits.shape
    target = target.contiguous().to(torch.int64)
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    nll = torch.empty_like(loss)
    stats = torch.empty(n, 2, dtype=torch.float32, device=logits.device)
    grad_dtype = gradient_dtype(logits.dtype)  # float32 for fp16 logits: exact after fairseq's loss scaling
    grad = torch.empty_like(logits, dtype=grad_dtype) if need_grad else torch.empty(1, 1, dtype=grad_dtype,
                                                                                      device=logits.device)
    le_active = spec.kind == "log" and spec.log_end < 1.0
    block = block or min(4096, triton.next_power_of_2(vocab))
    # wrap_triton: traced by torch.compile inside the el_fairseq::triton_loss operator (ops.py); a plain
    # launch otherwise.
    torch.library.wrap_triton(_el_kernel)[(n,)](
        logits, target, loss, nll, stats, grad, logits.stride(0), grad.stride(0), vocab,
        -1 if ignore_index is None else int(ignore_index),
        float(epsilon), float(epsilon) / (vocab - 1), spec.rho * (1.0 - spec.epsilon), spec.rho * spec.epsilon / vocab,
        spec.log_end if le_active else 2.0, 1.0 / (spec.log_end - 1.0) if le_active else 0.0,
        math.log(1.0 - spec.log_end) if le_active else 0.0, float(spec.gamma), float(spec.start),
        _scalar_bonus(spec.start, spec) if spec.start > 0 else 0.0,
        KIND=KINDS[spec.kind], ACTIVE=spec.active, SMOOTH=spec.epsilon > 0.0, SMOOTH_CE=epsilon > 0.0,
        HAS_START=spec.start > 0.0,
        WRITE_GRAD=need_grad, BLOCK=block)
    return loss, nll, stats, grad if need_grad else None


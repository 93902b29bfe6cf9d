"""Fused encouraging loss over row chunks of the logits (plain torch ops; CPU and CUDA).

One pass over the logits computes the per-token loss and the gradient, which is kept instead of
the log-probabilities. With p = softmax(z), a the smoothed CE target (1 - eps at y, eps/(V-1)
elsewhere) and c_j = rho * w_j * b'(p_j), w_j = eps_b / V + (1 - eps_b) [j = y]:

    dL/dz_k = p_k - a_k + p_k * (c_k - sum_j c_j p_j)

Memory: the only (N, V) tensor that outlives the call is that gradient, in the logits' dtype
(float32 for fp16 logits, see gradient_dtype).
fairseq's LS-CE keeps its float32 log-softmax output (N x V x 4 bytes) for backward and builds
two more (N, V) tensors there (the gradient w.r.t. lprobs and w.r.t. the logits); here the
temporaries are bounded by one chunk of rows (CHUNK_ELEMENTS floats each).
Computation is in float32 whatever the logits' dtype, so fp16/bf16 logits stay finite.
"""
import torch

from . import kernel_inputs
from .bonus import BonusSpec, bonus_grad, bonus_value

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# ~2^18 float32 = 1 MiB per temporary: a handful of them stay within a core's L2 cache.
CHUNK_ELEMENTS = 1 << 18


def compute_dtype(dtype):
    """float32 for 16-bit inputs (and float32); float64 stays float64 (tests, gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gradient_dtype(dtype):
    """float32 for fp16 logits, else the logits' dtype. fairseq multiplies the gradient by its loss
    scale (up to 2^15 and more) in backward: stored in fp16 before that, the label-smoothing entries
    (~eps/V ~ 1e-5, below fp16's normal range 6.1e-5) would be subnormal and lose their precision,
    up to 1,024 ulps after scaling. In float32 they are scaled first and rounded to fp16 once.
    Cost: 4 instead of 2 bytes per logit for the kept gradient, what fairseq's LS-CE keeps anyway
    (its float32 log-probabilities). bf16 has float32's range: no subnormals at these magnitudes."""
    return torch.float32 if dtype == torch.float16 else dtype


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _chunk_forward(z, y, epsilon, spec: BonusSpec):
    """Loss, nll, stats and gradient for one chunk of non-padding rows. z: (n, V) float32."""
    n, vocab = z.shape
    idx = y.unsqueeze(-1)
    # One top-2 pass gives the max (softmax shift) and the runner-up (the margin diagnostic).
    top2 = z.topk(2, dim=-1).values
    m = top2[:, :1]
    z_y = z.gather(-1, idx)
    e = (z - m).exp_()
    e_y = e.gather(-1, idx)
    # 1 - p_y = (sum_{j != y} e_j) / S, summed without e_y: exact even when p_y -> 1, where
    # 1 - exp(z_y - logsumexp z) would keep only float32's absolute precision of the logits.
    e.scatter_(-1, idx, 0.0)
    rest = e.sum(-1, keepdim=True)
    e.scatter_(-1, idx, e_y)
    total = rest + e_y
    log_total = total.log()
    lp = z - (m + log_total)
    p = e.div_(total)
    lp_y = (z_y - m - log_total).squeeze(-1)
    p_y = (e_y / total).squeeze(-1)
    omp_y = (rest / total).squeeze(-1)
    nll = -lp_y
    eps_i = epsilon / (vocab - 1)
    # No smoothing, no smoothing term: a masked class (z = -inf) would make it 0 * inf = nan.
    loss = (1.0 - epsilon - eps_i) * nll - eps_i * lp.sum(-1) if epsilon > 0.0 else nll.clone()

    # Gradient of the CE part: p - a.  Built in place in the buffer `p` is about to leave.
    grad = p.clone() if spec.active else p
    if spec.active:
        b_y = bonus_value(p_y, omp_y, spec)
        db_y = bonus_grad(p_y, omp_y, spec)
        w_y = spec.rho * (1.0 - spec.epsilon)
        w_all = spec.rho * spec.epsilon / vocab
        if spec.epsilon > 0.0:
            one_minus_p = torch.expm1(lp).neg_()
            b_sum = bonus_value(p, one_minus_p, spec).sum(-1)
            loss = loss + w_y * b_y + w_all * b_sum
            c = bonus_grad(p, one_minus_p, spec).mul_(w_all)
        else:
            loss = loss + w_y * b_y
            c = None
        # With d = w_y * b'(p_y) the target term, s = sum_j c_j p_j + d p_y and
        #   k != y:  p_k (c_k - s)                      (no cancellation)
        #   k == y:  p_y (c_y - sum_j c_j p_j + d (1 - p_y))
        # The second form matters: for p_y -> 1, d ~ -1/(1 - p_y) is huge and c_y + d - s
        # would cancel catastrophically in float32.
        d = w_y * db_y
        if c is None:  # no bonus smoothing: c is zero but for d
            grad.addcmul_(p, (-d * p_y).unsqueeze(-1))
            bonus_y = p_y * d * omp_y
        else:
            s_hat = (c * p).sum(-1)
            c_y = c.gather(-1, idx).squeeze(-1)
            grad.add_(c.sub_((s_hat + d * p_y).unsqueeze(-1)).mul_(p))
            bonus_y = p_y * (c_y - s_hat + d * omp_y)
    else:
        bonus_y = torch.zeros_like(lp_y)
    # CE part at y: p_y - (1 - eps) = eps - (1 - p_y), again from the exact 1 - p_y.
    grad.sub_(eps_i)
    grad.scatter_(-1, idx, (epsilon - omp_y + bonus_y).unsqueeze(-1))

    # Diagnostics (issue 6): z_y and the margin z_y - max_{j != y} z_j (ties: margin 0).
    z_y = z_y.squeeze(-1)
    other = torch.where(top2[:, 0] <= z_y, top2[:, 1], top2[:, 0])
    stats = torch.stack([z_y, z_y - other], dim=-1)
    return loss, nll, stats, grad


def forward(logits, target, epsilon, spec: BonusSpec, ignore_index=None, need_grad=True):
    """(loss, nll, stats, grad) from logits (N, V), chunk by chunk; padding rows stay zero.
    Without need_grad, grad is None and only chunk-sized temporaries are allocated. Its outputs are
    written by index: a tensor subclass or transform wrapper raises KernelInputError (plain torch ops
    on the full logits, impl "reference", take those)."""
    kernel_inputs.check("chunked", logits, target, DTYPES, None)  # torch ops: any device
    n_rows, vocab = logits.shape
    logits = logits.detach()
    work = compute_dtype(logits.dtype)
    loss = logits.new_zeros(n_rows, dtype=work)
    nll = torch.zeros_like(loss)
    stats = logits.new_zeros(n_rows, 2, dtype=work)
    if not need_grad:
        grad = None
    elif ignore_index is not None:
        grad = torch.zeros_like(logits, dtype=gradient_dtype(logits.dtype))
    else:
        grad = torch.empty_like(logits, dtype=gradient_dtype(logits.dtype))
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
                out = _chunk_forward(z[sel].to(work), y[sel], epsilon, spec)
                for dst, src in zip((loss[rows], nll[rows], stats[rows], *([grad[rows]] if need_grad else [])), out):
                    dst.index_copy_(0, sel, src.to(dst.dtype))
                continue
        out = _chunk_forward(z.to(work), y, epsilon, spec)
        for dst, src in zip((loss[rows], nll[rows], stats[rows], *([grad[rows]] if need_grad else [])), out):
            dst.copy_(src)
    return loss, nll, stats, grad

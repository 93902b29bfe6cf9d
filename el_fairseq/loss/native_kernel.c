/* Fused encouraging loss for CPU: loss, nll, diagnostics and gradient of float32 logits, one row
 * at a time (a row of V floats stays in L1/L2), rows spread over OpenMP threads.
 *
 * Same mathematics as chunked.py (see its docstring): with p = softmax(z), e_j = exp(z_j - max z),
 *   dL/dz_k = p_k - a_k + p_k (c_k - sum_j c_j p_j),  c_j = rho w_j b'(p_j),
 * and the target entry from the exact 1 - p_y = (sum_{j != y} e_j) / (sum_j e_j).
 * Four passes per row: max (and the runner-up for the margin), exp and sums, bonus terms, gradient.
 * The row's e_j live in a per-thread scratch row; c_j in the gradient row until it is overwritten.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KIND_LOG 0
#define KIND_POWER 1
#define KIND_COSINE 2
#define FLOOR 1e-5f
#define PI_F 3.14159265358979323846f

typedef struct {
    float eps, eps_b, rho, log_end, gamma, start, b_start;
    int kind;
    int smooth; /* eps > 0, decided by the caller: see row() */
} params_t;

static inline float raw_bonus(float p, float omp, const params_t *q) {
    if (q->kind == KIND_LOG) {
        float v = logf(fmaxf(omp, FLOOR));
        if (q->log_end < 1.0f) {
            float tangent = (p - q->log_end) / (q->log_end - 1.0f) + logf(1.0f - q->log_end);
            v = p > q->log_end ? tangent : v;
        }
        return v;
    }
    if (q->kind == KIND_POWER) return -powf(p, q->gamma);
    return cosf(PI_F * p) - 1.0f;
}

static inline float raw_grad(float p, float omp, const params_t *q) {
    if (q->kind == KIND_LOG) {
        float g = omp > FLOOR ? -1.0f / fmaxf(omp, FLOOR) : 0.0f;
        if (q->log_end < 1.0f) g = p > q->log_end ? 1.0f / (q->log_end - 1.0f) : g;
        return g;
    }
    if (q->kind == KIND_POWER) return -q->gamma * powf(p, q->gamma - 1.0f);
    return -PI_F * sinf(PI_F * p);
}

static inline float bonus(float p, float omp, const params_t *q) {
    float v = raw_bonus(p, omp, q);
    if (q->start > 0.0f) v = p >= q->start ? v - q->b_start : 0.0f;
    return v;
}

static inline float bonus_grad(float p, float omp, const params_t *q) {
    float g = raw_grad(p, omp, q);
    if (q->start > 0.0f) g = p >= q->start ? g : 0.0f;
    return g;
}

/* pass 3 of a row: c_j = w_all b'(p_j) into grad, sum_j b(p_j), sum_j c_j p_j. One loop per bonus
   kind with branch-free selects, so gcc vectorises it (expf/logf/powf/cosf via libmvec). */
#define PASS3_LOOP(VALUE, GRAD)                                              \
    for (int64_t j = 0; j < V; j++) {                                        \
        const float p = scratch[j] * inv_total;                              \
        const float omp = 1.0f - p;                                          \
        float v = (VALUE), g = (GRAD);                                       \
        v = p >= start ? v - b_start : 0.0f;                                 \
        g = p >= start ? g : 0.0f;                                           \
        const float c = w_all * g;                                           \
        grad[j] = c;                                                         \
        bsum += v;                                                           \
        s_hat += c * p;                                                      \
    }

static void pass3(const float *scratch, float inv_total, int64_t V, const params_t *q, float w_all,
                  float *grad, float *bsum_out, float *s_hat_out) {
    float bsum = 0.0f, s_hat = 0.0f;
    const float start = q->start, b_start = q->b_start, gamma = q->gamma;
    if (q->kind == KIND_LOG) {
        /* LE = 1: the tangent never applies (p > 2 is impossible) and its constants stay finite */
        const float le = q->log_end < 1.0f ? q->log_end : 2.0f;
        const float slope = q->log_end < 1.0f ? 1.0f / (q->log_end - 1.0f) : 0.0f;
        const float at_le = q->log_end < 1.0f ? logf(1.0f - q->log_end) : 0.0f;
        PASS3_LOOP(p > le ? (p - le) * slope + at_le : logf(fmaxf(omp, FLOOR)),
                   p > le ? slope : (omp > FLOOR ? -1.0f / fmaxf(omp, FLOOR) : 0.0f))
    } else if (q->kind == KIND_POWER) {
        PASS3_LOOP(-powf(p, gamma), -gamma * powf(p, gamma - 1.0f))
    } else {
        PASS3_LOOP(cosf(PI_F * p) - 1.0f, -PI_F * sinf(PI_F * p))
    }
    *bsum_out = bsum;
    *s_hat_out = s_hat;
}

static void row(const float *z, int64_t y, int64_t V, const params_t *q, float *scratch, float *grad,
                float *loss_out, float *nll_out, float *stats_out) {
    /* pass 1: max over j != y (the margin's runner-up) and the row max */
    float other = -FLT_MAX;  /* finite: the build uses -ffast-math (finite-math-only) */
    for (int64_t j = 0; j < y; j++) other = fmaxf(other, z[j]);
    for (int64_t j = y + 1; j < V; j++) other = fmaxf(other, z[j]);
    const float zy = z[y];
    const float m = fmaxf(other, zy);
    /* pass 2: e_j = exp(z_j - m) into scratch; sum_{j != y} e_j summed around y, so 1 - p_y is
       exact however close p_y is to 1; sum z for the smoothing term (float lanes, fast-math). */
    float rest_lo = 0.0f, rest_hi = 0.0f, zsum_lo = 0.0f, zsum_hi = 0.0f;
    for (int64_t j = 0; j < y; j++) {
        float e = expf(z[j] - m);
        scratch[j] = e;
        rest_lo += e;
        zsum_lo += z[j];
    }
    for (int64_t j = y + 1; j < V; j++) {
        float e = expf(z[j] - m);
        scratch[j] = e;
        rest_hi += e;
        zsum_hi += z[j];
    }
    const float ey = expf(zy - m);
    scratch[y] = ey;
    const double rest = (double)rest_lo + (double)rest_hi;
    const double zsum = (double)zsum_lo + (double)zsum_hi + zy;
    const double total = rest + ey;
    const double log_total = log(total);
    const float inv_total = (float)(1.0 / total);
    const float lse = m + (float)log_total;
    const float lp_y = (float)((double)zy - m - log_total);
    const float p_y = (float)(ey / total);
    const float omp_y = (float)(rest / total);
    const float eps_i = q->eps / (float)(V - 1);
    const float nll = -lp_y;
    /* Without smoothing there is no smoothing term: a masked class (z_j = -inf) makes zsum -inf and
       0 * inf nan. The caller's flag, not a test of eps or zsum here, so that -ffast-math (finite math
       only, signed zeros ignored) cannot fold `eps_i == 0 ? 0 : eps_i * x` into `eps_i * x`. */
    float loss = q->smooth ? (1.0f - q->eps - eps_i) * nll - eps_i * (float)(zsum - (double)V * lse) : nll;
    float grad_y;
    if (q->rho != 0.0f) {
        const float w_y = q->rho * (1.0f - q->eps_b);
        const float w_all = q->rho * q->eps_b / (float)V;
        const float d = w_y * bonus_grad(p_y, omp_y, q);
        loss += w_y * bonus(p_y, omp_y, q);
        if (q->eps_b > 0.0f) {
            /* pass 3: sum_j b(p_j) and c_j = w_all b'(p_j) (kept in grad), s_hat = sum_j c_j p_j */
            float bsum_f = 0.0f, s_hat_f = 0.0f;
            pass3(scratch, inv_total, V, q, w_all, grad, &bsum_f, &s_hat_f);
            double bsum = bsum_f, s_hat = s_hat_f;
            /* 1 - p in float32 is inexact only for p >= 1/2, which at most one j can reach:
               replace that entry's terms by the ones from the exact 1 - p. */
            int64_t jbig = -1;
            if (p_y >= 0.5f) jbig = y;
            else if (inv_total >= 0.5f) {  /* e_j = 1 at the max: p_max = 1/total */
                for (int64_t j = 0; j < V; j++) if (z[j] == m) { jbig = j; break; }
            }
            if (jbig >= 0) {
                float p = scratch[jbig] * inv_total;
                float omp_exact = jbig == y ? omp_y : -expm1f(z[jbig] - lse);
                float c_exact = w_all * bonus_grad(p, omp_exact, q);
                bsum += bonus(p, omp_exact, q) - bonus(p, 1.0f - p, q);
                s_hat += (double)(c_exact - grad[jbig]) * p;
                grad[jbig] = c_exact;
            }
            loss += w_all * (float)bsum;
            const float c_y = grad[y];
            const float s_tot = (float)s_hat + d * p_y;
            /* pass 4: p_k (1 + c_k - s) - eps_i */
            for (int64_t j = 0; j < V; j++) {
                float p = scratch[j] * inv_total;
                grad[j] = p * (1.0f + grad[j] - s_tot) - eps_i;
            }
            grad_y = q->eps - omp_y + p_y * (c_y - (float)s_hat + d * omp_y);
        } else {
            const float s_tot = d * p_y;
            for (int64_t j = 0; j < V; j++) grad[j] = scratch[j] * inv_total * (1.0f - s_tot) - eps_i;
            grad_y = q->eps - omp_y + p_y * d * omp_y;
        }
    } else {
        for (int64_t j = 0; j < V; j++) grad[j] = scratch[j] * inv_total - eps_i;
        grad_y = q->eps - omp_y;
    }
    grad[y] = grad_y;
    *loss_out = loss;
    *nll_out = nll;
    stats_out[0] = zy;
    stats_out[1] = zy - other;
}

int el_forward(const float *logits, const int64_t *target, int64_t n_rows, int64_t V, int64_t ignore_index,
               int has_ignore, float eps, int smooth, float eps_b, float rho, int kind, float log_end, float gamma,
               float start, float b_start, float *loss, float *nll, float *stats, float *grad, int threads) {
    params_t q = {eps, eps_b, rho, log_end, gamma, start, b_start, kind, smooth};
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = (float *)malloc(sizeof(float) * (size_t)V);
        /* grad == NULL: the loss only (no gradient wanted, e.g. validation under torch.no_grad);
           the row's c_j and gradient go to one per-thread row instead of an N x V buffer. */
        float *grad_row = grad ? NULL : (float *)malloc(sizeof(float) * (size_t)V);
        if (!scratch || (!grad && !grad_row)) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n_rows; i++) {
            if (!scratch || (!grad && !grad_row)) continue;
            const int64_t y = target[i];
            float *g = grad ? grad + i * V : grad_row;
            if ((has_ignore && y == ignore_index) || y < 0 || y >= V) {
                if (grad) memset(g, 0, sizeof(float) * (size_t)V);
                loss[i] = 0.0f;
                nll[i] = 0.0f;
                stats[2 * i] = 0.0f;
                stats[2 * i + 1] = 0.0f;
                continue;
            }
            row(logits + i * V, y, V, &q, scratch, g, loss + i, nll + i, stats + 2 * i);
        }
        free(scratch);
        free(grad_row);
    }
    return failed;
}

/* Softmax cross-entropy over rows of logits, fused: loss and logit gradient in one sweep per row.
 *
 * For each row x (V logits, fp32 or bf16) with target t it writes g = softmax(x) - onehot(t)
 * (fp32 or bf16, rounded to nearest even) and returns nll = logsumexp(x) - x[t] in fp32.
 * Three passes per row (max; exp and sum into an fp32 scratch row; scale, subtract, store);
 * the row stays in cache between them, so memory sees one read and one write, and no fp32
 * copy of a bf16 chunk is ever made. Rows run in parallel (OpenMP).
 *
 * Plain C without torch headers: it compiles in about a second, and the loops are written so
 * the compiler vectorises them for whatever -march it is given (no fast-math: NaNs propagate).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? 0x7fc0u : rounded);
}

/* exp(d) for d <= 0 (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp).
 * Below -87 it is 0 (fp32's smallest normal number is e^-87.3; -inf gives 0, as a masked logit
 * must). A NaN stays NaN. */
static inline float exp_nonpositive(float d) {
    float below = d < -87.0f ? 0.0f : 1.0f;
    d = d < -87.0f ? -87.0f : d;
    float n = rintf(d * 1.44269504088896341f);
    float r = d - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale * below;
}

/* One row: x -> (g, nll) with g written over `scratch` (V floats; may be x itself). */
static float row_f32(const float *x, int64_t v, int64_t t, float *scratch) {
    float m = -INFINITY, xt = x[t];
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < v; j++) m = x[j] > m ? x[j] : m;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < v; j++) {
        scratch[j] = exp_nonpositive(x[j] - m);
        s += scratch[j];
    }
    float nll = m + logf(s) - xt;
    float inv = 1.0f / s;
#pragma omp simd
    for (int64_t j = 0; j < v; j++) scratch[j] *= inv;
    scratch[t] -= 1.0f;
    return nll;
}

static float row_bf16(const uint16_t *x, int64_t v, int64_t t, float *scratch, uint16_t *g) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < v; j++) {
        float xj = bf16_to_float(x[j]);
        m = xj > m ? xj : m;
    }
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < v; j++) {
        scratch[j] = exp_nonpositive(bf16_to_float(x[j]) - m);
        s += scratch[j];
    }
    float nll = m + logf(s) - bf16_to_float(x[t]);
    float inv = 1.0f / s;
#pragma omp simd
    for (int64_t j = 0; j < v; j++) g[j] = float_to_bf16(scratch[j] * inv);
    g[t] = float_to_bf16(scratch[t] * inv - 1.0f);
    return nll;
}

/* logits (rows x v, row stride ld_x), grad (rows x v, row stride ld_g), targets in [0, v).
 * bf16 != 0: both are bf16, else both fp32 (grad may be the logits themselves). */
int gpt2_xent_rows(const void *logits, void *grad, const int64_t *targets, float *nll, int64_t rows,
                   int64_t v, int64_t ld_x, int64_t ld_g, int bf16, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scratch = bf16 ? (float *)malloc((size_t)v * sizeof(float)) : NULL;
        if (bf16 && scratch == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < rows; i++) {
            if (failed) continue;
            if (bf16) {
                nll[i] = row_bf16((const uint16_t *)logits + i * ld_x, v, targets[i], scratch,
                                  (uint16_t *)grad + i * ld_g);
            } else {
                float *g = (float *)grad + i * ld_g;
                if ((const float *)logits + i * ld_x != g) memcpy(g, (const float *)logits + i * ld_x, (size_t)v * sizeof(float));
                nll[i] = row_f32(g, v, targets[i], g);
            }
        }
        free(scratch);
    }
    return failed;
}

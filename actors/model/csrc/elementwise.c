/* The per-layer elementwise work of the CPU forward pass, one call each instead of 5-15 torch
   ops (see cpu_kernels.py): residual add + RMSNorm, SiLU-and-multiply, rotary embedding +
   KV store. fp32 arithmetic; an output meant for a bf16 projection is written in bf16 directly.
   Rows are independent: a row's values do not depend on the other rows of the batch. */
#include <stdint.h>
#include <math.h>
#include "fastmath.h"

static inline void store(void *out, int bf16, int64_t i, float x)
{
    if (bf16) ((uint16_t *)out)[i] = fs_to_bf16(x);
    else ((float *)out)[i] = x;
}

/* dst[d] = src[s], both fp32 or both bf16: a value already stored, copied bit for bit. */
static inline void copy(void *dst, const void *src, int bf16, int64_t d, int64_t s)
{
    if (bf16) ((uint16_t *)dst)[d] = ((const uint16_t *)src)[s];
    else ((float *)dst)[d] = ((const float *)src)[s];
}

/* h[T, H] += delta (if not NULL); then, if w is not NULL, out = h / rms(h) * w
   (transformers' LlamaRMSNorm in fp32: h * rsqrt(mean(h^2) + eps) * w). */
void add_rms_norm(float *h, const float *delta, const float *w, void *out, int out_bf16,
                  int64_t T, int64_t H, float eps)
{
    #pragma omp parallel for schedule(static) if (T > 8)
    for (int64_t t = 0; t < T; ++t) {
        float *ht = h + t * H;
        float ss = 0.0f;
        if (delta) {
            const float *dt = delta + t * H;
            #pragma omp simd reduction(+:ss)
            for (int64_t i = 0; i < H; ++i) {
                ht[i] += dt[i];
                ss += ht[i] * ht[i];
            }
        } else {
            #pragma omp simd reduction(+:ss)
            for (int64_t i = 0; i < H; ++i) ss += ht[i] * ht[i];
        }
        if (!w) continue;
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + t * H;
            #pragma omp simd
            for (int64_t i = 0; i < H; ++i) o[i] = fs_to_bf16(w[i] * (ht[i] * r));
        } else {
            float *o = (float *)out + t * H;
            #pragma omp simd
            for (int64_t i = 0; i < H; ++i) o[i] = w[i] * (ht[i] * r);
        }
    }
}

/* gate_up [T, 2I] (gate then up) -> out [T, I] = silu(gate) * up. */
void silu_mul(const float *gate_up, void *out, int out_bf16, int64_t T, int64_t I)
{
    #pragma omp parallel for schedule(static) if (T > 8)
    for (int64_t t = 0; t < T; ++t) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + t * I;
            #pragma omp simd
            for (int64_t i = 0; i < I; ++i) o[i] = fs_to_bf16(g[i] / (1.0f + fs_exp(-g[i])) * u[i]);
        } else {
            float *o = (float *)out + t * I;
            #pragma omp simd
            for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.0f + fs_exp(-g[i])) * u[i];
        }
    }
}

/* qkv [T, (H + 2 HKV) D] -> q [T, H, D] fp32 rotated; k rotated and v as stored (fp32 or bf16)
   into k_new / v_new [T, HKV, D] and into the cache's slots (k_cache / v_cache: one layer,
   [slots, HKV, D]); a negative slot (a padding row of a CUDA-graph bucket) is not stored.
   Rotate-half convention: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), cos/sin rows
   [max_len, D / 2] picked by position. */
void rope_store(const float *qkv, const float *cos_t, const float *sin_t, const int64_t *pos,
                const int64_t *slots, float *q, void *k_new, void *v_new, void *k_cache,
                void *v_cache, int kv_bf16, int64_t T, int64_t H, int64_t HKV, int64_t D)
{
    const int64_t half = D / 2, width = (H + 2 * HKV) * D, kv = HKV * D;
    #pragma omp parallel for schedule(static) if (T > 8)
    for (int64_t t = 0; t < T; ++t) {
        const float *c = cos_t + pos[t] * half, *s = sin_t + pos[t] * half;
        const float *row = qkv + t * width;
        for (int64_t h = 0; h < H; ++h) {
            const float *x = row + h * D;
            float *o = q + (t * H + h) * D;
            #pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                o[i] = x[i] * c[i] - x[i + half] * s[i];
                o[i + half] = x[i + half] * c[i] + x[i] * s[i];
            }
        }
        const int keep = slots[t] >= 0;
        for (int64_t h = 0; h < HKV; ++h) {
            const float *x = row + (H + h) * D;
            const int64_t at = t * kv + h * D, slot = (keep ? slots[t] : 0) * kv + h * D;
            #pragma omp simd
            for (int64_t i = 0; i < half; ++i) {
                const float a = x[i] * c[i] - x[i + half] * s[i];
                const float b = x[i + half] * c[i] + x[i] * s[i];
                store(k_new, kv_bf16, at + i, a);
                store(k_new, kv_bf16, at + i + half, b);
            }
            const float *y = row + (H + HKV + h) * D;
            #pragma omp simd
            for (int64_t i = 0; i < D; ++i) store(v_new, kv_bf16, at + i, y[i]);
            if (!keep) continue;
            #pragma omp simd
            for (int64_t i = 0; i < D; ++i) {
                copy(k_cache, k_new, kv_bf16, slot + i, at + i);
                copy(v_cache, v_new, kv_bf16, slot + i, at + i);
            }
        }
    }
}

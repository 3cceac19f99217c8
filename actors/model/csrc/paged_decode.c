/* Decode attention on the paged KV cache, one task per sequence (see cpu_kernels.py).

   q, out: [B, H, D] fp32; k, v: [num_blocks, BS, HKV, D] of one layer, fp32 or bf16;
   tables: [B, W] int64 block ids; lens: [B] int64 context lengths (the new token included,
   its KV already in the cache). A block's K (then V) rows of all KV heads are one contiguous
   run of BS * HKV * D elements; rows are read in token order, a few tokens prefetched ahead.
   Scores, softmax and the weighted sum are fp32 whatever the cache holds; a bf16 element is
   widened exactly (its bits are the top half of the fp32 value). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include "fastmath.h"

static inline float load_f32(const float *p, int64_t i) { return p[i]; }

static inline float load_bf16(const uint16_t *p, int64_t i) { return fs_from_bf16(p[i]); }

/* Token t of a sequence in pages P: row t % BS of block tab[t / BS]. */
#define TOKEN_ROW(P, t) ((P) + tab[(t) / BS] * blk + ((t) % BS) * row)
enum { AHEAD = 4 }; /* tokens prefetched ahead of the one being read */

#define DEFINE_PAGED_DECODE(NAME, T, LOAD)                                                     \
void NAME(const float *q, const T *k, const T *v, const int64_t *tables, const int64_t *lens,  \
          float *out, int64_t B, int64_t H, int64_t HKV, int64_t D, int64_t BS, int64_t W,     \
          float scale)                                                                         \
{                                                                                              \
    const int64_t G = H / HKV;                                                                 \
    const int64_t row = HKV * D; /* elements between consecutive tokens of a block */          \
    const int64_t blk = BS * row; /* elements per block */                                     \
    const int64_t line = 64 / (int64_t)sizeof(T); /* elements per cache line */                \
    _Pragma("omp parallel")                                                                    \
    {                                                                                          \
        float *scores = NULL;                                                                  \
        int64_t cap = 0;                                                                       \
        _Pragma("omp for schedule(dynamic, 1)")                                                \
        for (int64_t b = 0; b < B; ++b) {                                                      \
            const int64_t L = lens[b];                                                         \
            if (H * L > cap) {                                                                 \
                free(scores);                                                                  \
                cap = H * L;                                                                   \
                scores = (float *)malloc((size_t)cap * sizeof(float));                         \
            }                                                                                  \
            const float *qb = q + b * H * D;                                                   \
            const int64_t *tab = tables + b * W;                                               \
            for (int64_t t = 0; t < L; ++t) { /* scores of every head against K row t */       \
                for (int64_t c = 0; t + AHEAD < L && c < row; c += line)                       \
                    __builtin_prefetch(TOKEN_ROW(k, t + AHEAD) + c);                           \
                const T *kp = TOKEN_ROW(k, t);                                                 \
                for (int64_t h = 0; h < H; ++h) {                                              \
                    const float *qh = qb + h * D;                                              \
                    const T *kh = kp + (h / G) * D;                                            \
                    float s = 0.f;                                                             \
                    _Pragma("omp simd reduction(+:s)")                                         \
                    for (int64_t d = 0; d < D; ++d) s += qh[d] * LOAD(kh, d);                  \
                    scores[h * L + t] = s * scale;                                             \
                }                                                                              \
            }                                                                                  \
            float inv[1024]; /* H <= 1024 is checked by the caller */                          \
            for (int64_t h = 0; h < H; ++h) {                                                  \
                float *sh = scores + h * L, m = -FLT_MAX, sum = 0.f;                           \
                for (int64_t t = 0; t < L; ++t) m = sh[t] > m ? sh[t] : m;                     \
                for (int64_t t = 0; t < L; ++t) { sh[t] = fs_exp(sh[t] - m); sum += sh[t]; }   \
                inv[h] = 1.f / sum;                                                            \
            }                                                                                  \
            float *ob = out + b * H * D;                                                       \
            for (int64_t i = 0; i < H * D; ++i) ob[i] = 0.f;                                   \
            for (int64_t t = 0; t < L; ++t) { /* the weighted sum of V rows */                 \
                for (int64_t c = 0; t + AHEAD < L && c < row; c += line)                       \
                    __builtin_prefetch(TOKEN_ROW(v, t + AHEAD) + c);                           \
                const T *vp = TOKEN_ROW(v, t);                                                 \
                for (int64_t h = 0; h < H; ++h) {                                              \
                    const float p = scores[h * L + t];                                         \
                    const T *vh = vp + (h / G) * D;                                            \
                    float *oh = ob + h * D;                                                    \
                    _Pragma("omp simd")                                                        \
                    for (int64_t d = 0; d < D; ++d) oh[d] += p * LOAD(vh, d);                 \
                }                                                                              \
            }                                                                                  \
            for (int64_t h = 0; h < H; ++h)                                                    \
                for (int64_t d = 0; d < D; ++d) ob[h * D + d] *= inv[h];                       \
        }                                                                                      \
        free(scores);                                                                          \
    }                                                                                          \
}

DEFINE_PAGED_DECODE(paged_decode_f32, float, load_f32)
DEFINE_PAGED_DECODE(paged_decode_bf16, uint16_t, load_bf16)

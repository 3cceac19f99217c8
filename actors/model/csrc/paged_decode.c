/* Decode attention on the paged KV cache, one task per sequence (see cpu_kernels.py).

   q, out: [B, H, D] fp32; k, v: [num_blocks, BS, HKV, D] of one layer, fp32 or bf16;
   tables: [B, W] int64 block ids; lens: [B] int64 context lengths (the new token included,
   its KV already in the cache). Token t of a sequence is row t % BS of block tables[t / BS]
   (offsets computed once per sequence).
   Scores, softmax and the weighted sum are fp32 whatever the cache holds; a bf16 element is
   widened exactly (its bits are the top half of the fp32 value).

   Each K (then V) row is read whole, in token order, and widened once for the G query heads
   that share each of its KV heads (GQA). With AVX-512 and D % 16 == 0, the scores of 16 tokens
   are summed across lanes together (a shuffle tree instead of 16 horizontal sums) and the V
   rows are accumulated 16 lanes at a time; otherwise plain loops the compiler vectorizes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#include "fastmath.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    int64_t H, HKV, D, BS, row, blk; /* row: elements per token of a block; blk: per block */
} Geometry;

enum { AHEAD = 16, TILE = 16 }; /* AHEAD: about one block */

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const uint16_t *p, int64_t i) { return fs_from_bf16(p[i]); }

#if defined(__AVX512F__)
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t *p)
{
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* v[0..16) -> one vector whose lane t is the sum of v[t]'s 16 lanes. */
static inline __m512 sum_lanes16(const __m512 v[16])
{
    __m512 a[8], b[4], c[2];
    for (int j = 0; j < 8; ++j) /* quarters 0,1: token 2j; 2,3: token 2j+1 */
        a[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
    for (int i = 0; i < 4; ++i) /* quarter k: token 4i + k */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int m = 0; m < 2; ++m) /* quarter k: 2 lanes of token 8m + k, 2 of 8m + 4 + k */
        c[m] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * m], b[2 * m + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * m], b[2 * m + 1], 0xEE));
    /* lane 4k + j: token 4j + k */
    const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                                   _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, d);
}
#endif

#define TOKEN_ROW(P, t) ((P) + rows[t])

#define PREFETCH_AHEAD(P, t, L)                                                                \
    do {                                                                                       \
        if ((t) + AHEAD < (L))                                                                 \
            for (int64_t c_ = 0; c_ < g.row; c_ += 64 / (int64_t)sizeof(*(P)))                 \
                __builtin_prefetch(TOKEN_ROW(P, (t) + AHEAD) + c_);                            \
    } while (0)

#if defined(__AVX512F__)
/* Tiles of 16 tokens: their K rows (all KV heads) widened into buf [HKV][16][D], then per
   query head 16 dot products summed across lanes at once. */
#define SIMD_SCORES(LOAD16)                                                                    \
    if (g.D % 16 == 0) {                                                                       \
        for (int64_t t0 = 0; t0 < L; t0 += TILE) {                                             \
            const int64_t n = L - t0 < TILE ? L - t0 : TILE;                                   \
            for (int64_t j = 0; j < TILE; ++j) {                                               \
                const int64_t t = t0 + (j < n ? j : 0); /* pad with a real row: unused */      \
                PREFETCH_AHEAD(k, t, L);                                                       \
                for (int64_t hk = 0; hk < g.HKV; ++hk)                                         \
                    for (int64_t d = 0; d < g.D; d += 16)                                      \
                        _mm512_storeu_ps(buf + (hk * TILE + j) * g.D + d,                      \
                                         LOAD16(TOKEN_ROW(k, t) + hk * g.D + d));              \
            }                                                                                  \
            for (int64_t h = 0; h < g.H; ++h) {                                                \
                const float *kf = buf + (h / G) * TILE * g.D;                                  \
                __m512 acc[TILE];                                                              \
                for (int j = 0; j < TILE; ++j) acc[j] = _mm512_setzero_ps();                   \
                for (int64_t d = 0; d < g.D; d += 16) {                                        \
                    const __m512 qv = _mm512_loadu_ps(qb + h * g.D + d);                       \
                    for (int j = 0; j < TILE; ++j)                                             \
                        acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kf + j * g.D + d), acc[j]); \
                }                                                                              \
                const __m512 s = _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale));       \
                _mm512_mask_storeu_ps(scores + h * L + t0, (__mmask16)((1u << n) - 1u), s);     \
            }                                                                                  \
        }                                                                                      \
        return;                                                                                \
    }
/* Each V row widened 16 lanes at a time, once for the G query heads sharing it. */
#define SIMD_VALUES(T, LOAD16)                                                                 \
    if (g.D % 16 == 0) {                                                                       \
        for (int64_t t = 0; t < L; ++t) {                                                      \
            PREFETCH_AHEAD(v, t, L);                                                           \
            const T *vp = TOKEN_ROW(v, t);                                                     \
            for (int64_t hk = 0; hk < g.HKV; ++hk)                                             \
                for (int64_t d = 0; d < g.D; d += 16) {                                        \
                    const __m512 x = LOAD16(vp + hk * g.D + d);                                \
                    for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {                          \
                        float *o = ob + h * g.D + d;                                           \
                        const __m512 p = _mm512_set1_ps(scores[h * L + t]);                    \
                        _mm512_storeu_ps(o, _mm512_fmadd_ps(p, x, _mm512_loadu_ps(o)));       \
                    }                                                                          \
                }                                                                              \
        }                                                                                      \
        return;                                                                                \
    }
#else
#define SIMD_SCORES(LOAD16)
#define SIMD_VALUES(T, LOAD16)
#endif

#define DEFINE_PAGED_DECODE(SUFFIX, T, LOAD, LOAD16)                                           \
/* scores[h * L + t] = scale * q_h . K_t (the KV head of h) */                                 \
static void scores_##SUFFIX(const float *qb, const T *k, const int64_t *rows, int64_t L,       \
                            Geometry g, float scale, float *scores, float *buf)                \
{                                                                                              \
    const int64_t G = g.H / g.HKV;                                                             \
    SIMD_SCORES(LOAD16)                                                                        \
    for (int64_t t = 0; t < L; ++t) { /* the row widened once for all heads */                 \
        PREFETCH_AHEAD(k, t, L);                                                               \
        const T *kp = TOKEN_ROW(k, t);                                                         \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < g.row; ++i) buf[i] = LOAD(kp, i);                              \
        for (int64_t h = 0; h < g.H; ++h) {                                                    \
            const float *qh = qb + h * g.D, *kh = buf + (h / G) * g.D;                         \
            float s = 0.f;                                                                     \
            _Pragma("omp simd reduction(+:s)")                                                 \
            for (int64_t d = 0; d < g.D; ++d) s += qh[d] * kh[d];                              \
            scores[h * L + t] = s * scale;                                                     \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
/* ob[h] = sum_t scores[h * L + t] * V_t (the KV head of h) */                                 \
static void values_##SUFFIX(const T *v, const int64_t *rows, int64_t L, Geometry g,            \
                            const float *scores, float *ob, float *buf)                        \
{                                                                                              \
    const int64_t G = g.H / g.HKV;                                                             \
    for (int64_t i = 0; i < g.H * g.D; ++i) ob[i] = 0.f;                                       \
    SIMD_VALUES(T, LOAD16)                                                                     \
    for (int64_t t = 0; t < L; ++t) {                                                          \
        PREFETCH_AHEAD(v, t, L);                                                               \
        const T *vp = TOKEN_ROW(v, t);                                                         \
        _Pragma("omp simd")                                                                    \
        for (int64_t i = 0; i < g.row; ++i) buf[i] = LOAD(vp, i);                              \
        for (int64_t h = 0; h < g.H; ++h) {                                                    \
            const float p = scores[h * L + t], *vh = buf + (h / G) * g.D;                      \
            float *oh = ob + h * g.D;                                                          \
            _Pragma("omp simd")                                                                \
            for (int64_t d = 0; d < g.D; ++d) oh[d] += p * vh[d];                              \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
void paged_decode_##SUFFIX(const float *q, const T *k, const T *v, const int64_t *tables,     \
                           const int64_t *lens, float *out, int64_t B, int64_t H, int64_t HKV, \
                           int64_t D, int64_t BS, int64_t W, float scale)                      \
{                                                                                              \
    const Geometry g = {H, HKV, D, BS, HKV * D, BS * HKV * D};                                 \
    _Pragma("omp parallel")                                                                    \
    {                                                                                          \
        float *scores = NULL;                                                                  \
        int64_t *rows = NULL; /* element offset of each token's row */                         \
        float *buf = (float *)malloc((size_t)TILE * HKV * D * sizeof(float));                        \
        int64_t cap = 0;                                                                       \
        _Pragma("omp for schedule(dynamic, 1)")                                                \
        for (int64_t b = 0; b < B; ++b) {                                                      \
            const int64_t L = lens[b];                                                         \
            if (L > cap) {                                                                     \
                free(scores);                                                                  \
                free(rows);                                                                    \
                cap = L;                                                                       \
                scores = (float *)malloc((size_t)(H * cap) * sizeof(float));                   \
                rows = (int64_t *)malloc((size_t)cap * sizeof(int64_t));                       \
            }                                                                                  \
            for (int64_t t = 0; t < L; ++t)                                                    \
                rows[t] = tables[b * W + t / BS] * g.blk + (t % BS) * g.row;                   \
            scores_##SUFFIX(q + b * H * D, k, rows, L, g, scale, scores, buf);                 \
            float inv[1024]; /* H <= 1024 is checked by the caller */                          \
            for (int64_t h = 0; h < H; ++h) {                                                  \
                float *sh = scores + h * L, m = -FLT_MAX, sum = 0.f;                           \
                for (int64_t t = 0; t < L; ++t) m = sh[t] > m ? sh[t] : m;                     \
                for (int64_t t = 0; t < L; ++t) { sh[t] = fs_exp(sh[t] - m); sum += sh[t]; }   \
                inv[h] = 1.f / sum;                                                            \
            }                                                                                  \
            float *ob = out + b * H * D;                                                       \
            values_##SUFFIX(v, rows, L, g, scores, ob, buf);                                   \
            for (int64_t h = 0; h < H; ++h)                                                    \
                for (int64_t d = 0; d < D; ++d) ob[h * D + d] *= inv[h];                       \
        }                                                                                      \
        free(scores);                                                                          \
        free(rows);                                                                            \
        free(buf);                                                                             \
    }                                                                                          \
}

DEFINE_PAGED_DECODE(f32, float, load_f32, load16_f32)
DEFINE_PAGED_DECODE(bf16, uint16_t, load_bf16, load16_bf16)

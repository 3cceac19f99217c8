/* y = x @ W^T with bf16 x and W and an fp32 y, on AVX512-BF16 (see cpu_kernels.py).

   W is packed once at load time in 16-column panels, each k-pair of a panel one 64-byte
   vector: [N/16][K/2][16][2] (the pair layout vdpbf16ps consumes). A tile of up to 6 rows of x
   by up to 4 panels (64 columns) keeps its 24 accumulators in registers; x pairs are
   broadcast. Every output sums over k in the same order whatever M, the tile or the thread:
   a row's result does not depend on the other rows of the batch. */
#include <stdint.h>
#include <immintrin.h>

#ifndef __AVX512BF16__
#error "linear_bf16.c needs AVX512-BF16 (-march=native on a CPU that has it)"
#endif

enum { MR = 6, NP = 4, PANEL = 16 };

static inline __attribute__((always_inline)) void tile(
    const uint16_t *x, int64_t K, const uint16_t *w, float *y, int64_t N, const int mr,
    const int np, const int prefetch)
{
    __m512 acc[MR][NP];
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < np; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t panel = K * PANEL; /* bf16 elements per panel */
    for (int64_t kp = 0; kp < K / 2; ++kp) {
        __m512bh wv[NP];
        for (int j = 0; j < np; ++j) {
            const uint16_t *p = w + j * panel + kp * 2 * PANEL;
            if (prefetch) _mm_prefetch((const char *)(p + 16 * PANEL), _MM_HINT_T0);
            wv[j] = (__m512bh)_mm512_loadu_si512(p);
        }
        for (int i = 0; i < mr; ++i) {
            int32_t pair;
            __builtin_memcpy(&pair, x + i * K + 2 * kp, sizeof pair);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            for (int j = 0; j < np; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, wv[j]);
        }
    }
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < np; ++j) _mm512_storeu_ps(y + i * N + j * PANEL, acc[i][j]);
}

#define CASE_NP(R, P) case P: tile(xm, K, wg, ym, N, R, P, prefetch); break;
#define CASE_MR(R) case R: switch (np) { CASE_NP(R, 1) CASE_NP(R, 2) CASE_NP(R, 3) CASE_NP(R, 4) } break;

/* x: [M, K] bf16, w: packed [N/16][K/2][16][2] bf16, y: [M, N] fp32; N % 16 == 0, K even. */
void linear_bf16(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K)
{
    const int64_t panels = N / PANEL, groups = (panels + NP - 1) / NP;
    const int prefetch = M <= MR; /* streaming the weights once: fetch ahead of the loads */
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
        const int np = (int)(panels - g * NP < NP ? panels - g * NP : NP);
        const uint16_t *wg = w + g * NP * K * PANEL;
        for (int64_t m = 0; m < M; m += MR) {
            const int mr = (int)(M - m < MR ? M - m : MR);
            const uint16_t *xm = x + m * K;
            float *ym = y + m * N + g * NP * PANEL;
            switch (mr) { CASE_MR(1) CASE_MR(2) CASE_MR(3) CASE_MR(4) CASE_MR(5) CASE_MR(6) }
        }
    }
}

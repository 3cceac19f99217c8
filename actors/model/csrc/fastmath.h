/* Small float helpers shared by the kernels, written as plain arithmetic so that the loops
   calling them vectorize (no libm calls, no -ffast-math). */
#ifndef FLUIDSERVE_FASTMATH_H
#define FLUIDSERVE_FASTMATH_H
#include <stdint.h>
#include <string.h>
#include <math.h>

/* exp(x) within 1 ulp for x in [-87.3, 88.7]: 0 below (and for -inf), clamped above.
   Cephes' expf: x = n ln2 + f, |f| <= ln2 / 2, a degree-6 polynomial for e^f, 2^n from bits. */
static inline float fs_exp(float x)
{
    const float lo = -87.3f, hi = 88.7f;
    const float xc = x < lo ? lo : (x > hi ? hi : x);
    const float n = floorf(xc * 1.44269504088896341f + 0.5f);
    /* Cody-Waite: ln 2 in two parts; fmaf so that -fassociative-math cannot merge them. */
    float f = fmaf(n, -0.693359375f, xc);
    f = fmaf(n, 2.12194440e-4f, f);
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    const float r = p * f * f + f + 1.0f;
    /* 2^n as (2^(n/2))^2 keeps n = 128 representable. */
    const int32_t half = (int32_t)n / 2;
    const int32_t b1 = (half + 127) << 23, b2 = ((int32_t)n - half + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return x < lo ? 0.0f : r * s1 * s2;
}

/* fp32 -> bf16 bits, round to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN. */
static inline uint16_t fs_to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return x != x ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

static inline float fs_from_bf16(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

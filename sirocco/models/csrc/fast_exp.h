/* e^x in float arithmetic only, shared by the kernels (included, not compiled on its own). */
#ifndef SIROCCO_FAST_EXP_H
#define SIROCCO_FAST_EXP_H

#include <stdint.h>
#include <string.h>

/* e^x to about 1 ulp for x clamped to [-87, hi] (hi <= 88), in float arithmetic only, so
 * that the compiler vectorizes it: the magic constant rounds x * log2(e) to an integer n in
 * the low bits of t; Cephes' polynomial gives e^r. */
static inline float exp_clamped(float x, const float hi) {
    x = x < -87.0f ? -87.0f : x;
    x = x > hi ? hi : x;
    const float t = x * 1.44269504f + 12582912.0f;  /* 1.5 * 2^23 */
    const float n = t - 12582912.0f;
    int32_t ti;
    memcpy(&ti, &t, sizeof ti);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (ti - 0x4B400000 + 127) << 23;  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#endif

/* 16 floats as one value, shared by the kernels (included, not compiled on its own).
 *
 * A vector register where the CPU has 512-bit ones, two or four otherwise (GCC and Clang
 * vector extensions; element-wise operations only), so that a kernel can keep a block of
 * accumulators in registers. Every operation is element-wise with one rounding each: the
 * arithmetic of a lane is that of plain float code. */
#ifndef SIROCCO_LANES_H
#define SIROCCO_LANES_H

#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ilanes_t __attribute__((vector_size(LANES * sizeof(int32_t))));

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* a * b + c, one rounding */
static inline lanes_t fma_lanes(lanes_t a, lanes_t b, lanes_t c) {
#if defined(__AVX512F__)
    return (lanes_t)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
    lanes_t out;
    for (int l = 0; l < LANES; l++) out[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return out;
#endif
}

/* v in every lane (a broadcast, no arithmetic: `(lanes_t){0} + v` would add a zero) */
static inline lanes_t splat(float v) {
#if defined(__AVX512F__)
    return (lanes_t)_mm512_set1_ps(v);
#else
    lanes_t out;
    for (int l = 0; l < LANES; l++) out[l] = v;
    return out;
#endif
}

static inline lanes_t load_lanes(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store_lanes(float *p, lanes_t v) { memcpy(p, &v, sizeof v); }

/* bfloat16: the top half of a float32, so widening is exact; narrowing rounds to nearest
 * even, as PyTorch rounds. */
static inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* LANES bfloat16 values, widened */
static inline lanes_t load_bf16_lanes(const uint16_t *p) {
#if defined(__AVX512F__)
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (lanes_t)_mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
#else
    lanes_t out;
    for (int l = 0; l < LANES; l++) out[l] = from_bf16(p[l]);
    return out;
#endif
}

/* LANES values from element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array */
static inline lanes_t load_any_lanes(const void *p, int64_t i, const int bf16) {
    return bf16 ? load_bf16_lanes((const uint16_t *)p + i) : load_lanes((const float *)p + i);
}

/* one value of such an array, as a float */
static inline float load_any(const void *p, int64_t i, const int bf16) {
    return bf16 ? from_bf16(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* v into element i of such an array (rounded to nearest even for bfloat16) */
static inline void store_any(void *p, int64_t i, float v, const int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = to_bf16(v);
    else
        ((float *)p)[i] = v;
}

#endif

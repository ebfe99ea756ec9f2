/* Vectors shared by the kernels (included, not compiled on its own).
 *
 * `lanes_t`: 16 floats as one value (GCC and Clang vector extensions; element-wise
 * operations only), the unit of the kernels' layouts (a tile of 16 outputs, a group of 16
 * key positions). One register where the CPU has 512-bit ones; elsewhere the compiler splits
 * it, and GCC spills such values to memory where there are no 512-bit registers (the kernels
 * ran 5-9x slower on an AVX2 machine), so a kernel's hot loop goes through `vec_t`: one
 * machine register of VEC floats (16 with AVX-512, 8 with AVX2 and FMA, 16 as a `lanes_t`
 * otherwise), LANES / VEC of them per group of lanes.
 *
 * Every operation is element-wise with one rounding each: the arithmetic of a lane is that
 * of plain float code, the same in every build. */
#ifndef SIROCCO_LANES_H
#define SIROCCO_LANES_H

#include <stdint.h>
#include <string.h>

#define LANES 16

typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ilanes_t __attribute__((vector_size(LANES * sizeof(int32_t))));

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SIROCCO_AVX2 1  /* 16 registers of 8 floats: the kernels' blocks are sized for it */
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

/* -- vec_t: one machine register ------------------------------------------------------- */

#if defined(__AVX512F__)
#define VEC 16
typedef __m512 vec_t;
static inline vec_t vec_splat(float v) { return _mm512_set1_ps(v); }
static inline vec_t vec_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vec_store(float *p, vec_t v) { _mm512_storeu_ps(p, v); }
static inline vec_t vec_fma(vec_t a, vec_t b, vec_t c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec_t vec_mul(vec_t a, vec_t b) { return _mm512_mul_ps(a, b); }
static inline vec_t vec_load_bf16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#elif defined(SIROCCO_AVX2)
#define VEC 8
typedef __m256 vec_t;
static inline vec_t vec_splat(float v) { return _mm256_set1_ps(v); }
static inline vec_t vec_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vec_store(float *p, vec_t v) { _mm256_storeu_ps(p, v); }
static inline vec_t vec_fma(vec_t a, vec_t b, vec_t c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec_t vec_mul(vec_t a, vec_t b) { return _mm256_mul_ps(a, b); }
static inline vec_t vec_load_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
#else
#define VEC LANES
typedef lanes_t vec_t;
static inline vec_t vec_splat(float v) { return splat(v); }
static inline vec_t vec_load(const float *p) { return load_lanes(p); }
static inline void vec_store(float *p, vec_t v) { store_lanes(p, v); }
static inline vec_t vec_fma(vec_t a, vec_t b, vec_t c) { return fma_lanes(a, b, c); }
static inline vec_t vec_mul(vec_t a, vec_t b) { return a * b; }
static inline vec_t vec_load_bf16(const uint16_t *p) {
    vec_t out;
    for (int l = 0; l < VEC; l++) out[l] = from_bf16(p[l]);
    return out;
}
#endif
#define VECS (LANES / VEC)  /* registers per group of lanes */

/* VEC values from element i of a float32 (bf16 = 0) or bfloat16 (bf16 = 1) array */
static inline vec_t vec_load_any(const void *p, int64_t i, const int bf16) {
    return bf16 ? vec_load_bf16((const uint16_t *)p + i) : vec_load((const float *)p + i);
}

#endif

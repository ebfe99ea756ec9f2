/* Matrix multiplication with 4- or 8-bit weights, float32 activations, one order of sums.
 *
 * y [M, N] = x [M, K] W^T, where W [N, K] is kept as integers q with a float32 scale s (and,
 * for 4 bits, an offset z) per group of GROUP inputs of an output: w = q * s + z (4 bits,
 * q in 0..15, GGUF's Q4_1), w = q * s (8 bits, q in -127..127, GGUF's Q8_0). A weight is
 * dequantized to float32 as the file defines it (q * s + z rounded once: a fused multiply-add,
 * which also saves an instruction a weight), and each output is one chain of
 * fused multiply-adds over k in order: a row's result is the same whatever the number of
 * rows, and it differs from the float32 model's only in the order of its sums.
 *
 * Layout (made by sirocco/models/quantized.py): outputs in tiles of LANES; 4 bits:
 * w [N / LANES][K / 2][LANES] bytes, byte (t, j, l) = q[t LANES + l][2 j] | q[...][2 j + 1] << 4;
 * 8 bits: w [N / LANES][K][LANES]; scales, offsets [N / LANES][K / GROUP][LANES].
 * Rows go ROWS at a time (the rest 8, 4, 2 and 1 at a time), so that a tile's weights,
 * dequantized once, serve that many rows; blocks of fewer rows take several tiles at a time,
 * so that enough independent sums are in flight. Each block of rows is first copied input
 * by input ([K][rows]), so that a row's input is one broadcast from a fixed offset. Threads
 * (OpenMP) share the tiles. None of this changes a sum's order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lanes.h"

#define GROUP 32
#if defined(SIROCCO_AVX2)
#define ROWS 4  /* 16 registers: a block's accumulators must fit beside the weights */
#else
#define ROWS 16
#endif
#define UNIT 4  /* tiles a thread takes at a time */

/* LANES bytes as LANES int32 */
#if defined(__AVX512F__)
static inline ilanes_t widen_u8(const uint8_t *p) {
    return (ilanes_t)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}
static inline ilanes_t widen_s8(const int8_t *p) {
    return (ilanes_t)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
}
#else
static inline ilanes_t widen_u8(const uint8_t *p) {
    ilanes_t out;
    for (int l = 0; l < LANES; l++) out[l] = p[l];
    return out;
}
static inline ilanes_t widen_s8(const int8_t *p) {
    ilanes_t out;
    for (int l = 0; l < LANES; l++) out[l] = p[l];
    return out;
}
#endif

/* The rows of the block that starts `left` rows before the end: ROWS, or 8, 4, 2, 1. */
static inline int block_rows(int64_t left) {
    return left >= ROWS ? ROWS : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

#if defined(SIROCCO_AVX2)
/* tile_rows (below) in 256-bit registers: each tile's LANES outputs as two halves of 8. The
 * same operations in the same order, so the same bits: GCC spills the generic 16-float
 * values of the portable code to memory where the CPU has no 512-bit registers. */
static inline __attribute__((always_inline)) void tile_rows_avx2(
        const float *restrict xp, const uint8_t *restrict w, const float *restrict scales,
        const float *restrict offsets, float *restrict y, int64_t N, int64_t K, const int bits,
        int64_t t0, const int T, int64_t m0, const int R) {
    __m256 acc[UNIT][ROWS][2];
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++) acc[u][r][0] = acc[u][r][1] = _mm256_setzero_ps();
    const int64_t groups = K / GROUP;
    const __m256i low_nibble = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < groups; g++) {
        for (int kk = 0; kk < GROUP; kk += 2) {
            const int64_t k = g * GROUP + kk;
            for (int u = 0; u < T; u++) {
                const int64_t t = t0 + u;
                const float *s = scales + (t * groups + g) * LANES;
                const float *z = offsets + (t * groups + g) * LANES;
                __m256 w0[2], w1[2];
                for (int h = 0; h < 2; h++) {
                    __m256i q0, q1;
                    if (bits == 4) {
                        const __m256i both = _mm256_cvtepu8_epi32(
                            _mm_loadl_epi64((const __m128i *)(w + (t * (K / 2) + k / 2) * LANES
                                                              + 8 * h)));
                        q0 = _mm256_and_si256(both, low_nibble);
                        q1 = _mm256_srli_epi32(both, 4);
                    } else {
                        const int8_t *b = (const int8_t *)w + (t * K + k) * LANES + 8 * h;
                        q0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)b));
                        q1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + LANES)));
                    }
                    const __m256 sh = _mm256_loadu_ps(s + 8 * h);
                    if (bits == 4) {
                        const __m256 zh = _mm256_loadu_ps(z + 8 * h);
                        w0[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), sh, zh);
                        w1[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), sh, zh);
                    } else {
                        w0[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(q0), sh);
                        w1[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(q1), sh);
                    }
                }
                for (int r = 0; r < R; r++) {
                    const __m256 x0 = _mm256_broadcast_ss(xp + k * R + r);
                    const __m256 x1 = _mm256_broadcast_ss(xp + (k + 1) * R + r);
                    for (int h = 0; h < 2; h++)
                        acc[u][r][h] = _mm256_fmadd_ps(x1, w1[h],
                                                       _mm256_fmadd_ps(x0, w0[h], acc[u][r][h]));
                }
            }
        }
    }
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++)
            for (int h = 0; h < 2; h++)
                _mm256_storeu_ps(y + (m0 + r) * N + (t0 + u) * LANES + 8 * h, acc[u][r][h]);
}

/* Tiles [t0, t1) (at most UNIT) for every block of rows: at most 8 accumulators at once. */
static inline __attribute__((always_inline)) void unit_rows(
        const float *xp, const uint8_t *w, const float *scales, const float *offsets, float *y,
        int64_t M, int64_t N, int64_t K, const int bits, int64_t t0, int64_t t1) {
#define ROWS_OF(T, t, R) \
    tile_rows_avx2(xp + m0 * K, w, scales, offsets, y, N, K, bits, t, T, m0, R)
    for (int64_t m0 = 0; m0 < M;) {
        const int R = block_rows(M - m0);
        if (t1 - t0 == UNIT && R == 1) {
            ROWS_OF(UNIT, t0, 1);
        } else if (t1 - t0 == UNIT && R == 2) {
            ROWS_OF(2, t0, 2), ROWS_OF(2, t0 + 2, 2);
        } else {
            for (int64_t t = t0; t < t1; t++) {
                if (R == 4) ROWS_OF(1, t, 4);
                else if (R == 2) ROWS_OF(1, t, 2);
                else ROWS_OF(1, t, 1);
            }
        }
        m0 += R;
    }
#undef ROWS_OF
}
#else

/* Rows [m0, m0 + R) of tiles t0 .. t0 + T - 1, the rows' inputs at xp [K][R]. R, T and bits
 * are constants at each call (the compiler keeps the T * R accumulators in registers). A
 * multiply and an add stay two roundings (-ffp-contract=off); the accumulation is an
 * explicit fused multiply-add. */
static inline __attribute__((always_inline)) void tile_rows(
        const float *restrict xp, const uint8_t *restrict w, const float *restrict scales,
        const float *restrict offsets, float *restrict y, int64_t N, int64_t K, const int bits,
        int64_t t0, const int T, int64_t m0, const int R) {
    lanes_t acc[UNIT][ROWS];
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++) acc[u][r] = splat(0.0f);
    const int64_t groups = K / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        lanes_t s[UNIT], z[UNIT];
        for (int u = 0; u < T; u++) {
            s[u] = load_lanes(scales + ((t0 + u) * groups + g) * LANES);
            z[u] = bits == 4 ? load_lanes(offsets + ((t0 + u) * groups + g) * LANES) : s[u];
        }
        for (int kk = 0; kk < GROUP; kk += 2) {
            const int64_t k = g * GROUP + kk;
            for (int u = 0; u < T; u++) {
                const int64_t t = t0 + u;
                ilanes_t q0, q1;
                if (bits == 4) {
                    const ilanes_t both = widen_u8(w + (t * (K / 2) + k / 2) * LANES);
                    q0 = both & 15;
                    q1 = both >> 4;
                } else {
                    const int8_t *restrict b = (const int8_t *)w + (t * K + k) * LANES;
                    q0 = widen_s8(b);
                    q1 = widen_s8(b + LANES);
                }
                const lanes_t f0 = __builtin_convertvector(q0, lanes_t);
                const lanes_t f1 = __builtin_convertvector(q1, lanes_t);
                const lanes_t w0 = bits == 4 ? fma_lanes(f0, s[u], z[u]) : f0 * s[u];
                const lanes_t w1 = bits == 4 ? fma_lanes(f1, s[u], z[u]) : f1 * s[u];
                for (int r = 0; r < R; r++)
                    acc[u][r] = fma_lanes(splat(xp[(k + 1) * R + r]), w1,
                                          fma_lanes(splat(xp[k * R + r]), w0, acc[u][r]));
            }
        }
    }
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++)
            store_lanes(y + (m0 + r) * N + (t0 + u) * LANES, acc[u][r]);
}

/* Tiles [t0, t1) (at most UNIT) for every block of rows. */
static inline __attribute__((always_inline)) void unit_rows(
        const float *xp, const uint8_t *w, const float *scales, const float *offsets, float *y,
        int64_t M, int64_t N, int64_t K, const int bits, int64_t t0, int64_t t1) {
#define ROWS_OF(T, t, R) tile_rows(xp + m0 * K, w, scales, offsets, y, N, K, bits, t, T, m0, R)
    for (int64_t m0 = 0; m0 < M;) {
        const int R = block_rows(M - m0);
        if (R == ROWS) {
            for (int64_t t = t0; t < t1; t++) ROWS_OF(1, t, ROWS);
        } else if (t1 - t0 == UNIT && R == 8) {
            ROWS_OF(2, t0, 8), ROWS_OF(2, t0 + 2, 8);
        } else if (t1 - t0 == UNIT) {
            if (R == 4) ROWS_OF(UNIT, t0, 4);
            else if (R == 2) ROWS_OF(UNIT, t0, 2);
            else ROWS_OF(UNIT, t0, 1);
        } else {
            for (int64_t t = t0; t < t1; t++) {
                if (R == 8) ROWS_OF(1, t, 8);
                else if (R == 4) ROWS_OF(1, t, 4);
                else if (R == 2) ROWS_OF(1, t, 2);
                else ROWS_OF(1, t, 1);
            }
        }
        m0 += R;
    }
#undef ROWS_OF
}
#endif

/* y = x W^T for the weights above (N % LANES == 0, K % GROUP == 0); `offsets` is unused for
 * 8 bits. Returns 0, or -1 if out of memory. */
int sirocco_qmatmul(const float *x, const uint8_t *w, const float *scales, const float *offsets,
                    float *y, int64_t M, int64_t N, int64_t K, int bits, int threads) {
    /* each block of rows input by input: xp[m0 * K + k * R + r] = x[(m0 + r) * K + k] */
    float *xp = M == 1 ? (float *)x : malloc(sizeof(float) * M * K);
    if (xp == NULL) return -1;
    if (M > 1)
        for (int64_t m0 = 0; m0 < M;) {
            const int R = block_rows(M - m0);
            for (int64_t k = 0; k < K; k++)
                for (int r = 0; r < R; r++) xp[m0 * K + k * R + r] = x[(m0 + r) * K + k];
            m0 += R;
        }
    const int64_t tiles = N / LANES, units = (tiles + UNIT - 1) / UNIT;
#define UNITS(BITS)                                                                      \
    _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1)")              \
    for (int64_t u = 0; u < units; u++)                                                  \
        unit_rows(xp, w, scales, offsets, y, M, N, K, BITS, u * UNIT,                    \
                  (u + 1) * UNIT < tiles ? (u + 1) * UNIT : tiles);
    if (bits == 4) {
        UNITS(4)
    } else {
        UNITS(8)
    }
#undef UNITS
    if (M > 1) free(xp);
    return 0;
}

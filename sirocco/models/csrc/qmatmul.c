/* Matrix multiplication with 4- or 8-bit weights, float32 activations, one order of sums.
 *
 * y [M, N] = x [M, K] W^T, where W [N, K] is kept as integers q with a float32 scale s (and,
 * for 4 bits, an offset z) per group of GROUP inputs of an output: w = q * s + z (4 bits,
 * q in 0..15, GGUF's Q4_1), w = q * s (8 bits, q in -127..127, GGUF's Q8_0). A weight is
 * dequantized to float32 exactly as the file defines it, and each output is one chain of
 * fused multiply-adds over k in order: a row's result is the same whatever the number of
 * rows, and it differs from the float32 model's only in the order of its sums.
 *
 * Layout (made by sirocco/models/quantized.py): outputs in tiles of LANES; 4 bits:
 * w [N / LANES][K / 2][LANES] bytes, byte (t, j, l) = q[t LANES + l][2 j] | q[...][2 j + 1] << 4;
 * 8 bits: w [N / LANES][K][LANES]; scales, offsets [N / LANES][K / GROUP][LANES].
 * Rows go ROWS at a time (the rest 8, 4, 2 and 1 at a time), so that a tile's weights,
 * dequantized once, serve that many rows; threads (OpenMP) share the tiles.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define GROUP 32
#define ROWS 16

/* LANES floats as one value: a vector register where the CPU has 512-bit ones, two or four
 * otherwise (GCC and Clang vector extensions; element-wise operations only). */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ilanes_t __attribute__((vector_size(LANES * sizeof(int32_t))));

/* a * b + c, one rounding */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline lanes_t fma_lanes(lanes_t a, lanes_t b, lanes_t c) {
    return (lanes_t)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#else
static inline lanes_t fma_lanes(lanes_t a, lanes_t b, lanes_t c) {
    lanes_t out;
    for (int l = 0; l < LANES; l++) out[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return out;
}
#endif

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

static inline lanes_t load_lanes(const float *p) {
    lanes_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Rows [m0, m0 + R) of tile t. R and bits are constants at each call (the compiler keeps
 * the accumulators in registers). A multiply and an add stay two roundings
 * (-ffp-contract=off); the accumulation is an explicit fused multiply-add. */
static inline __attribute__((always_inline)) void tile_rows(
        const float *restrict x, const uint8_t *restrict w, const float *restrict scales,
        const float *restrict offsets, float *restrict y, int64_t N, int64_t K, const int bits,
        int64_t t, int64_t m0, const int R) {
    lanes_t acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = (lanes_t){0};
    const int64_t groups = K / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        const lanes_t s = load_lanes(scales + (t * groups + g) * LANES);
        const lanes_t z = bits == 4 ? load_lanes(offsets + (t * groups + g) * LANES) : s;
        for (int kk = 0; kk < GROUP; kk += 2) {
            const int64_t k = g * GROUP + kk;
            ilanes_t q0, q1;
            if (bits == 4) {
                const uint8_t *restrict b = w + (t * (K / 2) + k / 2) * LANES;
                const ilanes_t both = widen_u8(b);
                q0 = both & 15;
                q1 = both >> 4;
            } else {
                const int8_t *restrict b = (const int8_t *)w + (t * K + k) * LANES;
                q0 = widen_s8(b);
                q1 = widen_s8(b + LANES);
            }
            lanes_t w0 = __builtin_convertvector(q0, lanes_t) * s;
            lanes_t w1 = __builtin_convertvector(q1, lanes_t) * s;
            if (bits == 4) {
                w0 += z;
                w1 += z;
            }
            for (int r = 0; r < R; r++) {
                const lanes_t x0 = (lanes_t){0} + x[(m0 + r) * K + k];
                const lanes_t x1 = (lanes_t){0} + x[(m0 + r) * K + k + 1];
                acc[r] = fma_lanes(x1, w1, fma_lanes(x0, w0, acc[r]));
            }
        }
    }
    for (int r = 0; r < R; r++) memcpy(y + (m0 + r) * N + t * LANES, &acc[r], sizeof acc[r]);
}

/* y = x W^T for the weights above (N % LANES == 0, K % GROUP == 0); `offsets` is unused for
 * 8 bits. */
void sirocco_qmatmul(const float *x, const uint8_t *w, const float *scales,
                     const float *offsets, float *y, int64_t M, int64_t N, int64_t K, int bits,
                     int threads) {
    const int64_t tiles = N / LANES;
#define TILES(BITS)                                                                     \
    _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 2)")             \
    for (int64_t t = 0; t < tiles; t++) {                                               \
        int64_t m0 = 0;                                                                 \
        for (; m0 + ROWS <= M; m0 += ROWS)                                              \
            tile_rows(x, w, scales, offsets, y, N, K, BITS, t, m0, ROWS);               \
        /* the rest in blocks of 8, 4, 2, 1: at most four more passes over the tile */  \
        if (m0 + 8 <= M) tile_rows(x, w, scales, offsets, y, N, K, BITS, t, m0, 8), m0 += 8; \
        if (m0 + 4 <= M) tile_rows(x, w, scales, offsets, y, N, K, BITS, t, m0, 4), m0 += 4; \
        if (m0 + 2 <= M) tile_rows(x, w, scales, offsets, y, N, K, BITS, t, m0, 2), m0 += 2; \
        if (m0 < M) tile_rows(x, w, scales, offsets, y, N, K, BITS, t, m0, 1);          \
    }
    if (bits == 4) {
        TILES(4)
    } else {
        TILES(8)
    }
#undef TILES
}

/* Matrix multiplication in bfloat16 with the CPU's bfloat16 dot products (AVX512-BF16).
 *
 * y [M, N] = x [M, K] W^T, x, W and y bfloat16, each output a float32 sum rounded once to
 * bfloat16 (to nearest even). The sum of an output runs over the inputs in pairs and in
 * order: one VDPBF16PS adds the products of inputs 2 j + 1 and 2 j to it (the products are
 * exact; the CPU flushes subnormals), whatever the number of rows, so a row's result does
 * not depend on the batch.
 *
 * Layout (made by sirocco/models/mistral.py): outputs in tiles of LANES, the weights of a
 * tile pair by pair: w [N / LANES][K / 2][LANES][2], one 64-byte load per tile and pair. Rows
 * go ROWS at a time (the rest 4, 2 and 1 at a time) and each block of rows is first
 * copied pair by pair ([K / 2][rows] 32-bit words), so that a row's pair is one broadcast
 * from a fixed offset; blocks of fewer rows take several tiles at a time, so that enough
 * independent sums are in flight. Threads (OpenMP) share the tiles.
 *
 * Built where the compiler targets AVX512-BF16 (-march=native on such a CPU); elsewhere
 * `sirocco_bf16_matmul` answers -2 and the caller keeps PyTorch's matmul.
 */
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"

#define ROWS 6
#define GROUP 32  /* inputs per scale of 4-bit weights (qmatmul.c's) */
#define UNIT 4  /* tiles a thread takes at a time */

int sirocco_bf16_matmul_available(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
static inline int block_rows(int64_t left) {
    return left >= ROWS ? ROWS : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

static inline void store_bf16_lanes(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

/* Rows [m0, m0 + R) of tiles t0 .. t0 + T - 1, the rows' pairs at xp [K / 2][R]; R and T are
 * constants at each call (the T * R accumulators stay in registers). */
static inline __attribute__((always_inline)) void tile_rows(
        const uint32_t *restrict xp, const uint16_t *restrict w, uint16_t *restrict y,
        int64_t N, int64_t pairs, int64_t t0, const int T, int64_t m0, const int R) {
    __m512 acc[UNIT][ROWS];
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++) acc[u][r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < pairs; j++)
        for (int u = 0; u < T; u++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(
                w + ((t0 + u) * pairs + j) * 2 * LANES);
            for (int r = 0; r < R; r++)
                acc[u][r] = _mm512_dpbf16_ps(acc[u][r], wv,
                                             (__m512bh)_mm512_set1_epi32((int)xp[j * R + r]));
        }
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++)
            store_bf16_lanes(y + (m0 + r) * N + (t0 + u) * LANES, acc[u][r]);
}

/* The same for 4-bit weights (qmatmul.c's layout and formula, w = q s + z per group of
 * GROUP inputs, but s and z in float16, a GGUF file's own precision: a quarter fewer bytes
 * to read), the rows' sum over each group at sx [K / GROUP][R]. In a lane, the bytes' two
 * nibbles become the bfloat16 numbers 128 + q (exponent 7, q in the top of the mantissa:
 * exact), so a group's products come from VDPBF16PS and
 * sum(x w) = s sum(x (128 + q)) + (z - 128 s) sum(x). */
static inline __attribute__((always_inline)) void q4_tile_rows(
        const uint32_t *restrict xp, const float *restrict sx, const uint8_t *restrict w,
        const uint16_t *restrict scales, const uint16_t *restrict offsets, uint16_t *restrict y,
        int64_t N, int64_t pairs, int64_t t0, const int T, int64_t m0, const int R) {
    const __m512i nibbles = _mm512_set1_epi32(0x000f000f), base = _mm512_set1_epi32(0x43004300);
    const int64_t groups = pairs / (GROUP / 2);
    __m512 acc[UNIT][ROWS];
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++) acc[u][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 part[UNIT][ROWS];
        for (int u = 0; u < T; u++)
            for (int r = 0; r < R; r++) part[u][r] = _mm512_setzero_ps();
        for (int64_t j = g * (GROUP / 2); j < (g + 1) * (GROUP / 2); j++)
            for (int u = 0; u < T; u++) {
                const __m512i b = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(w + ((t0 + u) * pairs + j) * LANES)));
                /* low nibble to bits 0-3, high nibble to bits 16-19, then 0x4300 in each half */
                const __m512i both = _mm512_or_si512(b, _mm512_slli_epi32(b, 12));
                const __m512bh wv = (__m512bh)_mm512_ternarylogic_epi32(both, nibbles, base, 0xea);
                for (int r = 0; r < R; r++)
                    part[u][r] = _mm512_dpbf16_ps(part[u][r], wv,
                                                  (__m512bh)_mm512_set1_epi32((int)xp[j * R + r]));
            }
        for (int u = 0; u < T; u++) {
            const int64_t at = ((t0 + u) * groups + g) * LANES;
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at)));
            const __m512 z = _mm512_fmadd_ps(
                _mm512_set1_ps(-128.0f), s,
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(offsets + at))));
            for (int r = 0; r < R; r++)
                acc[u][r] = _mm512_fmadd_ps(_mm512_set1_ps(sx[g * R + r]), z,
                                            _mm512_fmadd_ps(part[u][r], s, acc[u][r]));
        }
    }
    for (int u = 0; u < T; u++)
        for (int r = 0; r < R; r++)
            store_bf16_lanes(y + (m0 + r) * N + (t0 + u) * LANES, acc[u][r]);
}

/* Tiles [t0, t1) (at most UNIT) for every block of rows: UNIT tiles at a time where the
 * accumulators fit in registers (4-bit weights keep two sets: UNIT / 2 at 4 rows and more),
 * else one. */
static inline __attribute__((always_inline)) void unit_rows(
        const uint32_t *xp, const float *sx, const void *w, const uint16_t *scales,
        const uint16_t *offsets, uint16_t *y, int64_t M, int64_t N, int64_t pairs, const int q4,
        int64_t t0, int64_t t1) {
#define ROWS_OF(T, t, R)                                                                     \
    (q4 ? q4_tile_rows(xp + m0 * pairs, sx + m0 * (pairs / (GROUP / 2)), w, scales, offsets, \
                       y, N, pairs, t, T, m0, R)                                             \
        : tile_rows(xp + m0 * pairs, w, y, N, pairs, t, T, m0, R))
#define UNIT_OF(R)                                                                           \
    do {                                                                                     \
        if (t1 - t0 < UNIT) {                                                                \
            for (int64_t t = t0; t < t1; t++) ROWS_OF(1, t, R);                              \
        } else if (q4 && R >= 4) {                                                           \
            ROWS_OF(UNIT / 2, t0, R), ROWS_OF(UNIT / 2, t0 + UNIT / 2, R);                   \
        } else {                                                                             \
            ROWS_OF(UNIT, t0, R);                                                            \
        }                                                                                    \
    } while (0)
    for (int64_t m0 = 0; m0 < M;) {
        const int R = block_rows(M - m0);
        if (R == ROWS) UNIT_OF(ROWS);
        else if (R == 4) UNIT_OF(4);
        else if (R == 2) UNIT_OF(2);
        else UNIT_OF(1);
        m0 += R;
    }
#undef UNIT_OF
#undef ROWS_OF
}

/* Both kernels: rows panelled pair by pair (and their group sums, for 4 bits), then the
 * tiles shared between threads. */
static int matmul(const uint16_t *x, const void *w, const uint16_t *scales,
                  const uint16_t *offsets, uint16_t *y, int64_t M, int64_t N, int64_t K,
                  const int q4, int threads) {
    const int64_t pairs = K / 2, groups = K / GROUP;
    const uint32_t *rows = (const uint32_t *)x;
    /* each block of rows pair by pair: xp[m0 * pairs + j * R + r] = pair j of row m0 + r */
    uint32_t *xp = M == 1 ? (uint32_t *)rows : malloc(sizeof(uint32_t) * M * pairs);
    float *sx = q4 ? malloc(sizeof(float) * M * groups) : NULL;
    if (xp == NULL || (q4 && sx == NULL)) {
        if (M > 1) free(xp);
        free(sx);
        return -1;
    }
    for (int64_t m0 = 0; m0 < M;) {
        const int R = block_rows(M - m0);
        if (M > 1)
            for (int64_t j = 0; j < pairs; j++)
                for (int r = 0; r < R; r++) xp[m0 * pairs + j * R + r] = rows[(m0 + r) * pairs + j];
        /* each row's sum over a group, in order */
        for (int64_t g = 0; q4 && g < groups; g++)
            for (int r = 0; r < R; r++) {
                float sum = 0.0f;
                for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k++)
                    sum += from_bf16(x[(m0 + r) * K + k]);
                sx[m0 * groups + g * R + r] = sum;
            }
        m0 += R;
    }
    const int64_t tiles = N / LANES, units = (tiles + UNIT - 1) / UNIT;
#define UNITS(Q4)                                                                         \
    _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 1)")               \
    for (int64_t u = 0; u < units; u++)                                                   \
        unit_rows(xp, sx, w, scales, offsets, y, M, N, pairs, Q4, u * UNIT,               \
                  (u + 1) * UNIT < tiles ? (u + 1) * UNIT : tiles);
    if (q4) {
        UNITS(1)
    } else {
        UNITS(0)
    }
#undef UNITS
    if (M > 1) free(xp);
    free(sx);
    return 0;
}
#endif

/* y = x W^T for bfloat16 weights in the layout above (N % LANES == 0, K even). Returns 0,
 * -1 if out of memory, -2 where the library was built without AVX512-BF16. */
int sirocco_bf16_matmul(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M,
                        int64_t N, int64_t K, int threads) {
#if defined(__AVX512BF16__)
    return matmul(x, w, NULL, NULL, y, M, N, K, 0, threads);
#else
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -2;
#endif
}

/* y = x W^T for qmatmul.c's 4-bit weights (N % LANES == 0, K % GROUP == 0) with float16
 * scales and offsets, bfloat16 rows in and out. Returns as above. */
int sirocco_q4_bf16_matmul(const uint16_t *x, const uint8_t *w, const uint16_t *scales,
                           const uint16_t *offsets, uint16_t *y, int64_t M, int64_t N, int64_t K,
                           int threads) {
#if defined(__AVX512BF16__)
    return matmul(x, w, scales, offsets, y, M, N, K, 1, threads);
#else
    (void)x, (void)w, (void)scales, (void)offsets, (void)y, (void)M, (void)N, (void)K;
    (void)threads;
    return -2;
#endif
}

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
 * go ROWS at a time (the rest 8, 4, 2 and 1 at a time) and each block of rows is first
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
            _mm256_storeu_si256((__m256i *)(y + (m0 + r) * N + (t0 + u) * LANES),
                                (__m256i)_mm512_cvtneps_pbh(acc[u][r]));
}

/* Tiles [t0, t1) (at most UNIT) for every block of rows. */
static inline __attribute__((always_inline)) void unit_rows(
        const uint32_t *xp, const uint16_t *w, uint16_t *y, int64_t M, int64_t N,
        int64_t pairs, int64_t t0, int64_t t1) {
#define ROWS_OF(T, t, R) tile_rows(xp + m0 * pairs, w, y, N, pairs, t, T, m0, R)
    for (int64_t m0 = 0; m0 < M;) {
        const int R = block_rows(M - m0);
        if (t1 - t0 == UNIT) {
            if (R == ROWS) ROWS_OF(UNIT, t0, ROWS);
            else if (R == 4) ROWS_OF(UNIT, t0, 4);
            else if (R == 2) ROWS_OF(UNIT, t0, 2);
            else ROWS_OF(UNIT, t0, 1);
        } else {
            for (int64_t t = t0; t < t1; t++) {
                if (R == ROWS) ROWS_OF(1, t, ROWS);
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

/* y = x W^T for the layout above (N % LANES == 0, K even). Returns 0, -1 if out of memory,
 * -2 where the library was built without AVX512-BF16. */
int sirocco_bf16_matmul(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M,
                        int64_t N, int64_t K, int threads) {
#if defined(__AVX512BF16__)
    const int64_t pairs = K / 2;
    const uint32_t *rows = (const uint32_t *)x;
    /* each block of rows pair by pair: xp[m0 * pairs + j * R + r] = pair j of row m0 + r */
    uint32_t *xp = M == 1 ? (uint32_t *)rows : malloc(sizeof(uint32_t) * M * pairs);
    if (xp == NULL) return -1;
    if (M > 1)
        for (int64_t m0 = 0; m0 < M;) {
            const int R = block_rows(M - m0);
            for (int64_t j = 0; j < pairs; j++)
                for (int r = 0; r < R; r++) xp[m0 * pairs + j * R + r] = rows[(m0 + r) * pairs + j];
            m0 += R;
        }
    const int64_t tiles = N / LANES, units = (tiles + UNIT - 1) / UNIT;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t u = 0; u < units; u++)
        unit_rows(xp, w, y, M, N, pairs, u * UNIT, (u + 1) * UNIT < tiles ? (u + 1) * UNIT : tiles);
    if (M > 1) free(xp);
    return 0;
#else
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K, (void)threads;
    return -2;
#endif
}

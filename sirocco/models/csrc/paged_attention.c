/* Attention over the paged KV cache, float32, with one fixed order of arithmetic.
 *
 * Every query is computed from its own position and its sequence's block table, and each
 * of its numbers is a function of the key's position alone: a score is a chain of fused
 * multiply-adds q[d] * k[d] over d in order; the softmax sum puts key j in lane j % 16 and
 * adds the lanes in a fixed tree; the output is a chain of fused multiply-adds p_j * v_j in
 * order of j. So a query's output is bitwise the same whatever else is in the batch, however
 * its prompt was split into chunks, and whether its prefix came from the prefix cache or was
 * computed in this step: the invariance PyTorch's flash kernel does not give (it blocks
 * queries and keys by the shape of the batch).
 *
 * The key cache keeps each block's keys transposed ([block][kv head][d][offset]), so that 16
 * consecutive positions side by side make 16 scores one vector FMA per dimension, read where
 * they lie (a block size that is not a multiple of 16 gathers them into a buffer first, with
 * the same arithmetic). Work is split in items (a chunk of up to a few dozen queries of one
 * sequence, one KV head), and the query heads of one KV head go through the keys and values
 * together. Sharing loads does no arithmetic, so it changes no result.
 *
 * Built at run time by sirocco/models/kernels.py (plain C, no PyTorch headers), with no
 * -ffast-math (the compiler may not reassociate the sums) and -ffp-contract=off (it may not
 * fuse other multiply-adds in some loops and not in others).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fast_exp.h"

#define LANES 16
#define UNROLL 4

/* Scores of one query against `count` (1 or UNROLL) groups of LANES keys, transposed: key
 * l of group u, dimension d at kt[u][d * stride + l]. Each a sum over d in order, times
 * `scale`. */
static inline __attribute__((always_inline)) void score_groups(
        const float *restrict qh, const float *const *kt, const int64_t stride,
        float *restrict s, const int count, const int D, float scale) {
    float acc[UNROLL][LANES] = {{0}};
    for (int d = 0; d < D; d++) {
        const float qd = qh[d];
        for (int u = 0; u < count; u++) {
            const float *restrict k = kt[u] + d * stride;
#pragma omp simd
            for (int l = 0; l < LANES; l++) acc[u][l] = fmaf(qd, k[l], acc[u][l]);
        }
    }
    for (int u = 0; u < count; u++)
        for (int l = 0; l < LANES; l++) s[u * LANES + l] = acc[u][l] * scale;
}

/* Where key `pos`, dimension 0, of KV head kvh lies: keys are stored [block][kvh][d][offset]. */
static inline const float *key_at(const float *k_cache, const int32_t *table, int pos,
                                  int block_size, int KVH, int kvh, int D) {
    return k_cache + (((int64_t)table[pos / block_size] * KVH + kvh) * D) * block_size
           + pos % block_size;
}

/* The work of items first..last-1, with the head size a constant where it is a common one
 * (the compiler then unrolls the loops over it). */
static inline __attribute__((always_inline)) int attend(
        const float *restrict q, const float *restrict k_cache, const float *restrict v_cache,
        const int32_t *restrict tables, const int32_t *restrict seq_of,
        const int32_t *restrict pos_of, const int32_t *restrict chunks, float *restrict out,
        int64_t num_chunks, int64_t first, int64_t last, int H, int KVH, const int D,
        int block_size, int max_blocks, int window, float scale) {
    const int g = H / KVH;
    const int direct = block_size % LANES == 0;
    float *keys_t = NULL, *scores = NULL;
    int64_t keys_capacity = 0, scores_capacity = 0;
    float *acc = malloc(sizeof(float) * g * D);  /* the outputs of the g heads of a query */
    if (acc == NULL) return -1;
    for (int64_t item = first; item < last; item++) {
        const int kvh = (int)(item / num_chunks);
        const int64_t c = item % num_chunks;
        const int64_t t0 = chunks[c], t1 = chunks[c + 1];
        const int32_t *table = tables + (int64_t)seq_of[t0] * max_blocks;
        const int first_pos = pos_of[t0], last_pos = pos_of[t1 - 1];
        const int lo0 = (window > 0 && first_pos - window + 1 > 0) ? first_pos - window + 1 : 0;
        const int g0 = lo0 / LANES, g1 = last_pos / LANES + 1;  /* key groups of the item */
        const int64_t need_keys = direct ? 0 : (int64_t)(g1 - g0) * D * LANES;
        const int64_t need_scores = (int64_t)g * (g1 - g0) * LANES;
        if (need_keys > keys_capacity) {
            free(keys_t);
            keys_capacity = need_keys * 2;
            keys_t = malloc(sizeof(float) * keys_capacity);
        }
        if (need_scores > scores_capacity) {
            free(scores);
            scores_capacity = need_scores * 2;
            scores = malloc(sizeof(float) * scores_capacity);
        }
        if ((keys_t == NULL && need_keys > 0) || scores == NULL) {
            free(keys_t);
            free(scores);
            free(acc);
            return -1;
        }
        /* The keys of each group of LANES positions, transposed: in the cache itself where
         * a block holds whole groups, else gathered into keys_t[group][d][lane] (lanes past
         * last_pos repeat its key). Either way a score's arithmetic is the same. */
        if (!direct)
            for (int gi = g0; gi < g1; gi++) {
                float *dst = keys_t + (int64_t)(gi - g0) * D * LANES;
                for (int l = 0; l < LANES; l++) {
                    int pos = gi * LANES + l;
                    pos = pos > last_pos ? last_pos : pos;
                    const float *key = key_at(k_cache, table, pos, block_size, KVH, kvh, D);
                    for (int d = 0; d < D; d++) dst[d * LANES + l] = key[(int64_t)d * block_size];
                }
            }
        const int64_t stride_k = direct ? block_size : LANES;
        /* The g query heads of this KV head go together: each group of keys and each
         * value row is loaded once for all of them; every head's arithmetic is unchanged. */
        const int64_t stride = (int64_t)(g1 - g0) * LANES;  /* one head's scores */
        for (int64_t t = t0; t < t1; t++) {
            const int pos = pos_of[t];
            const int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
            const int glo = lo / LANES, ghi = pos / LANES + 1;
            const float *qt = q + (t * H + (int64_t)kvh * g) * D;
            for (int gi = glo; gi < ghi;) {
                const int count = gi + UNROLL <= ghi ? UNROLL : 1;
                const float *kt[UNROLL];
                for (int u = 0; u < count; u++)
                    kt[u] = direct ? key_at(k_cache, table, (gi + u) * LANES, block_size, KVH,
                                            kvh, D)
                                   : keys_t + (int64_t)(gi + u - g0) * D * LANES;
                for (int h = 0; h < g; h++)
                    score_groups(qt + (int64_t)h * D, kt, stride_k,
                                 scores + h * stride + (int64_t)(gi - g0) * LANES, count, D,
                                 scale);
                gi += count;
            }
            for (int h = 0; h < g; h++) {
                /* keys lo..pos, at s[j]; their softmax in place, normalized */
                float *s = scores + h * stride - (int64_t)g0 * LANES;
                float lane_max[LANES];
                for (int l = 0; l < LANES; l++) lane_max[l] = s[lo];
                for (int gj = glo; gj < ghi; gj++) {
                    const float *sg = s + (int64_t)gj * LANES;
#pragma omp simd
                    for (int l = 0; l < LANES; l++) {
                        const int j = gj * LANES + l;
                        const float v = (j >= lo) & (j <= pos) ? sg[l] : s[lo];
                        lane_max[l] = v > lane_max[l] ? v : lane_max[l];
                    }
                }
                float m = lane_max[0];  /* a maximum is exact in any order */
                for (int l = 1; l < LANES; l++) m = lane_max[l] > m ? lane_max[l] : m;
                float lanes[LANES] = {0};
                for (int gj = glo; gj < ghi; gj++) {
                    float *sg = s + (int64_t)gj * LANES;
#pragma omp simd
                    for (int l = 0; l < LANES; l++) {
                        const int j = gj * LANES + l;
                        /* a select, not a product: a lane past the keys may hold
                         * anything a freed block held */
                        sg[l] = (j >= lo) & (j <= pos) ? exp_clamped(sg[l] - m, 0.0f) : 0.0f;
                        lanes[l] += sg[l];
                    }
                }
                for (int w = LANES / 2; w > 0; w /= 2)
                    for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
                const float inv = 1.0f / lanes[0];
                for (int j = lo; j <= pos; j++) s[j] *= inv;
                float *o = acc + (int64_t)h * D;
                for (int d = 0; d < D; d++) o[d] = 0.0f;
            }
            for (int b = lo / block_size; b <= pos / block_size; b++) {
                const int b0 = b * block_size;
                const int j0 = lo > b0 ? lo : b0;
                const int j1 = pos < b0 + block_size - 1 ? pos : b0 + block_size - 1;
                const float *vb = v_cache + ((int64_t)table[b] * block_size * KVH + kvh) * D;
                for (int j = j0; j <= j1; j++) {
                    const float *restrict v = vb + (int64_t)(j - b0) * KVH * D;
                    for (int h = 0; h < g; h++) {
                        const float p = scores[h * stride + j - (int64_t)g0 * LANES];
                        float *restrict o = acc + (int64_t)h * D;
#pragma omp simd
                        for (int d = 0; d < D; d++) o[d] = fmaf(p, v[d], o[d]);
                    }
                }
            }
            memcpy(out + (t * H + (int64_t)kvh * g) * D, acc, sizeof(float) * g * D);
        }
    }
    free(keys_t);
    free(scores);
    free(acc);
    return 0;
}

/* q, out: [T, H, D]; k_cache: [num_blocks, KVH, D, block_size] (a block's keys transposed);
 * v_cache: [num_blocks, block_size, KVH, D]; tables: [S, max_blocks]; seq_of, pos_of: [T]
 * (positions ascending within a chunk); chunks: [num_chunks + 1] token boundaries, each chunk
 * within one sequence. The num_chunks * KVH items (item = kvh * num_chunks + chunk) are split
 * in ranges between `threads` (an OpenMP loop where the build has OpenMP). Returns 0, or -1
 * if out of memory. */
int sirocco_paged_attention(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *tables, const int32_t *seq_of, const int32_t *pos_of,
                            const int32_t *chunks, float *out, int64_t num_chunks, int H, int KVH,
                            int D, int block_size, int max_blocks, int window, float scale,
                            int threads) {
    const int64_t items = num_chunks * KVH;
    /* a few ranges a thread, so that a long prompt's items do not leave a thread idle */
    const int64_t ranges = threads > 1 ? (items < 4 * threads ? items : 4 * threads) : 1;
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(min: status)
    for (int64_t r = 0; r < ranges; r++) {
        const int64_t first = items * r / ranges, last = items * (r + 1) / ranges;
        int done;
#define ATTEND(head_dim) attend(q, k_cache, v_cache, tables, seq_of, pos_of, chunks, out, \
                                num_chunks, first, last, H, KVH, head_dim, block_size, \
                                max_blocks, window, scale)
        switch (D) {
        case 64: done = ATTEND(64); break;
        case 128: done = ATTEND(128); break;
        default: done = ATTEND(D);
        }
#undef ATTEND
        status = done < status ? done : status;
    }
    return status;
}

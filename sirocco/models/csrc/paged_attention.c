/* Attention over the paged KV cache (float32 or bfloat16), in float32 arithmetic with one
 * fixed order.
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
 * together (a block of accumulators in registers). Sharing loads does no arithmetic, so it
 * changes no result. A bfloat16 cache (a bfloat16 model's) halves the memory a decode reads,
 * most of its time at many streams; its values widen exactly.
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
#include "lanes.h"

/* How much goes together (no arithmetic changes with these: they only share loads): */
#if defined(SIROCCO_AVX2)  /* 16 registers of 8 floats: fewer accumulators at once */
#define UNROLL 2
#define COLUMNS 2
#else
#define UNROLL 4   /* groups of LANES keys scored together */
#define COLUMNS 4  /* vectors of LANES output dimensions a pass over the values sums */
#endif
#define MAX_HEADS 4  /* query heads of one KV head scored (and their values summed) together */

/* Scores of HG query heads (head h at qh + h * D) against COUNT groups of LANES keys,
 * transposed: key l of group u, dimension d at element kt[u] + d * stride + l of `keys`
 * (float32, or bfloat16 where BF16). Each a chain of fused multiply-adds over d in order,
 * times `scale`, written to s[h * s_stride + u * LANES + l]. HG, COUNT and BF16 are constants
 * at each call: the HG * COUNT accumulators stay in registers and each key vector loaded
 * serves every head. */
static inline __attribute__((always_inline)) void score_block(
        const float *restrict qh, const void *keys, const int64_t *kt, const int64_t stride,
        float *restrict s, const int64_t s_stride, const int D, const float scale,
        const int HG, const int COUNT, const int BF16) {
    vec_t acc[MAX_HEADS][UNROLL][VECS];
    for (int h = 0; h < HG; h++)
        for (int u = 0; u < COUNT; u++)
            for (int e = 0; e < VECS; e++) acc[h][u][e] = vec_splat(0.0f);
    for (int d = 0; d < D; d++)
        for (int u = 0; u < COUNT; u++)
            for (int e = 0; e < VECS; e++) {
                const vec_t k = vec_load_any(keys, kt[u] + d * stride + e * VEC, BF16);
                for (int h = 0; h < HG; h++)
                    acc[h][u][e] = vec_fma(vec_splat(qh[h * D + d]), k, acc[h][u][e]);
            }
    const vec_t scales = vec_splat(scale);
    for (int h = 0; h < HG; h++)
        for (int u = 0; u < COUNT; u++)
            for (int e = 0; e < VECS; e++)
                vec_store(s + h * s_stride + u * LANES + e * VEC, vec_mul(acc[h][u][e], scales));
}

/* CASE(n) with n a constant 1..4 (at most MAX_HEADS, COLUMNS): the value of `n`. */
#define ONE_TO_FOUR(n, CASE) \
    switch (n) {             \
    case 4: CASE(4); break;  \
    case 3: CASE(3); break;  \
    case 2: CASE(2); break;  \
    default: CASE(1);        \
    }

static void score_heads(const float *qh, const void *keys, const int64_t *kt, int64_t stride,
                        float *s, int64_t s_stride, int D, float scale, int hg, int count,
                        int bf16) {
#define BLOCK(HG, COUNT, BF16) score_block(qh, keys, kt, stride, s, s_stride, D, scale, HG, \
                                           COUNT, BF16)
#define SCORE(HG) count == UNROLL ? (bf16 ? BLOCK(HG, UNROLL, 1) : BLOCK(HG, UNROLL, 0)) \
                                  : (bf16 ? BLOCK(HG, 1, 1) : BLOCK(HG, 1, 0))
    ONE_TO_FOUR(hg, SCORE)
#undef SCORE
#undef BLOCK
}

/* The heads a pass takes together: a divisor of the g query heads of a KV head (with
 * AVX2, at most 3: 4 heads' accumulators would not fit in its 16 registers). */
static inline int heads_at_once(int g) {
#if defined(SIROCCO_AVX2)
    return g % 3 == 0 ? 3 : g % 2 == 0 ? 2 : 1;
#else
    return g % 4 == 0 ? 4 : g % 3 == 0 ? 3 : g % 2 == 0 ? 2 : 1;
#endif
}

/* Dimensions [c0, c0 + NC * LANES) of the outputs of HG query heads: o[h * D + d] is the
 * chain of fused multiply-adds p_j * v_j[d] over the keys j = lo..pos in order, where
 * p_j = p[h * p_stride + j]. The HG * NC accumulators stay in registers and each value
 * vector loaded serves every head. */
static inline __attribute__((always_inline)) void value_block(
        const float *restrict p, const int64_t p_stride, const void *v_cache,
        const int32_t *restrict table, const int block_size, const int KVH, const int kvh,
        const int D, const int lo, const int pos, float *restrict o, const int c0,
        const int HG, const int NC, const int BF16) {
    vec_t acc[MAX_HEADS][COLUMNS][VECS];
    for (int h = 0; h < HG; h++)
        for (int c = 0; c < NC; c++)
            for (int e = 0; e < VECS; e++) acc[h][c][e] = vec_splat(0.0f);
    for (int b = lo / block_size; b <= pos / block_size; b++) {
        const int b0 = b * block_size;
        const int j0 = lo > b0 ? lo : b0;
        const int j1 = pos < b0 + block_size - 1 ? pos : b0 + block_size - 1;
        const int64_t vb = ((int64_t)table[b] * block_size * KVH + kvh) * D + c0;
        for (int j = j0; j <= j1; j++) {
            const int64_t v = vb + (int64_t)(j - b0) * KVH * D;
            for (int c = 0; c < NC; c++)
                for (int e = 0; e < VECS; e++) {
                    const vec_t vv = vec_load_any(v_cache, v + c * LANES + e * VEC, BF16);
                    for (int h = 0; h < HG; h++)
                        acc[h][c][e] = vec_fma(vec_splat(p[h * p_stride + j]), vv, acc[h][c][e]);
                }
        }
    }
    for (int h = 0; h < HG; h++)
        for (int c = 0; c < NC; c++)
            for (int e = 0; e < VECS; e++)
                vec_store(o + h * D + c0 + c * LANES + e * VEC, acc[h][c][e]);
}

/* value_block for HG heads (a constant where it is inlined) and nc columns from c0 */
static inline __attribute__((always_inline)) void value_columns(
        const float *p, int64_t p_stride, const void *v_cache, const int32_t *table,
        int block_size, int KVH, int kvh, int D, int lo, int pos, float *o, int c0,
        const int HG, int nc, int bf16) {
#define VALUES(NC) (bf16 ? value_block(p, p_stride, v_cache, table, block_size, KVH, kvh, D, \
                                       lo, pos, o, c0, HG, NC, 1)                           \
                         : value_block(p, p_stride, v_cache, table, block_size, KVH, kvh, D, \
                                       lo, pos, o, c0, HG, NC, 0))
    ONE_TO_FOUR(nc, VALUES)
#undef VALUES
}

static void value_heads(const float *p, int64_t p_stride, const void *v_cache,
                        const int32_t *table, int block_size, int KVH, int kvh, int D, int lo,
                        int pos, float *o, int hg, int bf16) {
    for (int c0 = 0; c0 < D; c0 += COLUMNS * LANES) {
        const int nc = (D - c0) / LANES < COLUMNS ? (D - c0) / LANES : COLUMNS;
#define HEADS(HG) value_columns(p, p_stride, v_cache, table, block_size, KVH, kvh, D, lo, pos, \
                                o, c0, HG, nc, bf16)
        ONE_TO_FOUR(hg, HEADS)
#undef HEADS
    }
}

/* The element where key `pos`, dimension 0, of KV head kvh lies: keys are stored
 * [block][kvh][d][offset]. */
static inline int64_t key_at(const int32_t *table, int pos, int block_size, int KVH, int kvh,
                             int D) {
    return (((int64_t)table[pos / block_size] * KVH + kvh) * D) * block_size + pos % block_size;
}

/* The work of items first..last-1, with the head size a constant where it is a common one
 * (the compiler then unrolls the loops over it). */
static inline __attribute__((always_inline)) int attend(
        const float *restrict q, const void *k_cache, const void *v_cache, const int cache_bf16,
        const int32_t *restrict tables, const int32_t *restrict seq_of,
        const int32_t *restrict pos_of, const int32_t *restrict chunks, float *restrict out,
        int64_t num_chunks, int64_t first, int64_t last, int H, int KVH, const int D,
        int block_size, int max_blocks, int window, float scale) {
    const int g = H / KVH, hg = heads_at_once(g);
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
                    const int64_t key = key_at(table, pos, block_size, KVH, kvh, D);
                    for (int d = 0; d < D; d++)
                        dst[d * LANES + l] = load_any(k_cache, key + (int64_t)d * block_size,
                                                      cache_bf16);
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
                int64_t kt[UNROLL];
                for (int u = 0; u < count; u++)
                    kt[u] = direct ? key_at(table, (gi + u) * LANES, block_size, KVH, kvh, D)
                                   : (int64_t)(gi + u - g0) * D * LANES;
                for (int h = 0; h < g; h += hg)
                    score_heads(qt + (int64_t)h * D, direct ? k_cache : keys_t, kt, stride_k,
                                scores + h * stride + (int64_t)(gi - g0) * LANES, stride, D,
                                scale, hg, count, direct ? cache_bf16 : 0);
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
            }
            if (D % LANES == 0) {
                const float *p = scores - (int64_t)g0 * LANES;
                for (int h = 0; h < g; h += hg)
                    value_heads(p + h * stride, stride, v_cache, table, block_size, KVH, kvh, D,
                                lo, pos, acc + (int64_t)h * D, hg, cache_bf16);
                memcpy(out + (t * H + (int64_t)kvh * g) * D, acc, sizeof(float) * g * D);
                continue;
            }
            /* the same sums, a dimension at a time (a head size that is not whole vectors) */
            for (int i = 0; i < g * D; i++) acc[i] = 0.0f;
            for (int b = lo / block_size; b <= pos / block_size; b++) {
                const int b0 = b * block_size;
                const int j0 = lo > b0 ? lo : b0;
                const int j1 = pos < b0 + block_size - 1 ? pos : b0 + block_size - 1;
                const int64_t vb = ((int64_t)table[b] * block_size * KVH + kvh) * D;
                for (int j = j0; j <= j1; j++) {
                    const int64_t v = vb + (int64_t)(j - b0) * KVH * D;
                    for (int h = 0; h < g; h++) {
                        const float p = scores[h * stride + j - (int64_t)g0 * LANES];
                        float *restrict o = acc + (int64_t)h * D;
                        for (int d = 0; d < D; d++)
                            o[d] = fmaf(p, load_any(v_cache, v + d, cache_bf16), o[d]);
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

/* q, out: [T, H, D] (float32); k_cache: [num_blocks, KVH, D, block_size] (a block's keys
 * transposed); v_cache: [num_blocks, block_size, KVH, D], both float32, or bfloat16 where
 * cache_bf16 (widened as they are read: the arithmetic is float32 either way); tables:
 * [S, max_blocks]; seq_of, pos_of: [T]
 * (positions ascending within a chunk); chunks: [num_chunks + 1] token boundaries, each chunk
 * within one sequence. The num_chunks * KVH items (item = kvh * num_chunks + chunk) are split
 * in ranges between `threads` (an OpenMP loop where the build has OpenMP). Returns 0, or -1
 * if out of memory. */
int sirocco_paged_attention(const float *q, const void *k_cache, const void *v_cache,
                            const int32_t *tables, const int32_t *seq_of, const int32_t *pos_of,
                            const int32_t *chunks, float *out, int64_t num_chunks, int H, int KVH,
                            int D, int block_size, int max_blocks, int window, float scale,
                            int cache_bf16, int threads) {
    const int64_t items = num_chunks * KVH;
    /* a few ranges a thread, so that a long prompt's items do not leave a thread idle */
    const int64_t ranges = threads > 1 ? (items < 4 * threads ? items : 4 * threads) : 1;
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) reduction(min: status)
    for (int64_t r = 0; r < ranges; r++) {
        const int64_t first = items * r / ranges, last = items * (r + 1) / ranges;
        int done;
#define ATTEND(head_dim) attend(q, k_cache, v_cache, cache_bf16, tables, seq_of, pos_of, \
                                chunks, out, \
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

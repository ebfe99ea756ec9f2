/* Attention over the paged KV cache, float32, with one fixed order of arithmetic.
 *
 * Each query row is computed on its own from its position and its sequence's block table:
 * the dot products, the softmax sums and the weighted sum of values always run over keys
 * 0..pos (or the sliding window) in the same order, in the same lane layout. So a query's
 * output is bitwise the same whatever else is in the batch, however its prompt was split
 * into chunks, and whether its prefix came from the prefix cache or was computed in this
 * step: the invariance PyTorch's flash kernel does not give (it blocks queries and keys by
 * the shape of the batch).
 *
 * Built at run time by sirocco/models/paged_attention.py (plain C, no PyTorch headers). No
 * -ffast-math: the compiler may not reassociate the sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

static inline float dot(const float *a, const float *b, int d) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < d; i++) acc[0] += a[i] * b[i];
    /* a fixed tree over the lanes */
    for (int w = LANES / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

/* q, out: [T, H, D]; k_cache, v_cache: [num_blocks, block_size, KVH, D];
 * tables: [S, max_blocks]; seq_of, pos_of: [T]. Computes rows (t, kv head) numbered
 * first..last-1 (row = t * KVH + kvh), so that callers can split the work. */
int sirocco_paged_attention(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *tables, const int32_t *seq_of, const int32_t *pos_of,
                            float *out, int64_t first, int64_t last, int H, int KVH, int D,
                            int block_size, int max_blocks, int window, float scale) {
    const int g = H / KVH;
    int64_t capacity = 0;
    float *scores = NULL;
    for (int64_t row = first; row < last; row++) {
        const int64_t t = row / KVH;
        const int kvh = (int)(row % KVH);
        const int pos = pos_of[t];
        const int lo = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
        const int n = pos - lo + 1;
        if ((int64_t)n * g > capacity) {
            capacity = (int64_t)n * g * 2;
            free(scores);
            scores = malloc(sizeof(float) * capacity);
            if (scores == NULL) return -1;
        }
        const int32_t *table = tables + (int64_t)seq_of[t] * max_blocks;
        const float *qrow = q + (t * H + (int64_t)kvh * g) * D;
        for (int j = lo; j <= pos; j++) {
            const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
            const float *key = k_cache + (slot * KVH + kvh) * D;
            for (int h = 0; h < g; h++)
                scores[(int64_t)h * n + (j - lo)] = dot(qrow + (int64_t)h * D, key, D) * scale;
        }
        for (int h = 0; h < g; h++) {
            float *s = scores + (int64_t)h * n;
            float m = s[0];
            for (int j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
            float sum = 0.0f;
            for (int j = 0; j < n; j++) {
                s[j] = expf(s[j] - m);
                sum += s[j];
            }
            const float inv = 1.0f / sum;
            for (int j = 0; j < n; j++) s[j] *= inv;
        }
        float *orow = out + (t * H + (int64_t)kvh * g) * D;
        memset(orow, 0, sizeof(float) * g * D);
        for (int j = lo; j <= pos; j++) {
            const int64_t slot = (int64_t)table[j / block_size] * block_size + j % block_size;
            const float *value = v_cache + (slot * KVH + kvh) * D;
            for (int h = 0; h < g; h++) {
                const float p = scores[(int64_t)h * n + (j - lo)];
                float *o = orow + (int64_t)h * D;
                for (int d = 0; d < D; d++) o[d] += p * value[d];
            }
        }
    }
    free(scores);
    return 0;
}

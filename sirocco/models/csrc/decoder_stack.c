/* Every decoder layer of a paged forward in one call: the other kernels, in the order the
 * model's Python runs them (sirocco/models/mistral.py, DecoderLayer._forward_paged).
 *
 * A small model's decode step makes ~9 kernel calls a layer; through Python each costs a
 * module call, a few tensor allocations and a ctypes call, which on SmolLM2's 30 layers was a
 * fifth of a one-stream step. Here the layers run back to back.
 * Each kernel gets the same arguments and the same thread count as from Python, and the
 * residual add that ends a layer is the next layer's norm's (x += delta, one float32 addition
 * per element either way): the results are bitwise those of the Python path.
 *
 * The plan (built by sirocco/models/decoder_stack.py) is PLAN_STRIDE int64 per layer: the two
 * norms' float32 weights, then the four linear layers (wqkv, wo, w_gate_up, w_down), each as
 * LINEAR_FIELDS values: its kernel, up to three weight pointers, N and K. The step's
 * buffers are allocated here, once a call.
 */
#include <stdint.h>
#include <stdlib.h>

#include "lanes.h"

void sirocco_rms_norm(float *x, const void *delta, const float *weight, void *out,
                      int delta_bf16, int out_bf16, int64_t dim, int64_t rows, float eps,
                      int threads);
void sirocco_silu_mul(const void *gate_up, void *out, int in_bf16, int out_bf16, int64_t inter,
                      int64_t rows, int threads);
void sirocco_rope_store(const void *qkv, const float *cos_, const float *sin_,
                        const int64_t *slots, float *q_out, void *k_cache, void *v_cache,
                        int in_bf16, int cache_bf16, int64_t T, int H, int KVH, int D,
                        int block_size, int threads);
int sirocco_paged_attention(const float *q, const void *k_cache, const void *v_cache,
                            const int32_t *tables, const int32_t *seq_of, const int32_t *pos_of,
                            const int32_t *chunks, float *out, int64_t num_chunks, int H, int KVH,
                            int D, int block_size, int max_blocks, int window, float scale,
                            int cache_bf16, int threads);
int sirocco_qmatmul(const float *x, const uint8_t *w, const float *scales, const float *offsets,
                    float *y, int64_t M, int64_t N, int64_t K, int bits, int threads);
int sirocco_bf16_matmul(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M,
                        int64_t N, int64_t K, int threads);
int sirocco_q4_bf16_matmul(const uint16_t *x, const uint8_t *w, const uint16_t *scales,
                           const uint16_t *offsets, uint16_t *y, int64_t M, int64_t N, int64_t K,
                           int threads);

/* The linear layers' kernels (decoder_stack.py's KERNELS): float32 rows in and out for the
 * int4 and int8 kernel, bfloat16 for the bfloat16 dot-product ones. */
enum { INT4 = 0, INT8 = 1, BF16 = 2, INT4_BF16 = 3 };
enum { LINEAR_FIELDS = 6, PLAN_STRIDE = 2 + 4 * LINEAR_FIELDS };

/* Threads for `work` as kernels.py's threads_for counts them: one a `per_thread` of work, at
 * least one, at most max_threads (the Python path's counts, so both run alike). */
static inline int threads_for(double work, double per_thread, int max_threads) {
    const double n = work / per_thread;
    return n < 1 ? 1 : n > max_threads ? max_threads : (int)n;
}

static inline int bf16_rows(const int64_t *linear) { return linear[0] >= BF16; }

static int linear(const int64_t *l, const void *x, void *y, int64_t M, int64_t per_thread,
                  int max_threads) {
    const int64_t N = l[4], K = l[5];
    const int threads = threads_for((double)M * N * K, (double)per_thread, max_threads);
    switch (l[0]) {
    case INT4:
    case INT8:
        return sirocco_qmatmul(x, (const uint8_t *)l[1], (const float *)l[2],
                               (const float *)l[3], y, M, N, K, l[0] == INT4 ? 4 : 8, threads);
    case BF16:
        return sirocco_bf16_matmul(x, (const uint16_t *)l[1], y, M, N, K, threads);
    default:
        return sirocco_q4_bf16_matmul(x, (const uint8_t *)l[1], (const uint16_t *)l[2],
                                      (const uint16_t *)l[3], y, M, N, K, threads);
    }
}

/* x [T, hidden] (float32, the residual stream) through `layers` layers, in place. The KV
 * cache of layer i: keys at k_cache + i * layer_stride elements ([num_blocks, KVH, D,
 * block_size]), values at v_cache + i * layer_stride; the attention layout as
 * sirocco_paged_attention takes it; a kernel's threads as the Python path counts them, from
 * the work a thread takes: matmul_per_thread (kernels.MATMUL_PER_THREAD), ops_per_thread
 * (decoder_ops.PER_THREAD), attention_per_thread (paged_attention.PER_THREAD). Returns 0, or
 * -1 if out of memory. */
int sirocco_decoder_stack(const int64_t *plan, int layers, float *x, int64_t T, int64_t hidden,
                          int64_t inter, const float *cos_, const float *sin_,
                          const int64_t *slots, char *k_cache, char *v_cache,
                          int64_t layer_stride, int cache_bf16, const int32_t *tables,
                          const int32_t *seq_of, const int32_t *pos_of, const int32_t *chunks,
                          int64_t num_chunks, int64_t key_reads, int H, int KVH, int D,
                          int block_size, int max_blocks, int window, float scale, float eps,
                          int64_t matmul_per_thread, int64_t ops_per_thread,
                          int64_t attention_per_thread, int max_threads) {
    const int64_t qkv_width = (int64_t)(H + 2 * KVH) * D, attn_width = (int64_t)H * D;
    const int64_t element = cache_bf16 ? 2 : 4;
    /* the buffers, each wide enough for float32 rows */
    float *scratch = malloc(sizeof(float) * T * (3 * hidden + qkv_width + 3 * attn_width
                                                 + 3 * inter));
    if (scratch == NULL) return -1;
    float *h = scratch, *qkv = h + T * hidden, *q = qkv + T * qkv_width;
    float *attn = q + T * attn_width, *attn_rows = attn + T * attn_width;
    float *o = attn_rows + T * attn_width, *gate_up = o + T * hidden;
    float *gated = gate_up + T * 2 * inter, *down = gated + T * inter;
    const double ops = (double)ops_per_thread;
    const int norm_threads = threads_for((double)T * hidden, ops, max_threads);
    const int rope_threads = threads_for((double)T * qkv_width * 2, ops, max_threads);
    const int silu_threads = threads_for((double)T * inter * 8, ops, max_threads);
    const int attention_threads = threads_for((double)key_reads * H * D * 2,
                                              (double)attention_per_thread, max_threads);
    int delta_bf16 = 0, status = 0;
    for (int i = 0; i < layers; i++) {
        const int64_t *p = plan + (int64_t)i * PLAN_STRIDE;
        const float *attention_norm = (const float *)p[0], *ffn_norm = (const float *)p[1];
        const int64_t *wqkv = p + 2, *wo = wqkv + LINEAR_FIELDS;
        const int64_t *w_gate_up = wo + LINEAR_FIELDS, *w_down = w_gate_up + LINEAR_FIELDS;
        void *keys = k_cache + i * layer_stride * element;
        void *values = v_cache + i * layer_stride * element;

        sirocco_rms_norm(x, i > 0 ? down : NULL, attention_norm, h, delta_bf16,
                         bf16_rows(wqkv), hidden, T, eps, norm_threads);
        if ((status = linear(wqkv, h, qkv, T, matmul_per_thread, max_threads)) != 0) break;
        sirocco_rope_store(qkv, cos_, sin_, slots, q, keys, values, bf16_rows(wqkv), cache_bf16,
                           T, H, KVH, D, block_size, rope_threads);
        status = sirocco_paged_attention(q, keys, values, tables, seq_of, pos_of, chunks, attn,
                                         num_chunks, H, KVH, D, block_size, max_blocks, window,
                                         scale, cache_bf16, attention_threads);
        if (status != 0) break;
        const void *rows = attn;
        if (bf16_rows(wo)) {  /* the attention's float32 output, rounded for wo */
            for (int64_t e = 0; e < T * attn_width; e++) store_any(attn_rows, e, attn[e], 1);
            rows = attn_rows;
        }
        if ((status = linear(wo, rows, o, T, matmul_per_thread, max_threads)) != 0) break;
        sirocco_rms_norm(x, o, ffn_norm, h, bf16_rows(wo), bf16_rows(w_gate_up), hidden, T, eps,
                         norm_threads);
        status = linear(w_gate_up, h, gate_up, T, matmul_per_thread, max_threads);
        if (status != 0) break;
        sirocco_silu_mul(gate_up, gated, bf16_rows(w_gate_up), bf16_rows(w_down), inter, T,
                         silu_threads);
        status = linear(w_down, gated, down, T, matmul_per_thread, max_threads);
        if (status != 0) break;
        delta_bf16 = bf16_rows(w_down);
    }
    if (status == 0)
        for (int64_t e = 0; e < T * hidden; e++) x[e] += load_any(down, e, delta_bf16);
    free(scratch);
    return status;
}

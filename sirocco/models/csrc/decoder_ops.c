/* The decoder's element-wise work on a CPU, fused, row by row, in float32.
 *
 * Between its matrix multiplications a decoder layer does little arithmetic in many small
 * operators (a norm, a residual add, RoPE, the KV-cache writes, SiLU times the up
 * projection): at batch 1 PyTorch spends more time dispatching them than computing. Each
 * function here does one such run of work in one call. Every row (a token) is computed on its
 * own in one fixed order, so a token's result does not depend on what else is in the batch.
 *
 * A tensor of activations is float32 or bfloat16 (`*_bf16` flags), as the next matrix kernel
 * takes it (PyTorch's int4 kernel takes bfloat16 rows). Arithmetic is float32; a bfloat16
 * result is rounded to nearest even, as PyTorch rounds.
 *
 * Built by sirocco/models/kernels.py with the other kernels; `threads` share the rows (an
 * OpenMP loop, in PyTorch's own OpenMP pool, where the build has OpenMP).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fast_exp.h"

#include "lanes.h"

/* x [rows, dim] (float32, the residual stream): x += delta where delta [rows, dim] is given,
 * then out = x / sqrt(mean(x^2) + eps) * weight. The sum of squares puts element d in lane
 * d % 16 and adds the lanes in a fixed tree. */
void sirocco_rms_norm(float *x, const void *delta, const float *weight, void *out,
                      int delta_bf16, int out_bf16, int64_t dim, int64_t rows, float eps,
                      int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *restrict xr = x + r * dim;
        if (delta != NULL) {
            if (delta_bf16) {
                const uint16_t *restrict dr = (const uint16_t *)delta + r * dim;
                for (int64_t d = 0; d < dim; d++) xr[d] += from_bf16(dr[d]);
            } else {
                const float *restrict dr = (const float *)delta + r * dim;
                for (int64_t d = 0; d < dim; d++) xr[d] += dr[d];
            }
        }
        float lanes[LANES] = {0};
        int64_t d = 0;
        for (; d + LANES <= dim; d += LANES) {
#pragma omp simd
            for (int l = 0; l < LANES; l++) lanes[l] += xr[d + l] * xr[d + l];
        }
        for (int l = 0; d + l < dim; l++) lanes[l] += xr[d + l] * xr[d + l];
        for (int w = LANES / 2; w > 0; w /= 2)
            for (int l = 0; l < w; l++) lanes[l] += lanes[l + w];
        const float rstd = 1.0f / sqrtf(lanes[0] / (float)dim + eps);
        if (out_bf16) {
            uint16_t *restrict o = (uint16_t *)out + r * dim;
            for (int64_t e = 0; e < dim; e++) o[e] = to_bf16(xr[e] * rstd * weight[e]);
        } else {
            float *restrict o = (float *)out + r * dim;
            for (int64_t e = 0; e < dim; e++) o[e] = xr[e] * rstd * weight[e];
        }
    }
}

/* gate_up [rows, 2 * inter] (gate, then up): out [rows, inter] = silu(gate) * up,
 * silu(g) = g / (1 + e^-g). */
void sirocco_silu_mul(const void *gate_up, void *out, int in_bf16, int out_bf16, int64_t inter,
                      int64_t rows, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t in_row = r * 2 * inter, out_row = r * inter;
        for (int64_t i = 0; i < inter; i++) {
            const float g = load_any(gate_up, in_row + i, in_bf16);
            const float u = load_any(gate_up, in_row + inter + i, in_bf16);
            store_any(out, out_row + i, g / (1.0f + exp_clamped(-g, 88.0f)) * u, out_bf16);
        }
    }
}

/* The tokens of qkv [T, H + 2 KVH heads, D] (the q heads, then k, then v): RoPE
 * (rotate-half: x * cos + rotate_half(x) * sin, cos and sin [T, D]) on the q and k heads;
 * q goes to q_out [T, H, D] (float32), k and v to the caches (float32, or bfloat16 where
 * cache_bf16) at the token's slot (block * block_size + offset): k_cache [blocks, KVH, D,
 * block_size] (transposed, as the attention kernel reads it), v_cache [blocks, block_size,
 * KVH, D]. */
void sirocco_rope_store(const void *qkv, const float *cos_, const float *sin_,
                        const int64_t *slots, float *q_out, void *k_cache, void *v_cache,
                        int in_bf16, int cache_bf16, int64_t T, int H, int KVH, int D,
                        int block_size, int threads) {
    const int half = D / 2;
    const int64_t row = (int64_t)(H + 2 * KVH) * D;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *restrict c = cos_ + t * D, *restrict s = sin_ + t * D;
        const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int h = 0; h < H + KVH; h++) {
            const int64_t src = t * row + (int64_t)h * D;
            /* q rows are contiguous; a key's dimensions lie block_size apart */
            void *dst = h < H ? (void *)q_out : k_cache;
            const int bf16 = h < H ? 0 : cache_bf16;
            const int64_t at = h < H ? (t * H + h) * D
                                     : (block * KVH + (h - H)) * D * block_size + offset;
            const int64_t step = h < H ? 1 : block_size;
            for (int d = 0; d < half; d++) {
                const float x = load_any(qkv, src + d, in_bf16);
                const float y = load_any(qkv, src + d + half, in_bf16);
                store_any(dst, at + d * step, x * c[d] + (-y) * s[d], bf16);
                store_any(dst, at + (d + half) * step, y * c[d + half] + x * s[d + half], bf16);
            }
        }
        for (int h = 0; h < KVH; h++) {
            const int64_t src = t * row + (int64_t)(H + KVH + h) * D;
            const int64_t at = (slots[t] * KVH + h) * D;
            for (int d = 0; d < D; d++)
                store_any(v_cache, at + d, load_any(qkv, src + d, in_bf16), cache_bf16);
        }
    }
}

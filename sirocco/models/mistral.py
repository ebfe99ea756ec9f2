"""The Mistral decoder in plain PyTorch (gpt-fast style: one readable file).

RMSNorm, RoPE (theta and scaling from the config), grouped-query attention, a SiLU-gated
MLP, an optional sliding window, tied or untied embeddings. The q/k/v projections are
fused into one `wqkv` linear layer and gate/up into one `w_gate_up`.

Tokens travel *packed*: a forward takes a 1-D tensor of T token ids (the chunks of every
sequence in the batch, one after another) and their positions; the linear layers never
see padding. Only attention needs a per-sequence layout: `AttentionBatch` says where the
new keys and values go in the paged KV cache (`slot_mapping`) and splits the tokens into
groups that are rectangular grids (all the decodes, one query each; or one prefill chunk),
each with its sequences' block tables and a mask (causal, sliding window, padding of the
keys). Without a cache (`forward_padded`), the keys are the batch's own tokens: that is the
path for embeddings and training.

Linear layers are made by a `LinearFactory`, so quantized or LoRA layers can slot in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sirocco.models import decoder_ops
from sirocco.models.config import ModelConfig
from sirocco.models.kernels import TILE, bf16_dot_products, matmul
from sirocco.models.paged_attention import PagedLayout, paged_attention

LinearFactory = Callable[[int, int], nn.Module]
"""Makes a bias-free linear layer `(in_features, out_features) -> module`."""


class Linear(nn.Linear):
    """A bias-free `nn.Linear` that multiplies a single row with `torch.mv`.

    One token (batch-1 decode) is a matrix-vector product; on CPU `mv` runs it about 1.5x
    faster than `F.linear`'s matrix-matrix path (measured in bfloat16 on the dev box).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.shape[0] == 1:
            return torch.mv(self.weight, x[0]).unsqueeze(0)
        return F.linear(x, self.weight)


def default_linear(in_features: int, out_features: int) -> nn.Module:
    return Linear(in_features, out_features)


def input_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a linear layer takes its rows in: its `input_dtype` (the quantized and
    packed layers say), else its weight's; a LoRA wrapper's is its base layer's."""
    layer = getattr(layer, "base", layer)
    dtype = getattr(layer, "input_dtype", None)
    return dtype if dtype is not None else layer.weight.dtype


# oneDNN lays a packed weight out for a typical number of rows. Packed for 128, the
# bfloat16 weights of a 126M model ran 1.0-1.4x faster than `F.linear` at every row
# count measured, 1 to 2,048 (dev box, all layers in turn so that weights come from RAM).
_PACK_ROWS_HINT = 128


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight is laid out once, at load time, for the CPU's
    kernels (CPU only).

    In bfloat16, where the CPU has bfloat16 dot products (AVX512-BF16), Sirocco's kernel
    serves (`csrc/bf16_matmul.c`): the weight in tiles of 16 outputs, input pairs side by
    side, so that a decode step reads each weight once with one instruction per pair. It
    ran a SmolLM2 decode step's matmuls 1.2-2x faster than oneDNN's packed GEMM (below) and
    its sums do not depend on the number of rows.

    Otherwise the weight sits in oneDNN's blocked layout: `F.linear` on a CPU hands oneDNN
    a plain row-major weight to re-lay out on every call (or, in float32, runs MKL); a
    decode step, a few rows times every weight of the model, pays that again and again.
    oneDNN's blocked GEMM reduces each row in the same order whatever the number of rows,
    except for a single row, which it sends down a matrix-vector path that rounds
    differently. So one row is multiplied as two (MKL's float32 GEMM, by contrast, changes
    kernels with the row count: a token's logits would depend on what else is in the batch).
    """

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.input_dtype = weight.dtype
        self.own_kernel = (weight.dtype == torch.bfloat16 and self.out_features % TILE == 0
                           and self.in_features % 2 == 0 and bf16_dot_products())
        if self.own_kernel:
            n, k = weight.shape
            self.packed = (weight.detach().reshape(n // TILE, TILE, k // 2, 2)
                           .transpose(1, 2).contiguous())
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                  _PACK_ROWS_HINT)

    def forward(self, x: Tensor) -> Tensor:
        if self.own_kernel:
            return self._bf16_matmul(x)
        if x.dim() == 2 and x.shape[0] == 1:
            return self._matmul(x.expand(2, -1).contiguous())[:1]
        return self._matmul(x)

    def _matmul(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def _bf16_matmul(self, x: Tensor) -> Tensor:
        return matmul("sirocco_bf16_matmul", x, (self.packed,), self.out_features, torch.bfloat16)


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `PackedLinear` runs for this dtype on this device: a CPU with oneDNN, in
    float32, or in bfloat16 / float16 where the CPU supports them natively."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


@dataclass
class AttentionGroup:
    """Sequences whose queries form one rectangular [batch_size, T / batch_size] grid.

    The engine makes one group of all the decoding sequences (one query each) and one
    group per prefill chunk, so that no query is ever padded: a decode batch never pays
    for a long prompt's query length.

    start, end: the group's token range in the packed batch.
    mask: bool [batch_size, 1, queries, keys], True where a query may attend to a key;
        None for a plain causal mask over the group's own tokens (the fast path of a
        prompt's first chunk).
    block_tables: [batch_size, max_blocks] cache blocks of each sequence in order (padded
        with block 0, masked out); None when the keys are the group's own tokens.
    """

    start: int
    end: int
    batch_size: int
    mask: Tensor | None
    block_tables: Tensor | None = None


@dataclass
class AttentionBatch:
    """The attention layout of one forward, shared by every layer.

    slot_mapping: [T] flat KV-cache slot (block * block_size + offset) of each new token;
    None for a forward without a KV cache.
    paged: set where the batch-invariant kernel serves (CPU, float32 or bfloat16, the cache
    in the model's dtype): every token attends over the cache by its own position and block
    table, and `groups` are not used.
    """

    groups: list[AttentionGroup]
    slot_mapping: Tensor | None = None
    paged: PagedLayout | None = None


def attention_mask(query_positions: Tensor, num_keys: int, sliding_window: int | None,
                   key_lengths: Tensor | None = None) -> Tensor:
    """Causal (+ sliding window, + key padding) mask [B, 1, Q, K] from query positions [B, Q].

    Key j of a sequence holds position j. A query at position p sees keys p - window < j <= p
    (the window rule of Mistral and transformers). Padding queries should carry position 0
    so that their row is never empty (an empty row would make softmax return NaN).
    """
    keys = torch.arange(num_keys, device=query_positions.device)
    q = query_positions.unsqueeze(-1)
    mask = keys <= q
    if sliding_window is not None:
        mask &= keys > q - sliding_window
    if key_lengths is not None:
        mask &= keys < key_lengths.view(-1, 1, 1)
    return mask.unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused op (it accumulates in float32, as transformers' RMSNorm does). The
        # weight may be held in float32 for the fused kernels (`float32_layer_norms`).
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, weight.shape, weight, self.eps)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """RoPE inverse frequencies (float32) with the config's theta and scaling."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(
        f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)"
    )


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [T, heads, head_dim] by cos/sin [T, head_dim] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        self.wqkv = linear(config.hidden_size, q_size + 2 * kv_size)
        self.wo = linear(q_size, config.hidden_size)
        self.sliding_window = config.sliding_window

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                kv_cache: Tensor | None) -> Tensor:
        """x [T, hidden]; kv_cache None or [2, num_blocks, block_size, n_kv_heads, head_dim]."""
        t = x.shape[0]
        if batch.paged is not None:
            return self._forward_paged(x, cos, sin, batch, kv_cache)
        qkv = self.wqkv(x).view(t, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        # Rotate the q and k heads in one go, then split.
        qk = apply_rope(qkv[:, : self.n_heads + self.n_kv_heads], cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
        v = qkv[:, self.n_heads + self.n_kv_heads:]
        if kv_cache is not None:
            k_cache, v_cache = kv_cache[0], kv_cache[1]
            k_cache.view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
            v_cache.view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        outs = []
        for g in batch.groups:
            b = g.batch_size
            if g.block_tables is None:
                keys = k[g.start:g.end].unflatten(0, (b, -1))
                values = v[g.start:g.end].unflatten(0, (b, -1))
            else:
                # Each sequence's blocks in order: [b, max_blocks * block_size, heads, dim]
                # (index_select of whole blocks is about twice as fast as fancy indexing).
                ids = g.block_tables.flatten()
                shape = (b, -1, self.n_kv_heads, self.head_dim)
                keys = kv_cache[0].flatten(1).index_select(0, ids).view(shape)
                values = kv_cache[1].flatten(1).index_select(0, ids).view(shape)
            out = F.scaled_dot_product_attention(
                q[g.start:g.end].unflatten(0, (b, -1)).transpose(1, 2), keys.transpose(1, 2),
                values.transpose(1, 2), attn_mask=g.mask, is_causal=g.mask is None,
                enable_gqa=self.n_heads != self.n_kv_heads)
            outs.append(out.transpose(1, 2).reshape(g.end - g.start, -1))
        return self.wo(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _forward_paged(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                       kv_cache: Tensor) -> Tensor:
        """The CPU float32 path: RoPE and the cache writes in one kernel, then the
        batch-invariant attention over the paged cache (`kv_cache` [2, num_blocks,
        block_size, kv_heads, head_dim] in size)."""
        num_blocks, block_size = kv_cache.shape[1:3]
        # The keys' half of the cache holds each block transposed (the kernel's layout).
        k_cache = kv_cache[0].view(num_blocks, self.n_kv_heads, self.head_dim, block_size)
        v_cache = kv_cache[1]
        q = decoder_ops.rope_store(self.wqkv(x), cos, sin, batch.slot_mapping, k_cache, v_cache,
                                   self.n_heads)
        out = paged_attention(q, k_cache, v_cache, batch.paged, self.sliding_window)
        return self.wo(out.view(x.shape[0], -1).to(input_dtype(self.wo)))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w_gate_up = linear(config.hidden_size, 2 * config.intermediate_size)
        self.w_down = linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).split(self.intermediate_size, dim=-1)
        return self.w_down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, linear)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config, linear)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                kv_cache: Tensor | None) -> Tensor:
        """`x` is the float32 residual stream; the layer computes in the weights' dtype."""
        if batch.paged is not None:
            return self._forward_paged(x, cos, sin, batch, kv_cache)
        dtype = cos.dtype  # the weights' (the norms' may be float32: float32_layer_norms)
        x = x + self.attention(self.attention_norm(x.to(dtype)), cos, sin, batch, kv_cache)
        return x + self.feed_forward(self.ffn_norm(x.to(dtype)))

    def _forward_paged(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
                       kv_cache: Tensor) -> Tensor:
        """The CPU float32 path: the same layer with its element-wise work in fused kernels
        (`decoder_ops`); x is updated in place."""
        attention, ffn = self.attention, self.feed_forward
        eps = self.attention_norm.eps
        h = decoder_ops.rms_norm(x, self.attention_norm.weight, eps, input_dtype(attention.wqkv))
        h = decoder_ops.rms_norm(x, self.ffn_norm.weight, eps, input_dtype(ffn.w_gate_up),
                                 delta=attention(h, cos, sin, batch, kv_cache))
        gated = decoder_ops.silu_mul(ffn.w_gate_up(h), input_dtype(ffn.w_down))
        return x.add_(ffn.w_down(gated))


class MistralModel(nn.Module):
    """A Mistral (or Llama) decoder with its output head."""

    def __init__(self, config: ModelConfig, linear: LinearFactory = default_linear) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, linear) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self.inv_freq = rope_inverse_frequencies(config)
        # Set by the serving side where every layer runs in one C call (`decoder_stack.py`).
        self.decoder_stack = None

    def forward(self, input_ids: Tensor, positions: Tensor, batch: AttentionBatch,
                kv_caches: list[Tensor] | None = None) -> Tensor:
        """Final (normalised) hidden states [T, hidden] of packed tokens [T] at `positions`.

        These are the states before `lm_head`: `compute_logits` turns the rows you need
        into logits, and embedding pooling reads them directly.
        """
        # The residual stream stays in float32 whatever the weights' dtype: summing 2 x
        # layers of bfloat16 updates in bfloat16 drifts enough to change greedy answers
        # (SmolLM2-135M: logits 0.62 off float32 instead of 0.34, a different first token).
        x = self.embed_tokens(input_ids)
        dtype = x.dtype
        x = x.float()
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()  # float32 for the paged path's kernels
        if batch.paged is None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        stack = self.decoder_stack
        if stack is not None and stack.serves(batch, kv_caches):
            x = stack.run(x, cos, sin, batch, kv_caches)
        else:
            for i, layer in enumerate(self.layers):
                x = layer(x, cos, sin, batch, None if kv_caches is None else kv_caches[i])
        return self.norm(x.to(dtype))

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def pack_linear_layers(self) -> None:
        """Swap every linear layer (the output head included) for a `PackedLinear`, for
        serving where `can_pack` says so. The plain weights are released, except a tied
        output head's: the embedding lookup still reads it, so that head costs a second
        copy of the embedding matrix."""
        for owner in list(self.modules()):
            for name, child in owner.named_children():
                if isinstance(child, Linear):
                    setattr(owner, name, PackedLinear(child.weight))

    def float32_layer_norms(self) -> None:
        """Hold the decoder layers' norm weights in float32, as the fused kernels of the
        paged path read them (the same values: a bfloat16 widens exactly)."""
        for layer in self.layers:
            for norm in (layer.attention_norm, layer.ffn_norm):
                norm.weight.data = norm.weight.data.float()

    def forward_padded(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Hidden states [B, L, hidden] of right-padded prompts [B, L], without a KV cache.

        `lengths` [B] gives each row's true length (default: all L). Rows past a prompt's
        length are padding and carry no meaning.
        """
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device).expand(b, n)
        mask = attention_mask(positions, n, self.config.sliding_window, lengths)
        batch = AttentionBatch([AttentionGroup(0, b * n, b, mask)])
        hidden = self.forward(input_ids.reshape(-1), positions.reshape(-1), batch)
        return hidden.view(b, n, -1)

    def load_hf_state_dict(self, state_dict: dict[str, Tensor], assign: bool = False) -> None:
        """Load weights in Hugging Face naming, fusing q/k/v and gate/up.

        `assign=True` adopts the tensors instead of copying them (for a model built on
        the meta device: no second copy of the weights is ever made).
        Raises KeyError naming the first missing tensor, ValueError for unused ones.
        """
        sd = dict(state_dict)
        out: dict[str, Tensor] = {"embed_tokens.weight": sd.pop("model.embed_tokens.weight"),
                                  "norm.weight": sd.pop("model.norm.weight")}
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            q, k, v = (sd.pop(f"{p}self_attn.{n}_proj.weight") for n in "qkv")
            out[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v])
            out[f"layers.{i}.attention.wo.weight"] = sd.pop(f"{p}self_attn.o_proj.weight")
            gate, up = sd.pop(f"{p}mlp.gate_proj.weight"), sd.pop(f"{p}mlp.up_proj.weight")
            out[f"layers.{i}.feed_forward.w_gate_up.weight"] = torch.cat([gate, up])
            out[f"layers.{i}.feed_forward.w_down.weight"] = sd.pop(f"{p}mlp.down_proj.weight")
            out[f"layers.{i}.attention_norm.weight"] = sd.pop(f"{p}input_layernorm.weight")
            out[f"layers.{i}.ffn_norm.weight"] = sd.pop(f"{p}post_attention_layernorm.weight")
        head = sd.pop("lm_head.weight", None)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # (re-)tie: `.to_empty` unties
            out["lm_head.weight"] = out["embed_tokens.weight"]
        else:
            if head is None:
                raise KeyError("lm_head.weight (the checkpoint's embeddings are not tied)")
            out["lm_head.weight"] = head
        sd = {k: t for k, t in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if sd:
            raise ValueError(f"unexpected tensors in the state dict: {sorted(sd)[:5]}")
        self.load_state_dict(out, strict=True, assign=assign)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

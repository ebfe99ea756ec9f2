"""A paged forward's decoder layers in one C call (`csrc/decoder_stack.c`).

Through Python a decode step of a small model pays per layer for ~9 kernel calls (module
calls, tensor allocations, ctypes): on SmolLM2's 30 layers a fifth of a one-stream step.
`DecoderStack` hands the C side a plan of every layer's weights once, at load time, and runs
all the layers in one call (its buffers allocated once a step), with the kernels, arguments
and thread counts the Python path uses: the results are bitwise the same
(`tests/engine/test_invariance.py` compares the two).

It serves where every linear layer of the decoder runs on one of Sirocco's own kernels (the
int4 / int8 layers on float32 or bfloat16 rows, the bfloat16 dot-product layers) and no
LoRA adapter is active in the batch; elsewhere the model runs its layers from Python.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sirocco.models import decoder_ops, paged_attention
from sirocco.models.kernels import MATMUL_PER_THREAD, library
from sirocco.models.lora import LoRAContext
from sirocco.models.mistral import AttentionBatch, MistralModel, PackedLinear
from sirocco.models.quantized import Int4Linear, Int8Linear

# csrc/decoder_stack.c's kernels of a linear layer
INT4, INT8, BF16, INT4_BF16 = range(4)


def _linear_fields(layer: nn.Module) -> list[int] | None:
    """(kernel, three weight pointers, N, K) of a linear layer (a LoRA wrapper's base), or
    None where it is not on Sirocco's kernels."""
    base = getattr(layer, "base", layer)
    n, k = base.out_features, base.in_features
    if isinstance(base, Int4Linear) and base.own_kernel:
        kind = INT4_BF16 if base.input_dtype == torch.bfloat16 else INT4
        return [kind, base.packed.data_ptr(), base.scales.data_ptr(), base.offsets.data_ptr(),
                n, k]
    if isinstance(base, Int8Linear) and base.own_kernel:
        return [INT8, base.q.data_ptr(), base.scales.data_ptr(), base.scales.data_ptr(), n, k]
    if isinstance(base, PackedLinear) and base.own_kernel:
        return [BF16, base.packed.data_ptr(), 0, 0, n, k]
    return None


class DecoderStack:
    """The plan of a model's decoder layers for `sirocco_decoder_stack`."""

    def __init__(self, model: MistralModel, plan: Tensor, lora: LoRAContext | None) -> None:
        config = model.config
        self.model = model  # (it holds the weights the plan points to)
        self.plan = plan
        self.lora = lora
        self.layers = len(model.layers)
        self.hidden, self.inter = config.hidden_size, config.intermediate_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.sliding_window or 0
        self.eps = model.layers[0].attention_norm.eps

    @classmethod
    def build(cls, model: MistralModel, lora: LoRAContext | None = None) -> DecoderStack | None:
        """The stack of `model` (quantized or packed, norms in float32), or None where a
        layer is not on Sirocco's kernels."""
        if library() is None:
            return None
        rows = []
        for layer in model.layers:
            norms = (layer.attention_norm.weight, layer.ffn_norm.weight)
            if any(w.dtype != torch.float32 or not w.is_contiguous() for w in norms):
                return None
            row = [w.data_ptr() for w in norms]
            for linear in (layer.attention.wqkv, layer.attention.wo,
                           layer.feed_forward.w_gate_up, layer.feed_forward.w_down):
                fields = _linear_fields(linear)
                if fields is None:
                    return None
                row += fields
            rows.append(row)
        return cls(model, torch.tensor(rows, dtype=torch.int64), lora)

    def serves(self, batch: AttentionBatch, kv_caches: list[Tensor] | None) -> bool:
        """Whether this forward can run here: paged, with a cache, no adapter active."""
        return (batch.paged is not None and kv_caches is not None
                and not (self.lora is not None and self.lora.rows))

    def run(self, x: Tensor, cos: Tensor, sin: Tensor, batch: AttentionBatch,
            kv_caches: list[Tensor]) -> Tensor:
        """x [T, hidden] (float32) through every layer, in place; `kv_caches` the runner's
        per-layer views [2, num_blocks, block_size, kv_heads, head_dim] of one tensor."""
        layout = batch.paged
        assert layout is not None and batch.slot_mapping is not None
        assert x.dtype == torch.float32 and x.is_contiguous()
        first = kv_caches[0]
        layer_stride = first.numel()
        assert first.is_contiguous() and len(kv_caches) == self.layers
        assert (kv_caches[-1].data_ptr() - first.data_ptr()
                == (self.layers - 1) * layer_stride * first.element_size())
        cos, sin = cos.contiguous(), sin.contiguous()
        block_size = first.shape[2]
        status = library().releasing.sirocco_decoder_stack(
            self.plan.data_ptr(), self.layers, x.data_ptr(), x.shape[0], self.hidden, self.inter,
            cos.data_ptr(), sin.data_ptr(), batch.slot_mapping.data_ptr(), first[0].data_ptr(),
            first[1].data_ptr(), layer_stride, int(first.dtype == torch.bfloat16),
            layout.tables.data_ptr(), layout.seq_of.data_ptr(), layout.pos_of.data_ptr(),
            layout.chunks.data_ptr(), layout.chunks.shape[0] - 1, layout.key_reads, self.heads,
            self.kv_heads, self.head_dim, block_size, layout.tables.shape[1], self.window,
            self.head_dim ** -0.5, self.eps, MATMUL_PER_THREAD, decoder_ops.PER_THREAD,
            paged_attention.PER_THREAD, torch.get_num_threads())
        if status != 0:
            raise MemoryError("the decoder stack's kernels could not allocate their buffers")
        return x

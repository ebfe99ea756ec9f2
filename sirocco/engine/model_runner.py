"""Owns the device: the model's weights, the paged KV cache, the batch tensors."""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from sirocco.engine.config import EngineConfig, default_kv_cache_memory, resolve_dtype
from sirocco.engine.outputs import TokenLogprob
from sirocco.engine.sampler import sample
from sirocco.engine.scheduler import ScheduledBatch
from sirocco.engine.sequence import Sequence
from sirocco.models import paged_attention
from sirocco.models.config import ModelConfig
from sirocco.models.decoder_stack import DecoderStack
from sirocco.models.lora import attach_lora
from sirocco.models.mistral import (
    AttentionBatch,
    AttentionGroup,
    MistralModel,
    attention_mask,
    can_pack,
)
from sirocco.models.quantized import (
    head_mode,
    quantize_linear_layers,
    resolve_quantization,
    split_q4_1_blocks,
)

logger = logging.getLogger(__name__)

_PROMPT_LOGPROBS_ROWS = 256  # prompt positions whose full logits are computed at once


class ModelRunner:
    """Runs one scheduled step: packs the chunks into tensors, runs the model, samples.

    The KV cache is one tensor [layers, 2 (k, v), num_blocks, block_size, kv_heads,
    head_dim]; `num_blocks` follows from `EngineConfig.kv_cache_memory`.
    """

    def __init__(self, model_config: ModelConfig, state_dict: dict[str, Tensor],
                 config: EngineConfig) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, config.device)
        self.quantization = resolve_quantization(config.quantization)
        state_dict, q4_1_blocks = split_q4_1_blocks(state_dict)
        with torch.device("meta"):  # no memory, no random init: the weights come next
            model = MistralModel(model_config)
        model.load_hf_state_dict(
            {k: v.to(device=self.device, dtype=self.dtype) for k, v in state_dict.items()},
            assign=True)
        if self.quantization != "none":
            swapped, adopted = quantize_linear_layers(
                model, self.quantization, q4_1_blocks,
                head=head_mode(self.quantization, self.dtype), rows=self.dtype)
            logger.info("quantization %s: %d linear layers, %d of them from the file's own "
                        "Q4_1 blocks", self.quantization, swapped, adopted)
        if can_pack(self.dtype, self.device):
            model.pack_linear_layers()
        self.model = model.eval()
        # Batch-invariant attention where it serves (see the README's Exactness section).
        self.invariant_attention = paged_attention.available(self.dtype, self.device)
        if self.invariant_attention:
            model.float32_layer_norms()
        self.lora = attach_lora(self.model)  # adapters are added by name, at run time
        if self.invariant_attention and config.decoder_stack:
            self.model.decoder_stack = DecoderStack.build(self.model, self.lora)
        logger.info("decoder layers run %s", "in one C call a step" if self.model.decoder_stack
                    else "from Python")

        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        mc = model_config
        bytes_per_token = (2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim
                           * self.dtype.itemsize)
        budget = config.kv_cache_memory
        if budget is None:
            budget = default_kv_cache_memory(
                config.device, config.max_num_seqs * self.max_model_len, bytes_per_token)
        self.num_blocks = budget // (bytes_per_token * self.block_size)
        if self.num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no block of "
                             f"{self.block_size} tokens ({bytes_per_token} bytes per token)")
        # Zeroed: masked-out keys are still multiplied by 0, and 0 * NaN would be NaN.
        self.kv_cache = torch.zeros(
            mc.num_hidden_layers, 2, self.num_blocks, self.block_size, mc.num_key_value_heads,
            mc.head_dim, dtype=self.dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB, %s)", self.num_blocks,
                    self.block_size, self.kv_cache.numel() * self.dtype.itemsize / 2**20,
                    self.dtype)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, eos_token_ids: tuple[int, ...] = ()
                ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Run one step. Returns the sampled token (and logprobs) of each scheduled
        sequence whose chunk reaches its last token, in batch order."""
        if batch.block_copies:
            src, dst = zip(*batch.block_copies, strict=True)
            self.kv_cache[:, :, list(dst)] = self.kv_cache[:, :, list(src)]
        input_ids, positions, attn, sample_rows = self._prepare(batch)
        self.lora.set_batch([s.lora_slot for s, n in zip(batch.seqs, batch.num_new_tokens,
                                                         strict=True) for _ in range(n)],
                            self.device)
        hidden = self.model(input_ids, positions, attn, list(self.kv_cache))
        if any(s.needs_prompt_logprobs for s in batch.seqs):
            self._record_prompt_logprobs(batch, hidden)
        if not sample_rows:
            return [], []
        rows = torch.tensor(sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        sampled = [s for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
                   if s.num_computed_tokens + n == len(s)]
        return sample(logits, sampled, eos_token_ids)

    def _record_prompt_logprobs(self, batch: ScheduledBatch, hidden: Tensor) -> None:
        """Append to `seq.prompt_logprobs` the prompt logprobs this step's chunk gives.

        The row of position q holds the distribution of token q + 1, so a chunk over
        positions [start, start + n) gives prompt tokens start + 1 .. start + n (those
        still in the prompt). Positions recorded before (a sequence recomputed after
        preemption) are skipped, so nothing is recorded twice. Logits are computed a
        bounded number of rows at a time: a long chunk times a large vocabulary would not
        fit at once.
        """
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            if seq.needs_prompt_logprobs:
                first = len(seq.prompt_logprobs)
                end = min(start + n, seq.num_prompt_tokens - 1)
                assert first >= start, "prompt positions before this chunk were never recorded"
                k = seq.params.prompt_logprobs or 0
                for lo in range(first, end, _PROMPT_LOGPROBS_ROWS):
                    hi = min(lo + _PROMPT_LOGPROBS_ROWS, end)
                    rows = hidden[offset + lo - start: offset + hi - start]
                    raw = torch.log_softmax(self.model.compute_logits(rows).float(), dim=-1)
                    targets = seq.token_ids[lo + 1: hi + 1]
                    chosen = raw.gather(1, torch.tensor(targets, device=self.device)
                                        .unsqueeze(1)).squeeze(1).tolist()
                    if k:
                        top_vals, top_ids = raw.topk(k, dim=-1)
                        tops = [list(zip(i, v, strict=True)) for i, v
                                in zip(top_ids.tolist(), top_vals.tolist(), strict=True)]
                    else:
                        tops = [[] for _ in targets]
                    seq.prompt_logprobs += [TokenLogprob(t, lp, top) for t, lp, top
                                            in zip(targets, chosen, tops, strict=True)]
            offset += n

    def _prepare(self, batch: ScheduledBatch) -> tuple[Tensor, Tensor, AttentionBatch, list[int]]:
        """Packed token ids and positions, the attention layout, and the rows to sample."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            table = seq.block_table
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if start + n == len(seq):
                sample_rows.append(len(input_ids) - 1)
        dev = self.device
        pos = torch.tensor(positions, device=dev)
        if self.invariant_attention:
            layout = paged_attention.PagedLayout.build(
                [s.block_table for s in batch.seqs], [s.num_computed_tokens for s in batch.seqs],
                batch.num_new_tokens)
            attn = AttentionBatch([], torch.tensor(slots, device=dev), layout)
            return torch.tensor(input_ids, device=dev), pos, attn, sample_rows
        # Consecutive decodes (one token each) share a group, and so do consecutive first
        # chunks of prompts of the same length; every other chunk has a group of its own.
        groups: list[list[tuple[Sequence, int]]] = []
        last_kind = None
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            kind = ("decode" if n == 1 else ("first chunk", n) if seq.num_computed_tokens == 0
                    else None)
            if kind is not None and kind == last_kind:
                groups[-1].append((seq, n))
            else:
                groups.append([(seq, n)])
            last_kind = kind
        attn_groups = []
        offset = 0
        window = self.model_config.sliding_window
        for group in groups:
            n = group[0][1]
            end = offset + n * len(group)
            grid = pos[offset:end].view(len(group), n)
            if n > 1 and group[0][0].num_computed_tokens == 0:
                # Prompts' first chunks: their keys are their own tokens, no gather needed.
                mask = None if window is None or n <= window else attention_mask(grid, n, window)
                attn_groups.append(AttentionGroup(offset, end, len(group), mask))
            else:
                width = max(len(seq.block_table) for seq, _ in group)
                tables = [s.block_table + [0] * (width - len(s.block_table)) for s, _ in group]
                mask = attention_mask(grid, width * bs, window)
                attn_groups.append(AttentionGroup(offset, end, len(group), mask,
                                                  torch.tensor(tables, device=dev)))
            offset = end
        attn = AttentionBatch(attn_groups, torch.tensor(slots, device=dev))
        return torch.tensor(input_ids, device=dev), pos, attn, sample_rows

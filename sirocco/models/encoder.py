"""Embedding models: texts in, fixed-size vectors out.

Two kinds share one interface (`PooledEncoder`: tokenize, check lengths, encode):

- `Encoder`, a BERT-family sentence encoder run through transformers' `AutoModel`;
- `DecoderEncoder`, a Mistral/Llama checkpoint run through Sirocco's own `MistralModel`,
  pooled on the last token (e5-mistral style) or on the mean, normalised.

Both follow the sentence-transformers pipeline that ships beside the weights:

- `modules.json` lists the modules in order: `Transformer`, `Pooling`, optionally
  `Normalize`. Any other module (Dense, LayerNorm, ...) is refused at load time rather
  than silently skipped, since the vectors would then be wrong.
- `1_Pooling/config.json` (or whichever folder modules.json names) picks the pooling:
  `cls`, `mean`, `max`, `mean_sqrt_len_tokens` or `lasttoken`, in the new
  (`pooling_mode`) or the legacy (`pooling_mode_*_tokens` booleans) spelling; several
  modes are concatenated in the order given, as sentence-transformers does.
- `sentence_bert_config.json`'s `max_seq_length` is the context limit (the config's
  `max_position_embeddings` when there is none).

A directory without `modules.json` gets mean pooling (last-token for a decoder) and
normalisation (Mistral's embeddings are unit vectors).

Many texts go through one forward per batch: they are sorted by token count and cut into
batches under a padded-token budget, so little compute is spent on padding. The vectors
then go back in input order. Everything here is synchronous torch code; the caller runs it
off the event loop (`sirocco.serving.embeddings.EmbeddingWorker`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


class EncoderLoadError(ValueError):
    """The directory is not an encoder this module can run faithfully."""


class InputTooLong(ValueError):
    """One input has more tokens than the model's context."""

    def __init__(self, index: int, num_tokens: int, max_tokens: int) -> None:
        super().__init__(f"input {index} has {num_tokens} tokens; the model takes at most "
                         f"{max_tokens}")
        self.index = index
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


@dataclass(frozen=True, slots=True)
class EncoderPipeline:
    """What happens after the transformer: pooling mode(s) and normalisation."""

    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None  # from sentence_bert_config.json, if any


@dataclass(slots=True)
class Embeddings:
    """Vectors of one `Encoder.encode` call, in input order, with their token counts."""

    vectors: Tensor  # (num_inputs, dimension), float32, on the CPU
    num_tokens: list[int]


def read_pipeline(path: Path) -> EncoderPipeline:
    """The sentence-transformers pipeline of a model directory (defaults without one)."""
    max_seq_length = None
    bert_config = path / "sentence_bert_config.json"
    if bert_config.is_file():
        max_seq_length = json.loads(bert_config.read_text()).get("max_seq_length")
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return EncoderPipeline(("mean",), True, max_seq_length)
    pooling: tuple[str, ...] | None = None
    normalize = False
    for module in sorted(json.loads(modules_file.read_text()), key=lambda m: m.get("idx", 0)):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pooling = _read_pooling(path / module.get("path", "1_Pooling") / "config.json")
        elif kind == "Normalize":
            normalize = True
        else:
            raise EncoderLoadError(
                f"{modules_file}: module {module.get('type')!r} is not supported (Sirocco runs "
                "Transformer, Pooling and Normalize modules only)")
    if pooling is None:
        raise EncoderLoadError(f"{modules_file} has no Pooling module")
    return EncoderPipeline(pooling, normalize, max_seq_length)


def _read_pooling(config_file: Path) -> tuple[str, ...]:
    config = json.loads(config_file.read_text())
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key)) or ("mean",)
    for mode in modes:
        if mode not in POOLING_MODES:
            raise EncoderLoadError(f"{config_file}: pooling mode {mode!r} is not supported "
                                   f"(supported: {', '.join(POOLING_MODES)})")
    if config.get("include_prompt") is False:
        raise EncoderLoadError(f"{config_file}: include_prompt=false is not supported")
    return modes


def pool(hidden: Tensor, mask: Tensor, modes: tuple[str, ...]) -> Tensor:
    """Sentence vectors from right-padded token states `hidden` (B, T, D) and `mask` (B, T)."""
    outputs = []
    maskf = mask.unsqueeze(-1).to(hidden.dtype)
    lengths = mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
    for mode in modes:
        if mode == "cls":
            outputs.append(hidden[:, 0])
        elif mode == "max":
            outputs.append(hidden.masked_fill(maskf == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            outputs.append((hidden * maskf).sum(dim=1) / lengths)
        elif mode == "mean_sqrt_len_tokens":
            outputs.append((hidden * maskf).sum(dim=1) / lengths.sqrt())
        elif mode == "lasttoken":
            last = (mask.sum(dim=1) - 1).clamp(min=0)
            outputs.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.cat(outputs, dim=-1)


def plan_batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Input indices grouped into batches: longest first, padded size under the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest of the batch
        if current and (len(current) + 1 > max_batch_size
                        or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class PooledEncoder:
    """What every embedding model offers: tokenize, check lengths, encode in batches.

    Subclasses set `path`, `pipeline`, `dimension`, `max_length`, `max_batch_tokens`,
    `max_batch_size` and `architecture`, and implement `tokenize` and `_forward`.
    Instances are thread-confined: one thread calls them at a time.
    """

    path: Path
    pipeline: EncoderPipeline
    dimension: int
    max_length: int
    max_batch_tokens: int
    max_batch_size: int
    architecture: str

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, never truncated."""
        raise NotImplementedError

    def _forward(self, batch_ids: list[list[int]]) -> Tensor:
        """Pooled (and normalised, if the pipeline says so) vectors of one padded batch."""
        raise NotImplementedError

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenize(texts)]

    def check_lengths(self, token_ids: list[list[int]]) -> None:
        """Raise `InputTooLong` for the first input longer than the model's context."""
        for i, ids in enumerate(token_ids):
            if len(ids) > self.max_length:
                raise InputTooLong(i, len(ids), self.max_length)

    def encode(self, texts: list[str]) -> Embeddings:
        """Vectors for `texts`, in order; `InputTooLong` names the first input that is too long."""
        token_ids = self.tokenize(texts)
        self.check_lengths(token_ids)
        return Embeddings(self.encode_tokens(token_ids), [len(ids) for ids in token_ids])

    @torch.inference_mode()
    def encode_tokens(self, token_ids: list[list[int]]) -> Tensor:
        """Vectors (float32, CPU) for tokenized inputs, batched by length, in input order."""
        vectors = torch.empty(len(token_ids), self.dimension, dtype=torch.float32)
        lengths = [len(ids) for ids in token_ids]
        for batch in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size):
            vectors[batch] = self._forward([token_ids[i] for i in batch]).float().cpu()
        return vectors


def _pad(batch_ids: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids [B, L] and their attention mask [B, L]."""
    width = max(len(x) for x in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def _finish(hidden: Tensor, mask: Tensor, pipeline: EncoderPipeline) -> Tensor:
    vectors = pool(hidden, mask, pipeline.pooling)
    if pipeline.normalize:
        vectors = F.normalize(vectors.float(), p=2, dim=-1)
    return vectors


class Encoder(PooledEncoder):
    """A BERT-family sentence encoder (transformers `AutoModel`) from a local directory."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 256,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise EncoderLoadError(f"{self.path} is not a Hugging Face model directory "
                                   "(no config.json)")
        self.pipeline = read_pipeline(self.path)
        self.config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        if getattr(self.config, "is_decoder", False):
            raise EncoderLoadError(f"{self.path}: {self.config.model_type} is a decoder, "
                                   "not an encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(
            self.path, local_files_only=True, dtype=dtype, attn_implementation="sdpa",
        ).to(device).eval()
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.dimension = int(self.config.hidden_size) * len(self.pipeline.pooling)
        positions = int(getattr(self.config, "max_position_embeddings", 512))
        self.max_length = min(self.pipeline.max_seq_length or positions, positions)
        self.architecture = (self.config.architectures or [self.config.model_type])[0]
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._uses_token_types = getattr(self.config, "type_vocab_size", 0) > 0

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=True, truncation=False,
                              verbose=False)["input_ids"]

    def _forward(self, batch_ids: list[list[int]]) -> Tensor:
        input_ids, mask = _pad(batch_ids, self._pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self._uses_token_types:
            inputs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = self.model(**inputs).last_hidden_state
        return _finish(hidden, mask, self.pipeline)


class DecoderEncoder(PooledEncoder):
    """A Mistral (or Llama) checkpoint used as an embedding model.

    Sirocco's own `MistralModel` gives the final normalised hidden states; they are pooled
    on the last token (the e5-mistral recipe: BOS + text + EOS, the EOS state is the
    vector) or averaged, then normalised. A sentence-transformers `modules.json` in the
    directory picks the pooling; without one it is last-token pooling, normalised.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 256,
    ) -> None:
        from sirocco.models.loader import inspect_checkpoint, load_tokenizer, load_weights
        from sirocco.models.mistral import MistralModel

        self.path = Path(path)
        ckpt = inspect_checkpoint(self.path)
        pipeline = read_pipeline(self.path)
        if not (self.path / "modules.json").is_file():
            pipeline = EncoderPipeline(("lasttoken",), True, pipeline.max_seq_length)
        for mode in pipeline.pooling:
            if mode not in ("lasttoken", "mean"):
                raise EncoderLoadError(f"{self.path}: a decoder pools with lasttoken or mean, "
                                       f"not {mode}")
        self.pipeline = pipeline
        self.tokenizer = load_tokenizer(ckpt)
        with torch.device("meta"):
            model = MistralModel(ckpt.config)
        model = model.to_empty(device=device).to(dtype)
        model.load_hf_state_dict({k: v.to(device=device, dtype=dtype)
                                  for k, v in load_weights(ckpt, dtype).items()})
        self.model = model.eval()
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.dimension = ckpt.config.hidden_size * len(pipeline.pooling)
        positions = ckpt.config.max_position_embeddings
        self.max_length = min(pipeline.max_seq_length or positions, positions)
        self.architecture = f"{ckpt.config.architecture} decoder"
        self._eos = self.tokenizer.eos_token_ids[0] if self.tokenizer.eos_token_ids else None

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        ids = [self.tokenizer.encode_text(t, add_bos=True) for t in texts]
        if "lasttoken" in self.pipeline.pooling and self._eos is not None:
            ids = [x + [self._eos] for x in ids]
        return ids

    def _forward(self, batch_ids: list[list[int]]) -> Tensor:
        input_ids, mask = _pad(batch_ids, 0)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        hidden = self.model.forward_padded(input_ids, mask.sum(dim=1))
        return _finish(hidden, mask, self.pipeline)


def is_decoder_checkpoint(path: Path) -> bool:
    """Whether `path` holds a Mistral/Llama decoder rather than an encoder."""
    if (path / "params.json").is_file():
        return True
    config_file = path / "config.json"
    if not config_file.is_file():
        return False
    raw = json.loads(config_file.read_text())
    names = [*(raw.get("architectures") or []), raw.get("model_type", "")]
    return any(n in ("MistralForCausalLM", "LlamaForCausalLM", "mistral", "llama") for n in names)

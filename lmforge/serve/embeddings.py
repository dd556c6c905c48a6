"""`POST /v1/embeddings`, in OpenAI's format: vectors of texts (or token ids) from any served model.

Request: `model`; `input`, a string, a list of strings, a list of token ids or a list of lists of token ids
(at most `MAX_INPUTS` items, none empty, `MAX_TOTAL_TOKENS` tokens in all, as OpenAI limits them);
`encoding_format` "float" (default) or "base64" (the little-endian float32 bytes of each vector, what the
official `openai` client asks for and decodes); `dimensions`, accepted only when it equals the model's
size (we do not shorten vectors: only models trained for it, Matryoshka-style, keep their meaning when
cut, and nothing in a model directory says whether a model was); `user`, ignored.
Response: `{"object": "list", "data": [{"object": "embedding", "index": i, "embedding": ...}], "model",
"usage": {"prompt_tokens", "total_tokens"}}`.

Models: an embedding model (a BERT encoder from the store or the command line; the better choice) or any
chat model (the mean of its last hidden states: see `lmforge.retrieval.embed`). Vectors are unit length.

An input longer than the model's context is a 400 naming it (code `context_length_exceeded`), as OpenAI
answers, rather than a vector of its beginning: a client that stores vectors of silently cut text would
search documents whose ends were never seen. Token-id inputs are used as they are (no special tokens added),
so the client controls exactly what is embedded; text gets the model's own framing ([CLS] ... [SEP]).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Annotated, Any, Callable, Literal

import numpy as np
from fastapi import Request, Response
from pydantic import Field

from lmforge.errors import UserError, one_line
from lmforge.serve.protocol import APIError, Integer, Strict, invalid, parse
from lmforge.serve.security import read_body

__all__ = ["ROUTES", "EmbeddingRequest"]

MAX_INPUTS = 2048  # OpenAI's limit on items per request
MAX_TOTAL_TOKENS = 300_000  # OpenAI's limit on tokens summed over the inputs of one request

_Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingRequest(Strict):
    """The request body, strict and lenient where the other schemas are (`lmforge.serve.protocol.Strict`)."""

    model: str = Field(max_length=500)
    input: str | Annotated[list[str], Field(max_length=MAX_INPUTS)] | _Ids | \
        Annotated[list[_Ids], Field(max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Integer | None = Field(None, ge=1)
    user: str | None = None


def _inputs(value: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token-id rows) of `input`, every item checked non-empty."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise invalid("'input' is empty; send a string or a list of up to 2048 strings or token lists", param="input")
    if isinstance(value[0], int):
        if len(value) > MAX_TOTAL_TOKENS:
            raise invalid(f"'input' has {len(value)} tokens, more than {MAX_TOTAL_TOKENS} per request", param="input")
        return None, [value]
    if isinstance(value[0], list):
        return None, value
    for i, text in enumerate(value):
        if not text:
            raise invalid(f"'input' item {i} is an empty string; every input needs some text", param="input")
    return value, None


def _vectors_body(vectors: np.ndarray, model: str, tokens: int, encoding: str) -> bytes:
    def encoded(v: np.ndarray) -> Any:
        if encoding == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, separators=(",", ":")).encode()


async def embeddings(request: Request) -> Response:
    req: EmbeddingRequest = parse(EmbeddingRequest, await read_body(request))
    texts, rows = _inputs(req.input)
    registry = request.app.state.registry
    served = await registry.get(req.model, embedding=True)
    try:
        embedder = served.embedder if served.embedding_only else registry.embedder(served)
        if req.dimensions is not None and req.dimensions != embedder.dim:
            raise invalid(f"'dimensions' {req.dimensions} is not available: {served.name} makes {embedder.dim}-"
                          f"dimensional vectors and does not shorten them; omit 'dimensions' or send {embedder.dim}",
                          param="dimensions")
        if texts is not None:
            rows = await request.app.state.cpu.run(embedder.tokenize, texts)
        _check_lengths(rows, embedder.max_tokens)
        body = await asyncio.to_thread(_embed, embedder.embed_ids, rows, served.name, req.encoding_format)
    finally:
        registry.release(served)
    return Response(body, media_type="application/json")


def _check_lengths(rows: list[list[int]], context: int) -> None:
    total = 0
    for i, r in enumerate(rows):
        if len(r) > context:
            raise invalid(f"input {i} has {len(r)} tokens, more than this model's maximum context of {context} "
                          "tokens; shorten it or split it", param="input", code="context_length_exceeded")
        total += len(r)
    if total > MAX_TOTAL_TOKENS:
        raise invalid(f"the inputs have {total} tokens in all, more than {MAX_TOTAL_TOKENS} per request; "
                      "send them in several requests", param="input", code="context_length_exceeded")


def _embed(embed_ids: Callable, rows: list[list[int]], model: str, encoding: str) -> bytes:
    try:
        vectors = embed_ids(rows)
    except UserError as e:  # a token id outside the vocabulary
        raise APIError(400, one_line(e), param="input", code="invalid_value") from None
    return _vectors_body(vectors, model, sum(len(r) for r in rows), encoding)


ROUTES: list[tuple[str, str, Callable]] = [("POST", "/v1/embeddings", embeddings)]

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

`embed_inputs` is the one embedding path, shared with Ollama's /api/embed and /api/embeddings
(`ollama_models`): the same dimensions refusal and limits there, where Ollama's `truncate` (default true)
cuts an input to the context instead of refusing it.
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

__all__ = ["ROUTES", "EmbeddingRequest", "embed_inputs"]

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
        vectors, n_tokens = await embed_inputs(request, served, texts, rows, req.dimensions)
    finally:
        registry.release(served)
    body = await asyncio.to_thread(_vectors_body, vectors, served.name, n_tokens, req.encoding_format)
    return Response(body, media_type="application/json")


async def embed_inputs(request: Request, served: Any, texts: list[str] | None, rows: list[list[int]] | None,
                       dimensions: int | None, truncate: bool | None = None) -> tuple[np.ndarray, int]:
    """(vectors, tokens embedded) of `texts` (tokenized on the worker pool) or token-id `rows`, with a
    loaded model: THE embedding path of both APIs (/v1/embeddings, Ollama's /api/embed and /api/embeddings),
    so they refuse alike. `dimensions` other than the model's is a 400; an input past the model's context is
    a 400 (`truncate` None: OpenAI's, False: Ollama's, naming truncate) or cut to it (`truncate` True, as
    Ollama's default); more than MAX_TOTAL_TOKENS in all is a 400."""
    registry = request.app.state.registry
    embedder = served.embedder if served.embedding_only else registry.embedder(served)
    if dimensions is not None and dimensions != embedder.dim:
        raise invalid(f"'dimensions' {dimensions} is not available: {served.name} makes {embedder.dim}-"
                      f"dimensional vectors and does not shorten them; omit 'dimensions' or send {embedder.dim}",
                      param="dimensions")
    if texts is not None:
        for i, text in enumerate(texts):
            if not text:
                raise invalid(f"'input' item {i} is an empty string; every input needs some text", param="input")
        rows = await request.app.state.cpu.run(embedder.tokenize, texts) if texts else []
    rows = _fit_lengths(rows or [], embedder.max_tokens, truncate)
    if not rows:
        return np.zeros((0, embedder.dim), dtype=np.float32), 0
    return await asyncio.to_thread(_embed, embedder.embed_ids, rows), sum(len(r) for r in rows)


def _fit_lengths(rows: list[list[int]], context: int, truncate: bool | None) -> list[list[int]]:
    total, out = 0, []
    for i, r in enumerate(rows):
        if len(r) > context:
            if truncate:
                r = r[:context]
            else:
                how = "shorten it, or send truncate: true" if truncate is False else "shorten it or split it"
                raise invalid(f"input {i} has {len(r)} tokens, more than this model's maximum context of {context} "
                              f"tokens; {how}", param="input", code="context_length_exceeded")
        total += len(r)
        out.append(r)
    if total > MAX_TOTAL_TOKENS:
        raise invalid(f"the inputs have {total} tokens in all, more than {MAX_TOTAL_TOKENS} per request; "
                      "send them in several requests", param="input", code="context_length_exceeded")
    return out


def _embed(embed_ids: Callable, rows: list[list[int]]) -> np.ndarray:
    try:
        return embed_ids(rows)
    except UserError as e:  # a token id outside the vocabulary
        raise APIError(400, one_line(e), param="input", code="invalid_value") from None


ROUTES: list[tuple[str, str, Callable]] = [("POST", "/v1/embeddings", embeddings)]

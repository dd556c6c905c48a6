"""One way to turn texts into vectors for retrieval: `Embedder`, L2-normalised float32 rows, whatever the model.

Two kinds of model embed:

* **Encoders** (BERT family: bge, e5, MiniLM, gte ... imported with `lmforge import DIR --name N`): loaded by
  `lmforge.loaders.bert`, pooled and normalised as their sentence-transformers files say (`embed_texts`).
  These are trained for retrieval: pick one.
* **Decoders** (any model `lmforge run` runs): the mean of the last hidden states (after the final norm)
  over the text's tokens, normalised. A causal model was never trained to make such a mean a sentence
  vector, so it retrieves noticeably worse than a small encoder; it is offered because it needs nothing
  more than the chat model already loaded (the server can embed with every model it serves).

Why the hidden states come through a hook on the final norm that stops the forward pass: `GPT.forward`
ends in the output head, a (batch, tokens, vocabulary) product that would be the largest tensor of the
call and is thrown away here. The hook is registered once per `Embedder` and only acts in the thread that
is embedding (a thread-local flag), so a server generating with the same model meanwhile is untouched.

A text longer than the model's context is cut to fit (its beginning kept; an encoder's closing [SEP]
stays last) and reported in the `truncated` flags: whoever called says so to the user. `model_id` is the
name an index records: a store name (without `:latest`) or the model directory's absolute path.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.loaders.model_dir import is_encoder_dir

__all__ = ["Embedder", "embedder_for", "is_encoder_dir", "model_id_of"]

log = logging.getLogger("lmforge.retrieval")

DEFAULT_BATCH = 32
#: Tokens in one batch at most (rows x longest row): 32 rows of a 512-token encoder, 4 of a 4096-token decoder,
#: so a long-context model's activations stay bounded (the server counts an encoder's memory by this).
MAX_BATCH_TOKENS = 16384


def model_id_of(ref: str | os.PathLike, path: Path) -> str:
    """The id recorded for model `ref` found at `path`: its store name (":latest" dropped) when it lives
    in the store, else its absolute path (a directory can be found again from any working directory)."""
    from lmforge.paths import models_root

    real, root = path.resolve(), models_root().resolve()
    if real.is_relative_to(root) and len(real.relative_to(root).parts) == 2:
        base, tag = real.relative_to(root).parts
        return base if tag == "latest" else f"{base}:{tag}"
    return str(real)


class _Stop(Exception):
    """Raised by the final-norm hook to end a decoder's forward pass before its output head."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class Embedder:
    """A loaded model that embeds texts. Build one with `load` (a store name or a directory), or around a
    model already loaded (`from_encoder`, `from_decoder`: the server reuses the model it serves)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, kind: str, model_id: str, dim: int,
                 max_tokens: int) -> None:
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.model_id, self.dim, self.max_tokens = model_id, dim, max_tokens
        self._lock = threading.Lock()  # one embedding at a time per model: its batches already use the cores
        self._local = threading.local()
        self._hook = None
        if kind == "decoder":
            self._hook = model.norm.register_forward_hook(self._stop_after_norm)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "Embedder":
        """The model `name_or_path` (store name, model directory or .gguf file) as an embedder."""
        from lmforge.paths import resolve

        ref = str(name_or_path)
        path = resolve(ref)
        model_id = model_id_of(ref, path)
        if path.is_dir() and is_encoder_dir(path):
            from lmforge.loaders.bert import load_encoder

            encoder, tokenizer = load_encoder(path, device=device)
            return cls.from_encoder(encoder, tokenizer, model_id=model_id)
        from lmforge.loaders.auto import load

        loaded = load(path, device=device, dtype="auto")
        return cls.from_decoder(loaded.model, loaded.tokenizer, model_id=model_id)

    @classmethod
    def from_encoder(cls, encoder: torch.nn.Module, tokenizer: Any, *, model_id: str) -> "Embedder":
        return cls(encoder, tokenizer, kind="encoder", model_id=model_id, dim=encoder.cfg.hidden_size,
                   max_tokens=encoder.cfg.max_position_embeddings)

    @classmethod
    def from_decoder(cls, model: torch.nn.Module, tokenizer: Any, *, model_id: str) -> "Embedder":
        return cls(model, tokenizer, kind="decoder", model_id=model_id, dim=model.config.d_model,
                   max_tokens=model.config.context_length)

    def close(self) -> None:
        """Remove the decoder hook (a model that outlives its embedder runs exactly as before)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # -- tokens ---------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the model sees each text, uncut: an encoder's [CLS] ... [SEP] included; a decoder's
        text is taken literally (a special token's spelling in it is ordinary text: documents are not
        instructions)."""
        if self.kind == "encoder":
            return [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        return [self.tokenizer.encode(t, allow_special=False) for t in texts]

    # -- vectors --------------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, list[bool]]:
        """(len(texts), dim) float32 unit rows, and per text whether it was cut to `max_tokens`."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise UserError("embed takes a list of strings")
        if not texts:
            return np.zeros((0, self.dim), np.float32), []
        if self.kind == "encoder":
            from lmforge.loaders.bert import embed_texts

            with self._lock:
                vectors, truncated = embed_texts(self.model, self.tokenizer, texts, batch_size=batch_size)
            return _unit(vectors.numpy()), truncated
        rows = self.tokenize(texts)
        truncated = [len(r) > self.max_tokens for r in rows]
        return self.embed_ids([r[: self.max_tokens] for r in rows], batch_size=batch_size), truncated

    def embed_ids(self, rows: Sequence[Sequence[int]], *, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """Vectors of token-id rows given as they are (no special tokens added): each must be non-empty,
        at most `max_tokens` long, and within the vocabulary; a UserError otherwise."""
        vocab = self._vocab_size()
        for i, r in enumerate(rows):
            if not r:
                raise UserError(f"input {i} has no tokens")
            if len(r) > self.max_tokens:
                raise UserError(f"input {i} has {len(r)} tokens, more than the model's context of {self.max_tokens}")
            if min(r) < 0 or max(r) >= vocab:
                raise UserError(f"input {i} has a token id outside the vocabulary (0..{vocab - 1})")
        out = []
        with self._lock, torch.inference_mode():
            device = next(self.model.parameters()).device
            # longest first: rows of similar length share a batch, so little of each batch is padding
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
            start = 0
            while start < len(order):
                n = max(1, min(batch_size, MAX_BATCH_TOKENS // len(rows[order[start]])))
                batch = [list(rows[i]) for i in order[start:start + n]]
                out.append(self._pooled(batch, device))
                start += n
        if not out:
            return np.zeros((0, self.dim), np.float32)
        vectors = np.empty((len(rows), self.dim), np.float32)
        vectors[order] = np.concatenate(out)
        return _unit(vectors)

    def _vocab_size(self) -> int:
        if self.kind == "encoder":
            return self.model.cfg.vocab_size
        return self.model.config.vocab_size

    def _pooled(self, batch: list[list[int]], device: torch.device) -> np.ndarray:
        width = max(len(r) for r in batch)
        pad = self.model.cfg.pad_token_id if self.kind == "encoder" else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        if self.kind == "encoder":
            return self.model.embed(ids, mask).float().cpu().numpy()
        # Right padding under a causal mask: a real token never attends to the padding after it.
        hidden = self._hidden(ids).float()
        m = mask[..., None].to(hidden.dtype)
        return ((hidden * m).sum(1) / m.sum(1)).cpu().numpy()

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        self._local.active = True
        try:
            self.model(ids)
        except _Stop as stop:
            return stop.hidden
        finally:
            self._local.active = False
        raise RuntimeError("the decoder's final norm did not run")  # pragma: no cover - GPT always runs it

    def _stop_after_norm(self, _module, _inputs, output):
        if getattr(self._local, "active", False):
            raise _Stop(output)
        return None


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero), float32: cosine similarity is then a dot product,
    whatever the model's own normalisation setting."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.ascontiguousarray(v / np.maximum(norms, 1e-12), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# One embedder per model per process
# ---------------------------------------------------------------------------------------------------
_CACHE: dict[str, Embedder] = {}
_CACHE_LOCK = threading.Lock()


def embedder_for(model_id: str) -> Embedder:
    """The embedder of `model_id` (as an index records it), loaded once per process: every search of a
    hybrid index in a chat or a server reuses it instead of loading the model per query."""
    with _CACHE_LOCK:
        found = _CACHE.get(model_id)
        if found is None:
            try:
                found = Embedder.load(model_id)
            except UserError as e:
                raise UserError(f"cannot load embedding model {model_id} ({e})") from None
            _CACHE[model_id] = found
        return found

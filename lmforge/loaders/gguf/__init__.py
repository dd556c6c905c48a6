"""GGUF import and export (llama.cpp's single-file format): a bounds-checked reader and a writer.

The package, one module per job, each importing only the ones before it:

    reader.py   bounds-checked header / metadata / tensor-info parsing, tensor data, typed metadata access
    names.py    tensor names GGUF <-> Hugging Face (stacked experts too), the expected tensor set, the `llama`
                rope permutation
    config.py   GGUF metadata <-> ModelConfig (architecture, hyperparameters, experts, rope scaling)
    vocab.py    tokenizer.* metadata <-> Tokenizer
    load.py     read_gguf / describe_gguf: a file into our config, state dict and tokenizer
    write.py    write_gguf: export

Supported: architectures `llama`, `qwen2`, `qwen3`, `qwen3moe`, `gemma2`, `gemma3` and `phi3` (Mistral 7B GGUFs
are `llama`; Mixtral's are `llama` with `llama.expert_count`: mixtures of experts with llama.cpp's router
`ffn_gate_inp` and stacked 3-D `ffn_{gate,up,down}_exps` tensors, each expert kept packed as a slice of them;
the older one-tensor-per-expert layout is read too; Gemma's norms stored as 1 + w, its sliding layers from
`attention.sliding_window(_pattern)` and its attention scale derived as llama.cpp derives it; Phi-3's fused
attn_qkv / ffn_up, partial rotation and LongRoPE factor tensors). A sliding window in an arch whose llama.cpp
graph ignores it (llama, qwen2, qwen3, phi3) is written as a context as long as the window; rope scaling
"linear" (as KV) and Llama-3 (as llama.cpp's `rope_freqs.weight` tensor: derived back to the four llama3
numbers and verified); tokenizers `gpt2` (byte-level BPE; pre-tokenizers llama-bpe/llama3, qwen2, gpt-2/default,
smollm) and `llama` (SentencePiece BPE, rebuilt as a byte-fallback BPE like transformers does). An unknown
pre-tokenizer name is refused rather than guessed (llama.cpp refuses it too); a missing one falls back to
GPT-2's, as llama.cpp does, with a warning. Export writes f32/f16/q8_0/q4_0/q4_k_m/q5_k_m/q6_k.

Not supported (each refused with a clear error): other architectures (llama4, mistral3, gemma, phi2,
qwen2moe, deepseek...), shared experts, YaRN scaling (LongRoPE only as phi3's), Gemmas whose query scale
llama.cpp would not derive (GGUF has no query_pre_attn_scalar), partial rotary outside phi3
(rope.dimension_count < head size), split files (`split.count` > 1: merge them with llama.cpp's gguf-split first), GGUF v1 and
big-endian files, and tensor types gguf-py cannot dequantize (I8..I64, Q8_K). Export cannot write BF16.
"""

from __future__ import annotations

from lmforge.loaders.gguf.config import SUPPORTED_ARCHITECTURES
from lmforge.loaders.gguf.load import GGUFModel, describe_gguf, load_gguf_packed, read_gguf
from lmforge.loaders.gguf.names import rope_permute, rope_unpermute
from lmforge.loaders.gguf.reader import GGUFTensorInfo, describe_file_type, read_gguf_header
from lmforge.loaders.gguf.write import GGUF_TYPES, write_gguf

__all__ = [
    "load_gguf_packed",
    "GGUF_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "GGUFModel",
    "GGUFTensorInfo",
    "describe_file_type",
    "describe_gguf",
    "read_gguf",
    "read_gguf_header",
    "rope_permute",
    "rope_unpermute",
    "write_gguf",
]

"""The batch-1 decode fast path: the compiled gemv kernel, FastLinear and accelerate().

The kernel is built once per session (a few seconds the very first time, then loaded from torch's extension
cache); kernel tests are skipped, with the reason, where it can't be built.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.engine import fastpath
from lmforge.model.gpt import GPT
from lmforge.model.kv_cache import KVCache
from lmforge.presets import get_preset

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="session")
def kernel():
    if not fastpath.available():
        pytest.skip(f"gemv kernel unavailable: {fastpath.unavailable_reason()}")
    return True


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls that reach the compiled kernel (to check which path a forward took)."""
    calls = []
    real = fastpath._gemv_into

    def counting(*args, **kw):
        calls.append(args[1].shape)
        return real(*args, **kw)

    monkeypatch.setattr(fastpath, "_gemv_into", counting)
    return calls


@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setenv("LMFORGE_NO_KERNELS", "1")


def _tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(get_preset("tiny", **overrides)).eval()


# --------------------------------------------------------------------------------------------------- gemv
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 13), (33, 577), (1000, 576), (1, 1), (3, 8), (5, 16), (9, 40)])
def test_gemv_matches_upcast_matmul(kernel, dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    W = torch.randn(shape, generator=g).to(dtype)
    x = torch.randn(shape[1], generator=g)
    y = fastpath.gemv(W, x)
    assert y.dtype == torch.float32 and y.shape == (shape[0],)
    torch.testing.assert_close(y, W.float() @ x, rtol=1e-4, atol=1e-4)


def test_gemv_row_input_bias_and_x_dtype(kernel):
    W = torch.randn(65, 70, dtype=torch.bfloat16)
    x = torch.randn(1, 70, dtype=torch.bfloat16)
    b = torch.randn(65, dtype=torch.bfloat16)
    y = fastpath.gemv(W, x, b)
    assert y.shape == (1, 65) and y.dtype == torch.float32
    torch.testing.assert_close(y, x.float() @ W.float().T + b.float(), rtol=1e-4, atol=1e-4)


def test_gemv_non_contiguous_weight(kernel):
    W = torch.randn(40, 30).T  # (30, 40), column-major view
    x = torch.randn(40)
    torch.testing.assert_close(fastpath.gemv(W, x), W @ x, rtol=1e-4, atol=1e-4)


def test_gemv_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fastpath.gemv(torch.randn(4, 5), torch.randn(6))
    with pytest.raises(ValueError):
        fastpath.gemv(torch.randn(4, 5), torch.randn(2, 5))
    with pytest.raises(ValueError):
        fastpath.gemv(torch.randn(4), torch.randn(4))


def test_gemv_respects_thread_count(kernel):
    W, x = torch.randn(4096, 64), torch.randn(64)
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.testing.assert_close(fastpath.gemv(W, x), W @ x, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------- FastLinear
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("rows", [(1, 48), (1, 1, 48), (48,), (5, 48), (2, 3, 48)], ids=str)
def test_fast_linear_matches_linear_fp32(kernel_calls, bias, rows):
    """Kernel or not (this also runs under LMFORGE_NO_KERNELS=1): same result as nn.Linear."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 37, bias=bias)
    fast = fastpath.FastLinear.from_linear(lin)
    x = torch.randn(rows)
    with torch.no_grad():
        y, ref = fast(x), lin(x)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert len(kernel_calls) == (1 if x.numel() == 48 and fastpath.available() else 0)  # several rows: BLAS
    # no copy when the dtype is unchanged
    assert fast.weight is lin.weight and (not bias or fast.bias is lin.bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fast_linear_half_weights(kernel, dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=bias)
    fast = fastpath.FastLinear.from_linear(lin, dtype)
    assert fast.weight.dtype == dtype and (not bias or fast.bias.dtype == dtype)
    w = fast.weight.float()
    b = fast.bias.float() if bias else None
    with torch.no_grad():
        x1 = torch.randn(1, 40)  # one row: kernel, fp32 activations times exactly-upcast weights
        torch.testing.assert_close(fast(x1), nn.functional.linear(x1, w, b), rtol=1e-4, atol=1e-4)
        x3 = torch.randn(3, 40)  # several rows: F.linear in the weight dtype
        torch.testing.assert_close(fast(x3), nn.functional.linear(x3, w, b), rtol=2e-2, atol=2e-2)
        xh = torch.randn(1, 40).to(dtype)  # output in the input's dtype
        assert fast(xh).dtype == dtype


def test_fast_linear_autograd_falls_back():
    lin = nn.Linear(8, 4)
    fast = fastpath.FastLinear.from_linear(lin)
    x = torch.randn(1, 8, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


def test_fast_linear_state_dict_compatible():
    lin = nn.Linear(6, 3)
    fast = fastpath.FastLinear.from_linear(lin, torch.bfloat16)
    assert set(fast.state_dict()) == {"weight", "bias"}
    fresh = fastpath.FastLinear(6, 3, dtype=torch.bfloat16)
    fresh.load_state_dict(fast.state_dict())
    torch.testing.assert_close(fresh.weight, fast.weight)


# --------------------------------------------------------------------------------------------------- accelerate
def _logits_equal_after_accelerate(model: GPT, atol: float = 1e-4):
    ref = _tiny_gpt()
    ref.load_state_dict(model.state_dict())
    fastpath.accelerate(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    idx = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), rtol=1e-4, atol=atol)  # prefill: BLAS path
        for t in range(idx.shape[1]):  # one token: the kernel path (lm_head and all)
            torch.testing.assert_close(model(idx[:, t:t + 1]), ref(idx[:, t:t + 1]), rtol=1e-4, atol=atol)
        torch.testing.assert_close(model(idx, last_only=True), ref(idx, last_only=True), rtol=1e-4, atol=atol)


def test_accelerate_gpt_fp32_logits_and_tied_weights(kernel):
    model = _tiny_gpt()
    assert model.config.tie_embeddings
    emb_ptr = model.tok_emb.weight.data_ptr()
    n_params = model.num_params()
    out = fastpath.accelerate(model)
    assert out is model
    for name in ("qkv", "proj"):
        assert isinstance(getattr(model.blocks[0].attn, name), fastpath.FastLinear)
    for name in ("fc", "proj"):
        assert isinstance(getattr(model.blocks[0].mlp, name), fastpath.FastLinear)
    assert isinstance(model.lm_head, fastpath.FastLinear)
    assert model.lm_head.weight.data_ptr() == emb_ptr == model.tok_emb.weight.data_ptr()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.num_params() == n_params  # nothing duplicated

    _logits_equal_after_accelerate(_tiny_gpt())


def test_accelerate_gpt_with_biases_kv_cache_decode(kernel, kernel_calls):
    """Prefill then token-by-token decode through a KV cache, the way the engine runs it."""
    kw = dict(attention_bias=True, mlp_bias=True)
    model, ref = _tiny_gpt(**kw), _tiny_gpt(**kw)
    with torch.no_grad():
        for p in model.parameters():  # biases start at zero: make them matter
            p.add_(torch.randn_like(p) * 0.02)
    ref.load_state_dict(model.state_dict())
    fastpath.accelerate(model)
    assert model.blocks[0].attn.qkv.bias is not None
    idx = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(2))
    caches = [KVCache.for_model(m.config, 1) for m in (model, ref)]
    with torch.inference_mode():
        outs = [m(idx[:, :4], cache=c) for m, c in zip((model, ref), caches)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        for t in range(4, 12):
            outs = [m(idx[:, t:t + 1], cache=c) for m, c in zip((model, ref), caches)]
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    n_linears = 4 * model.config.n_layers + 1
    assert len(kernel_calls) == 8 * n_linears  # every decode step ran every Linear through the kernel


def test_accelerate_bf16(kernel):
    model = _tiny_gpt()
    ref = _tiny_gpt()
    ref.load_state_dict(model.state_dict())
    fastpath.accelerate(model, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.tok_emb.weight.dtype == torch.float32  # only Linears are touched
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, r = model(idx[:, :1]), ref(idx[:, :1])
    assert y.dtype == torch.float32
    assert (y - r).abs().max() < 0.05 * r.abs().max() + 1e-3


def test_accelerate_shared_weight_converted_once():
    a = nn.Linear(8, 8, bias=False)
    b = nn.Linear(8, 8, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    fastpath.accelerate(model, torch.float16)
    assert model[0].weight is model[1].weight and model[0].weight.dtype == torch.float16


# --------------------------------------------------------------------------------------------------- fallback
def test_no_kernels_env_disables_and_falls_back(no_kernels, kernel_calls):
    assert not fastpath.available()
    assert "LMFORGE_NO_KERNELS" in fastpath.unavailable_reason()
    W, x = torch.randn(33, 577, dtype=torch.bfloat16), torch.randn(577)
    torch.testing.assert_close(fastpath.gemv(W, x), W.float() @ x, rtol=1e-4, atol=1e-4)

    model = _tiny_gpt()
    ref = _tiny_gpt()
    ref.load_state_dict(model.state_dict())
    fastpath.accelerate(model)
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.randint(0, 512, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(idx[:, :1]), ref(idx[:, :1]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(idx), ref(idx), rtol=1e-4, atol=1e-4)
    assert kernel_calls == []



@pytest.fixture
def rebuild():
    """Forget the built kernel before and after the test (the next `available()` loads it from the cache)."""
    fastpath._KERNEL.forget()
    yield
    fastpath._KERNEL.forget()


def test_missing_kernel_source_falls_back_with_a_reason(kernel, rebuild, monkeypatch, tmp_path):
    monkeypatch.setattr(fastpath._KERNEL, "source", tmp_path / "fastpath.cpp")
    assert not fastpath.available()
    assert "fastpath.cpp" in fastpath.unavailable_reason()
    W, x = torch.randn(5, 7), torch.randn(7)
    torch.testing.assert_close(fastpath.gemv(W, x), W @ x, rtol=1e-4, atol=1e-4)


def test_kernel_source_is_a_file_beside_the_module_and_ships_as_package_data():
    import fnmatch
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert fastpath._SOURCE_PATH == Path(fastpath.__file__).with_name("fastpath.cpp")
    assert fastpath._SOURCE_PATH.is_file()
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["lmforge"]
    assert any(fnmatch.fnmatch("engine/fastpath.cpp", pat) for pat in patterns)

def test_accelerate_leaves_custom_linear_subclasses_alone():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4))
    fastpath.accelerate(model)
    assert isinstance(model[0], fastpath.FastLinear) and type(model[1]) is Scaled


def test_fast_linear_rejects_wrong_last_dim(kernel):
    fast = fastpath.FastLinear.from_linear(nn.Linear(8, 3))
    with torch.no_grad(), pytest.raises(RuntimeError):
        fast(torch.randn(2, 4))  # 8 elements, but rows of 4: an error, as with nn.Linear


def test_a_few_rows_against_a_large_matrix_go_row_by_row_with_the_same_result():
    """2-4 rows of a matrix larger than the caches use the kernel once per row (faster than a tiny GEMM)."""
    from lmforge.engine import fastpath

    if not fastpath.available():
        pytest.skip("the kernel does not build here")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 8192, bias=True)  # 8 MiB of fp32 weights: the row-by-row path
    fast = fastpath.FastLinear.from_linear(lin)
    with torch.no_grad():
        for rows in (2, 3, 4, 5):
            x = torch.randn(rows, 1, 256)
            torch.testing.assert_close(fast(x), lin(x), rtol=1e-4, atol=1e-4)

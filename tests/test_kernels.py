"""exitspec's C++ CPU kernels (kernels/), every build this CPU runs: exact against float64 references
of their stated rounding, row-invariant, refusing bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import KERNEL_ISAS, exercise, tiny_model
from exitspec.kernels import build
from exitspec.models.int4 import GROUP, int4_table, recover_q8
from exitspec.runtime.layered import LayeredModel
from test_int4 import quantized_tiny


@pytest.fixture(params=KERNEL_ISAS or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no exitspec kernels for this CPU: {build.chosen_isa()[1]}"))])
def ops(request):
    """The kernel module of each instruction set this CPU runs (best first)."""
    exercise(request.param)
    return build.load_isa(request.param)


def test_kernels_build_wherever_the_cpu_can_run_them(monkeypatch):
    """A capable machine must not fall back silently: a broken build would only show as slowness.
    The runtime takes the best build; EXITSPEC_KERNELS names another or turns them off."""
    monkeypatch.delenv("EXITSPEC_KERNELS", raising=False)  # the suite may run with another build forced
    for isa in build.ISAS:
        if build._why_not(isa) is None:
            mod = build.load_isa(isa.name)
            assert mod is not None and isa.name == mod.ISA, build.unavailable_reason(isa.name)
        else:
            assert build.load_isa(isa.name) is None and build.unavailable_reason(isa.name) == build._why_not(isa)
    assert build.chosen_isa()[0] == (KERNEL_ISAS[0] if KERNEL_ISAS else None)


_WHY_NOT = "; ".join(filter(None, map(build._why_not, build.ISAS)))


@pytest.mark.skipif(len(KERNEL_ISAS) < 2, reason=f"this CPU runs only {KERNEL_ISAS or 'no'} exitspec kernel "
                    f"build(s), so two cannot meet in one process ({_WHY_NOT})")
@pytest.mark.parametrize("order", [KERNEL_ISAS, KERNEL_ISAS[::-1]], ids=["best-first", "best-last"])
def test_every_build_loads_beside_the_others_in_one_process(order):
    """Both builds bind C++ types of the same names (LlamaStack, Q4Weight, Q8Weight); pybind11 once
    refused the second import ('generic_type: type "LlamaStack" is already registered!'), which
    left every test of the other build failing on AVX-512 machines. A fresh process imports them
    in each order and runs each build's own types through its own functions."""
    import subprocess
    import sys

    script = f"""
import torch
from exitspec.kernels import build
for isa in {order!r}:
    ops = build.load_isa(isa)
    assert ops is not None and ops.ISA == isa, (isa, build.unavailable_reason(isa))
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    scale, low = torch.full((16, 2), 0.5), torch.full((16, 2), -4.0)
    w = ops.Q4Weight(q, scale, low)
    y = ops.q4_linear(torch.ones(1, 64), w)
    ref = (q.float() * 0.5 - 4.0).sum(1)
    assert torch.allclose(y[0], ref, rtol=1e-2, atol=1e-2), (isa, y, ref)
    assert ops.LlamaStack(64, 4, 2, 16, 128, 0.25).num_layers() == 0
print("loaded", *{order!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["loaded", *order]
    for isa in order:
        exercise(isa)


def test_kernel_choice_follows_the_environment(monkeypatch):
    monkeypatch.setenv("EXITSPEC_KERNELS", "0")
    assert build.chosen_isa() == (None, "disabled by EXITSPEC_KERNELS=0")
    monkeypatch.setenv("EXITSPEC_KERNELS", "avx7")
    with pytest.raises(ValueError, match="known: avx512bf16, avx2"):
        build.chosen_isa()
    for isa in build.ISAS:
        monkeypatch.setenv("EXITSPEC_KERNELS", isa.name)
        name, why = build.chosen_isa()
        assert (name, why) == ((isa.name, None) if isa.name in KERNEL_ISAS else (None, why)) and (name or why)


def q4_weight(n: int, k: int, seed: int = 0):
    """Random Q4_1 groups: codes 0..15, fp16 scale and low; and the dense fp32 weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // GROUP, generator=g) * 0.02).half().float()
    low = (-torch.rand(n, k // GROUP, generator=g) * 0.15).half().float()
    w = (q.float().view(n, -1, GROUP) * scale[..., None] + low[..., None]).view(n, k)
    return q, scale, low, w


def int8_groups(x: torch.Tensor) -> torch.Tensor:
    """x as the AVX2 build reads it (float64): per group of 32, in fp32 as the kernel computes them,
    d = max|x| / 127 and codes round-half-even(x * (127 / max|x|))."""
    b = x.float().view(x.shape[0], -1, GROUP)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(b * inv).double() * (amax / 127).double()).view(x.shape)


def q4_reference(isa: str, x, q, scale, low, bias):
    """The product each build promises, in float64: the exact weights times the build's rounded inputs
    (bf16 on AVX-512, int8 per group on AVX2), the lows' term included: summing the exact inputs for
    it instead would weight the rounding error by d*q = w - low rather than by w (gemm_avx2.cpp)."""
    n, k = q.shape
    codes = (q.double().view(n, -1, GROUP) * scale.double()[..., None]).view(n, k)
    xr = x.bfloat16().double() if isa == "avx512bf16" else int8_groups(x)
    return xr @ codes.T + xr.view(x.shape[0], -1, GROUP).sum(-1) @ low.double().T + bias.double()


@pytest.mark.parametrize("n,k", [(64, 64), (960, 576), (576, 1536), (48, 96)])
def test_q4_product_is_exact_up_to_its_input_rounding_and_row_invariant(ops, n, k):
    q, scale, low, w = q4_weight(n, k)
    bias = torch.randn(n)
    weight = ops.Q4Weight(q, scale, low, bias)
    x = torch.randn(20, k, generator=torch.Generator().manual_seed(n + k))
    x[3, 5] = 40.0  # an outlier: its group's other inputs keep fewer bits on AVX2
    y = ops.q4_linear(x, weight)
    ref = q4_reference(ops.ISA, x, q, scale, low, bias)
    assert float((y.double() - ref).abs().max()) < 2e-5 * float(ref.abs().max())
    # ...and the rounding stays small against the exact product of the fp32 inputs, the outlier's row
    # included (on AVX2 its group shares one int8 scale with a value 40x its neighbours).
    exact = x.double() @ w.double().T + bias.double()
    assert float((y.double() - exact).abs().max()) < 2e-2 * float(exact.abs().max())
    one = torch.cat([ops.q4_linear(x[i:i + 1].contiguous(), weight) for i in range(20)])
    for rows in range(1, 21):
        assert torch.equal(ops.q4_linear(x[:rows].contiguous(), weight), one[:rows]), rows


def test_q4_product_keeps_tiny_groups_finite_and_propagates_nan(ops):
    """Edge inputs: a group so small that 127 / max|x| overflows on AVX2 gives a finite product; a NaN
    input reaches its own row's outputs (as in fp32) and no other row's."""
    q, scale, low, w = q4_weight(64, 128)
    weight = ops.Q4Weight(q, scale, low, None)
    x = torch.randn(3, 128)
    x[0, :32] = 1e-38  # one whole group below ~4e-37
    x[1, 40] = float("nan")
    y = ops.q4_linear(x, weight)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all() and torch.isfinite(y[2]).all()
    exact = x[0].double() @ w.double().T
    assert float((y[0].double() - exact).abs().max()) < 2e-2 * float(exact.abs().max())
    assert torch.equal(y[2:], ops.q4_linear(x[2:].contiguous(), weight))


def test_q8_head_is_exact_up_to_its_input_rounding_and_row_invariant(ops):
    n, k = 4096 + 16, 576
    g = torch.Generator().manual_seed(1)
    blocks = torch.randn(n, k // GROUP, GROUP, generator=g)
    d = (blocks.abs().amax(-1) / 127).half().float()  # GGUF Q8_0: scale = max|w| / 127, fp16
    w = (torch.round(blocks / d[..., None]).clamp(-127, 127) * d[..., None]).view(n, k)
    found = recover_q8(w)
    assert found is not None and torch.equal(found[0].float().view(n, -1, GROUP) * found[1][..., None],
                                             w.view(n, -1, GROUP))
    assert recover_q8(torch.randn(32, 64)) is None  # a dense weight is not Q8_0 groups
    weight = ops.Q8Weight(*found)
    x = torch.randn(12, k)
    y = ops.q8_linear(x, weight)
    # both builds: inputs int8 per group (like AVX2's q4 product), exact weights (tests/test_q8_head.py)
    ref = int8_groups(x) @ w.double().T
    assert float((y.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    one = torch.cat([ops.q8_linear(x[i:i + 1].contiguous(), weight) for i in range(12)])
    for rows in range(1, 13):
        assert torch.equal(ops.q8_linear(x[:rows].contiguous(), weight), one[:rows]), rows


def reference_attention(q, kc, vc, pos, tokens, window):
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // kc.shape[1]
    for r in range(q.shape[0]):
        b, p = r // tokens, int(pos[r])
        lo = max(0, p - window + 1) if window else 0
        for h in range(q.shape[1]):
            keys, vals = kc[b, h // group, lo:p + 1].double(), vc[b, h // group, lo:p + 1].double()
            out[r, h] = torch.softmax(keys @ q[r, h].double() * q.shape[2] ** -0.5, 0) @ vals
    return out


@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
def test_decode_attention_matches_softmax_attention_and_is_row_invariant(ops, window, head_dim):
    torch.manual_seed(0)
    B, T, H, Hkv, slots = 3, 5, 6, 2, 96
    kc, vc = torch.randn(B, Hkv, slots, head_dim), torch.randn(B, Hkv, slots, head_dim)
    pos = torch.tensor([[20, 21, 22, 23, 24], [60, 61, 62, 63, 64], [0, 1, 2, 3, 4]]).view(-1)  # ragged rows
    q = torch.randn(B * T, H, head_dim)
    out = ops.attention(q, kc, vc, pos, T, head_dim ** -0.5, window)
    assert float((out.double() - reference_attention(q, kc, vc, pos, T, window)).abs().max()) < 1e-5
    for r in range(B * T):  # each query row alone gives the very same bits
        b = r // T
        alone = ops.attention(q[r:r + 1].contiguous(), kc[b:b + 1].contiguous(), vc[b:b + 1].contiguous(),
                              pos[r:r + 1].contiguous(), 1, head_dim ** -0.5, window)
        assert torch.equal(alone[0], out[r]), r


def test_attention_over_a_long_prefill_chunks_queries(ops):
    """More than 64 new tokens per row are attended 64 queries at a time, with the same results."""
    torch.manual_seed(1)
    T, slots = 150, 160
    kc, vc = torch.randn(1, 1, slots, 16), torch.randn(1, 1, slots, 16)
    pos, q = torch.arange(T), torch.randn(T, 2, 16)
    out = ops.attention(q, kc, vc, pos, T, 0.25, 0)
    assert float((out.double() - reference_attention(q, kc, vc, pos, T, 0)).abs().max()) < 1e-5


def test_kernels_refuse_bad_input_instead_of_reading_out_of_bounds(ops):
    q, scale, low, _ = q4_weight(64, 64)
    weight = ops.Q4Weight(q, scale, low)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.q4_linear(torch.randn(2, 32), weight)
    with pytest.raises(RuntimeError, match="out % 16"):
        ops.Q4Weight(q[:40].contiguous(), scale[:40].contiguous(), low[:40].contiguous())
    with pytest.raises(RuntimeError, match="0..15"):
        ops.Q4Weight(q + 1, scale, low)
    with pytest.raises(RuntimeError, match="exact in fp16"):
        ops.Q4Weight(q, scale + 1e-7, low)
    with pytest.raises(RuntimeError, match="in_features / 32"):
        ops.Q4Weight(q, scale[:, :1].contiguous(), low)
    with pytest.raises(RuntimeError, match="-127..127"):
        ops.Q8Weight(torch.full((16, 32), -128, dtype=torch.int8), torch.ones(16, 1))
    kc = torch.zeros(1, 1, 32, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attention(torch.randn(1, 1, 16), kc, kc, torch.tensor([32]), 1, 0.25, 0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.attention(torch.randn(1, 1, 16), kc[:, :, :20].contiguous(), kc[:, :, :20].contiguous(),
                      torch.tensor([3]), 1, 0.25, 0)


def assert_fused_close(fused: LayeredModel, per_layer: LayeredModel, ids, pos, isa: str) -> None:
    """Whole-stack logits of the fused C++ stack against the per-layer path with the same products."""
    with torch.inference_mode():
        a = fused.forward(ids, pos, fused.new_cache(*ids.shape))
        b = per_layer.forward(ids, pos, per_layer.new_cache(*ids.shape))
    if isa == "avx512bf16":
        assert float((a - b).abs().max()) < 2e-2 * float(b.abs().max())
        assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
        return
    # Several layers of a random model (activations amplified at each layer) turn int8 flips into
    # logit differences of several percent. The sound bar: the fused stack sits no further from the
    # per-layer path than either sits from the exact (dense fp32) product, i.e. it adds nothing
    # beyond the numerics' own rounding, which the real-model tests bound.
    dense = LayeredModel(per_layer.model)
    with torch.inference_mode():
        c = dense.forward(ids, pos, dense.new_cache(*ids.shape))

    def rel(x, y):
        return float((x - y).norm() / y.norm())

    assert rel(a, b) < min(rel(a, c), rel(b, c)) and rel(a, c) < 1.5 * rel(b, c)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_stack_matches_the_per_layer_path(kernel_isa, family):
    """The one-call C++ stack computes what the per-layer path computes with the same q4 products.
    Its attention, norms and RoPE are exitspec's own, so the two agree to float rounding, except
    where such a last-bit difference moves a product's input across a rounding boundary. AVX-512
    rounds inputs to bf16 per value: such a flip moves that row's outputs by ~2^-9 relative, so after
    one layer most values agree to 1e-5 and the rest within bf16 resolution. AVX2 rounds them to
    int8 per group of 32: a flip (~1e-4 per input for a 1e-6 difference) moves the whole row by up to
    ~1e-3, so the MLP's three products leave few rows untouched while the attention half, two
    products on nearly equal inputs, still agrees nearly everywhere."""
    m = quantized_tiny(family)
    fused = LayeredModel(m.model, int4=m.int4)
    per_layer = LayeredModel(m.model, int4=int4_table(m.model), fuse=False)
    assert fused.adapter.fused and not per_layer.adapter.fused
    ids = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9, 11, 3], [8, 1, 4, 4, 70, 12, 90, 15, 6, 2]])
    pos = torch.arange(10).expand(2, 10)

    def one_layer(**kw):
        with torch.inference_mode():
            h = fused.embed(ids, pos)
            one_a = fused.run_layers(h, pos, fused.new_cache(2, 12), 0, 1, **kw)
            one_b = per_layer.run_layers(h, pos, per_layer.new_cache(2, 12), 0, 1, **kw)
        return (one_a - one_b).abs(), float(one_b.abs().max())

    diff, scale = one_layer()
    assert float(diff.max()) < 1e-2 * scale
    if kernel_isa == "avx512bf16":
        assert float((diff <= 1e-5 * scale).float().mean()) >= 0.8
    else:
        diff, scale = one_layer(skip_mlp={0})
        assert float((diff <= 1e-5 * scale).float().mean()) >= 0.8
    assert_fused_close(fused, per_layer, ids, pos, kernel_isa)


# Sliding windows in the fused stack (Mistral, Qwen2), against HF itself: tests/test_sliding_window.py.


def test_dense_models_never_take_the_fused_path():
    lm = LayeredModel(tiny_model("llama"))
    assert not lm.adapter.fused and lm.weights == "dense"


@pytest.mark.parametrize("head_dim", [16, 64])
def test_attention_reads_an_fp16_cache_as_the_fp32_values_it_holds(ops, head_dim):
    """An fp16 KV cache changes only what is stored: attention over it gives, bit for bit, what it
    gives over an fp32 cache holding the same (fp16-rounded) values, row-invariant as ever."""
    torch.manual_seed(2)
    B, T, H, Hkv, slots = 2, 3, 4, 2, 48
    kc, vc = torch.randn(B, Hkv, slots, head_dim).half(), torch.randn(B, Hkv, slots, head_dim).half()
    pos = torch.tensor([[9, 10, 11], [30, 31, 32]]).view(-1)
    q = torch.randn(B * T, H, head_dim)
    for window in (0, 5):
        half = ops.attention(q, kc, vc, pos, T, head_dim ** -0.5, window)
        assert torch.equal(half, ops.attention(q, kc.float(), vc.float(), pos, T, head_dim ** -0.5, window))
        alone = ops.attention(q[4:5].contiguous(), kc[1:2].contiguous(), vc[1:2].contiguous(), pos[4:5].contiguous(),
                              1, head_dim ** -0.5, window)
        assert torch.equal(alone[0], half[4])
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.attention(q, kc, vc.float(), pos, T, 0.1, 0)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ops.attention(q, kc.bfloat16(), vc.bfloat16(), pos, T, 0.1, 0)


def test_fused_stack_keeps_an_fp16_cache(kernel_isa):
    """With kv_dtype=float16 the fused stack writes each key and value rounded to fp16 (the fp32
    stack's values, rounded: same inputs, same layer), keeps the LayerSkip hidden states in fp32, and
    refuses a cache it cannot run (the per-layer path, a dense model)."""
    m = quantized_tiny("llama")
    fp32 = LayeredModel(m.model, int4=m.int4)
    fp16 = LayeredModel(m.model, int4=int4_table(m.model), kv_dtype=torch.float16)
    assert fp16.kv_cache_dtypes() == (torch.float32, torch.float16) and fp32.kv_dtype == torch.float32
    ids = torch.tensor([[5, 17, 33, 2, 60, 41, 7], [8, 1, 4, 4, 70, 12, 90]])
    pos = torch.arange(7).expand(2, 7)
    c32, c16 = fp32.new_cache(2, 8), fp16.new_cache(2, 8, hidden_layer=1)
    assert c16.k.dtype == c16.v.dtype == torch.float16 and c16.hidden.dtype == torch.float32
    with torch.inference_mode():
        h = fp32.embed(ids, pos)
        fp32.run_layers(h, pos, c32, 0, 1)
        fp16.run_layers(h, pos, c16, 0, 1)
        assert torch.equal(c16.k[0], c32.k[0].half()) and torch.equal(c16.v[0], c32.v[0].half())
        a, b = fp32.forward(ids, pos, fp32.new_cache(2, 8)), fp16.forward(ids, pos, fp16.new_cache(2, 8))
    assert torch.isfinite(b).all() and float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.8
    with pytest.raises(ValueError, match="needs the fused stack: weights='int4' on a Llama-family model"):
        LayeredModel(m.model, int4=int4_table(m.model), fuse=False, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="it runs: float32"):
        LayeredModel(tiny_model("llama"), kv_dtype=torch.float16)

"""exitspec's C++ CPU kernels (kernels/): exact against float64 references, row-invariant, refusing bad input."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from exitspec import kernels
from exitspec.kernels.build import _why_not
from exitspec.kernels.layout import pack_q4, pack_q8, recover_q8
from exitspec.models.int4 import GROUP, int4_table
from exitspec.runtime.layered import LayeredModel
from test_int4 import q4_1, quantized_tiny

ops = kernels.load()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"exitspec kernels unavailable: {kernels.unavailable_reason()}")


def test_kernels_build_wherever_the_cpu_can_run_them():
    """A capable machine must not fall back silently: a broken build would only show as slowness."""
    if _why_not() is None:
        assert ops is not None, kernels.unavailable_reason()
    else:
        assert kernels.unavailable_reason() == _why_not()


def q4_weight(n: int, k: int, seed: int = 0):
    """Random Q4_1 groups: codes 0..15, fp16 scale and low; and the dense fp32 weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // GROUP, generator=g) * 0.02).half().float()
    low = (-torch.rand(n, k // GROUP, generator=g) * 0.15).half().float()
    w = (q.float().view(n, -1, GROUP) * scale[..., None] + low[..., None]).view(n, k)
    return q, scale, low, w


@needs_kernels
@pytest.mark.parametrize("n,k", [(64, 64), (960, 576), (576, 1536), (48, 96)])
def test_q4_product_is_exact_up_to_bf16_inputs_and_row_invariant(n, k):
    q, scale, low, w = q4_weight(n, k)
    bias = torch.randn(n)
    weight = ops.Q4Weight(pack_q4(q, scale, low), n, k, bias)
    x = torch.randn(20, k)
    y = ops.q4_linear(x, weight)
    # Only the inputs are rounded (to bf16); the weights' arithmetic is the checkpoint's own.
    ref = x.bfloat16().double() @ w.double().T + bias.double()
    assert float((y.double() - ref).abs().max()) < 2e-5 * float(ref.abs().max())
    one = torch.cat([ops.q4_linear(x[i:i + 1].contiguous(), weight) for i in range(20)])
    for rows in range(1, 21):
        assert torch.equal(ops.q4_linear(x[:rows].contiguous(), weight), one[:rows]), rows


@needs_kernels
def test_q8_head_is_exact_fp32_arithmetic_and_row_invariant():
    n, k = 4096 + 16, 576
    g = torch.Generator().manual_seed(1)
    blocks = torch.randn(n, k // GROUP, GROUP, generator=g)
    d = (blocks.abs().amax(-1) / 127).half().float()  # GGUF Q8_0: scale = max|w| / 127, fp16
    w = (torch.round(blocks / d[..., None]).clamp(-127, 127) * d[..., None]).view(n, k)
    found = recover_q8(w)
    assert found is not None and torch.equal(found[0].float().view(n, -1, GROUP) * found[1][..., None],
                                             w.view(n, -1, GROUP))
    assert recover_q8(torch.randn(32, 64)) is None  # a dense weight is not Q8_0 groups
    packed = pack_q8(*found)
    x = torch.randn(12, k)
    y = ops.q8_linear(x, packed, n)
    ref = x.double() @ w.double().T
    assert float((y.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    one = torch.cat([ops.q8_linear(x[i:i + 1].contiguous(), packed, n) for i in range(12)])
    for rows in range(1, 13):
        assert torch.equal(ops.q8_linear(x[:rows].contiguous(), packed, n), one[:rows]), rows


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


@needs_kernels
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_decode_attention_matches_softmax_attention_and_is_row_invariant(window, head_dim):
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


@needs_kernels
def test_attention_over_a_long_prefill_chunks_queries():
    """More than 64 new tokens per row are attended 64 queries at a time, with the same results."""
    torch.manual_seed(1)
    T, slots = 150, 160
    kc, vc = torch.randn(1, 1, slots, 16), torch.randn(1, 1, slots, 16)
    pos, q = torch.arange(T), torch.randn(T, 2, 16)
    out = ops.attention(q, kc, vc, pos, T, 0.25, 0)
    assert float((out.double() - reference_attention(q, kc, vc, pos, T, 0)).abs().max()) < 1e-5


@needs_kernels
def test_kernels_refuse_bad_input_instead_of_reading_out_of_bounds():
    q, scale, low, _ = q4_weight(64, 64)
    weight = ops.Q4Weight(pack_q4(q, scale, low), 64, 64)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.q4_linear(torch.randn(2, 32), weight)
    with pytest.raises(RuntimeError, match="packed q4 size"):
        ops.Q4Weight(pack_q4(q, scale, low)[:-1], 64, 64)
    with pytest.raises(ValueError, match="out % 16"):
        pack_q4(q[:40], scale[:40], low[:40])
    kc = torch.zeros(1, 1, 32, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.attention(torch.randn(1, 1, 16), kc, kc, torch.tensor([32]), 1, 0.25, 0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.attention(torch.randn(1, 1, 16), kc[:, :, :20].contiguous(), kc[:, :, :20].contiguous(),
                      torch.tensor([3]), 1, 0.25, 0)


@needs_kernels
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_stack_matches_the_per_layer_path(family):
    """The one-call C++ stack computes what the per-layer path computes with the same q4 products.
    Its attention, norms and RoPE are exitspec's own, so the two agree to float rounding, except
    where such a last-bit difference moves a product's input across a bf16 rounding boundary: then
    that row's outputs move by ~2^-9 relative. So after one layer most values agree to 1e-5 and the
    rest within bf16 resolution, and over six layers the logits stay close."""
    m = quantized_tiny(family)
    fused = LayeredModel(m.model, int4=m.int4)
    per_layer = LayeredModel(m.model, int4=int4_table(m.model), fuse=False)
    assert fused.adapter.fused and not per_layer.adapter.fused
    ids = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9, 11, 3], [8, 1, 4, 4, 70, 12, 90, 15, 6, 2]])
    pos = torch.arange(10).expand(2, 10)
    with torch.inference_mode():
        h = fused.embed(ids, pos)
        one_a = fused.run_layers(h, pos, fused.new_cache(2, 12), 0, 1)
        one_b = per_layer.run_layers(h, pos, per_layer.new_cache(2, 12), 0, 1)
    diff, scale = (one_a - one_b).abs(), float(one_b.abs().max())
    assert float(diff.max()) < 1e-2 * scale
    assert float((diff <= 1e-5 * scale).float().mean()) >= 0.8
    a = fused.forward(ids, pos, fused.new_cache(2, 12))
    b = per_layer.forward(ids, pos, per_layer.new_cache(2, 12))
    assert float((a - b).abs().max()) < 2e-2 * float(b.abs().max())
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9


@needs_kernels
def test_mistral_style_sliding_window_in_the_fused_stack():
    """A layer with a sliding window attends only the last `window` slots, in the fused stack too."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=4, initializer_range=0.2)
    model = MistralForCausalLM(cfg).eval().requires_grad_(False)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not head:
                mod.weight.copy_(q4_1(mod.weight))
    fused = LayeredModel(model, int4=int4_table(model))
    per_layer = LayeredModel(model, int4=int4_table(model), fuse=False)
    assert fused.adapter.fused
    ids = torch.arange(12)[None] * 7 % 96
    pos = torch.arange(12)[None]
    a, b = fused.forward(ids, pos, fused.new_cache(1, 12)), per_layer.forward(ids, pos, per_layer.new_cache(1, 12))
    assert float((a - b).abs().max()) < 2e-2 * float(b.abs().max())
    # Without the window the fused stack would attend every slot: the outputs would differ a lot.
    cfg.sliding_window = None


def test_dense_models_never_take_the_fused_path():
    lm = LayeredModel(tiny_model("llama"))
    assert not lm.adapter.fused and lm.weights == "dense"

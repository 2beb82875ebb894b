"""weights="int4": the checkpoint's own 4-bit groups, the int4 kernel, the prepacked bf16 LM head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import KERNEL_ISAS, char_tokenizer, tiny_model, use_kernels
from exitspec.loading import LoadedModel, ModelLoadError, load
from exitspec.models.int4 import GROUP, Int4Linear, int4_table, recover_groups
from exitspec.models.ops import Linear, onednn_packing_available
from exitspec.runtime.layered import LayeredModel
from helpers_strategies import PROMPTS, greedy


@pytest.fixture(params=[f"exitspec-{isa}" for isa in KERNEL_ISAS] + ["torch-int4"])
def backend(request, monkeypatch):
    """Run a test on exitspec's C++ kernels (each build this CPU runs) and on torch's int4 kernel (the
    fallback where none runs)."""
    use_kernels(monkeypatch, None if request.param == "torch-int4" else request.param.removeprefix("exitspec-"))
    return request.param


needs_bf16 = pytest.mark.skipif(not onednn_packing_available(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU/torch build has no oneDNN bf16")


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """What a Q4_1 GGUF stores, dequantized to fp32 as transformers does: per 32-block fp16 scale and min."""
    out, n = w.shape
    b = w.reshape(out, n // GROUP, GROUP)
    lo, hi = b.amin(-1), b.amax(-1)
    d = ((hi - lo) / 15)
    q = torch.round((b - lo[..., None]) / torch.where(d == 0, 1.0, d)[..., None]).clamp(0, 15)
    d16, lo16 = d.half().float(), lo.half().float()
    return (q * d16[..., None] + lo16[..., None]).reshape(out, n)


def quantized_tiny(family: str) -> LoadedModel:
    """A tiny model whose decoder projections hold Q4_1 values (the LM head stays dense)."""
    model = tiny_model(family)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod is not head:
                mod.weight.copy_(q4_1(mod.weight))
    return LoadedModel(model=model, tokenizer=char_tokenizer(), name=f"tiny-{family}-q4", source="test",
                       int4=int4_table(model))


def test_groups_are_recovered_exactly_or_not_at_all():
    w = torch.randn(96, 128)
    g = recover_groups(q4_1(w))
    assert g is not None and int(g.q.max()) <= 15
    back = (g.q.float().view(96, -1, GROUP) * g.scale[..., None] + g.low[..., None]).view(96, 128)
    assert torch.equal(back, q4_1(w))
    assert recover_groups(w) is None  # a dense fp32 weight is not 4-bit groups
    assert recover_groups(torch.randn(8, 40)) is None  # input size not a multiple of the group


def test_int4_linear_matches_dense_product_and_is_row_invariant(backend):
    torch.manual_seed(0)
    w = q4_1(torch.randn(192, 128) * 0.05)
    lin = Int4Linear(recover_groups(w))
    assert (lin.kernel is not None) == (backend != "torch-int4")
    x = torch.randn(20, 128)
    with torch.inference_mode():
        y = lin(x)
        ref = F.linear(x, w)
        assert y.dtype == torch.float32
        # Inputs rounded to bf16 (torch's kernel, the AVX-512 build) or int8 per group (the AVX2 build).
        assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())
        one = torch.cat([lin(x[i:i + 1]) for i in range(20)])
        for k in (2, 3, 4, 8, 16, 20):
            assert torch.equal(lin(x[:k]), one[:k])


@needs_bf16
def test_prepacked_bf16_linear_is_row_invariant_and_repacks_after_in_place_change():
    torch.manual_seed(0)
    w = torch.randn(300, 64).bfloat16()
    lin = Linear(w)
    x = torch.randn(17, 64).bfloat16()
    with torch.inference_mode():
        one = torch.cat([lin(x[i:i + 1]) for i in range(17)])
        for k in (2, 4, 8, 17):
            assert torch.equal(lin(x[:k]), one[:k])
        torch.testing.assert_close(lin(x).float(), F.linear(x.float(), w.float()), atol=0.1, rtol=0.02)
        # An fp32 input meets the bf16 weight as bf16 and gets an fp32 result.
        assert lin(x.float()).dtype == torch.float32
        w.mul_(2)  # in-place change: the packed copy must follow
        torch.testing.assert_close(lin(x).float(), 2 * one.float(), atol=0.2, rtol=0.02)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_int4_runtime_tracks_the_dense_model(family, backend):
    m = quantized_tiny(family)
    dense = LayeredModel(m.model)
    q = m.lm
    assert q.weights == "int4" and dense.weights == "dense"
    assert q.adapter.fused == (backend != "torch-int4" and family != "gpt_neox")
    ids = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9]])
    pos = torch.arange(8)[None]
    ref = dense.forward(ids, pos, dense.new_cache(1, 8))
    out = q.forward(ids, pos, q.new_cache(1, 8))
    # bf16 inputs (torch's kernel, the AVX-512 build) keep 8 significant bits per value; int8 groups
    # (the AVX2 build, llama.cpp's q8_0 scheme) ~7 bits of the group's largest value, ~4x the rounding
    # error, which a random model's layers amplify (measured 3-10% here; on the default model the
    # next-token KL to fp32 is 0.003 nats: see models/int4.py).
    bound = 0.15 if backend == "exitspec-avx2" else 0.05
    assert float((out - ref).abs().max()) < bound * float(ref.abs().max())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_fidelity_scores_the_int4_runtime_against_the_dense_model(backend):
    """bench-runtime's teacher-forced fidelity: exact for a model against itself, and for the int4
    runtime the scores follow from the very logits it is given."""
    from exitspec.bench.quality import fidelity

    m = quantized_tiny("llama")
    dense = LoadedModel.from_hf(m.model, m.tokenizer)
    seqs = [(3, [5, 17, 33, 2, 60, 41, 7, 9]), (5, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])]
    same = fidelity(dense, dense, seqs)
    assert same["tokens"] == 5 + 6 and same["top1_agreement"] == 1.0 and abs(same["kl_nats"]) < 1e-6
    assert same["perplexity_reference"] == same["perplexity_candidate"] > 1.0
    got = fidelity(dense, m, seqs)
    a = dense.lm.forward(torch.tensor([seqs[0][1]]), torch.arange(8)[None], dense.lm.new_cache(1, 8))[0, 2:-1]
    b = m.lm.forward(torch.tensor([seqs[0][1]]), torch.arange(8)[None], m.lm.new_cache(1, 8))[0, 2:-1]
    assert got["kl_nats"] > 0 and got["perplexity_reference"] == same["perplexity_reference"]
    first = fidelity(dense, m, seqs[:1])
    assert first["top1_agreement"] == int((a.argmax(-1) == b.argmax(-1)).sum()) / 5
    kl = (F.log_softmax(a, -1).exp() * (F.log_softmax(a, -1) - F.log_softmax(b, -1))).sum(-1).mean()
    assert abs(first["kl_nats"] - float(kl)) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_speculative_decoding_is_lossless_in_int4_mode(family, backend):
    m = quantized_tiny(family)
    ref = greedy(m, PROMPTS)
    for kw in (dict(exit_layer=2, draft_len=3), dict(exit_layer=5, draft_len=5)):
        assert greedy(m, PROMPTS, strategy="self-spec", **kw).token_ids == ref.token_ids
        assert greedy(m, PROMPTS[2], strategy="self-spec", **kw).token_ids[0] == ref.token_ids[2]
    for k in (2, 7):  # lookup verifies k drafts in one (k+1)-row pass of every layer
        assert greedy(m, PROMPTS, strategy="lookup", draft_len=k).token_ids == ref.token_ids


def test_speculative_decoding_is_lossless_over_an_fp16_kv_cache(kernel_isa):
    """kv_cache=float16: every strategy shares the one cache type, so verification still reproduces
    vanilla decoding over that cache token for token."""
    m = quantized_tiny("llama")
    m16 = LoadedModel(model=m.model, tokenizer=m.tokenizer, name=m.name, source=m.source, int4=m.int4,
                      kv_cache=torch.float16)
    assert m16.lm.kv_dtype == torch.float16
    ref = greedy(m16, PROMPTS)
    assert greedy(m16, PROMPTS, strategy="self-spec", exit_layer=2, draft_len=3).token_ids == ref.token_ids
    for k in (2, 7):
        assert greedy(m16, PROMPTS, strategy="lookup", draft_len=k).token_ids == ref.token_ids


def test_fused_stack_splits_its_time_into_products_attention_and_glue(kernel_isa):
    """`exitspec info` / bench-runtime split a step's layers by the fused stack's own timers: every part
    is charged, the parts of a call never exceed the call, and reading them resets them."""
    from exitspec.runtime.profile import step_costs

    m = quantized_tiny("llama")
    lm = m.lm
    assert lm.adapter.fused
    rows = step_costs(lm, context=32, ks=(1, 4), repeats=3)
    for r in rows:
        parts = (r["stack_products_ms"], r["stack_attention_ms"], r["stack_glue_ms"])
        assert min(parts) > 0 and sum(parts) <= r["layers_ms"] * 1.01 + 0.01
    lm.adapter.take_stack_times()
    assert lm.adapter.take_stack_times() == {"products": 0.0, "attention": 0.0, "glue": 0.0}
    assert LayeredModel(m.model).adapter.take_stack_times() is None  # dense weights: no fused stack


def test_int4_refuses_models_without_4bit_weights():
    with pytest.raises(ValueError, match="not stored as 4-bit groups"):
        int4_table(tiny_model("llama"))
    with pytest.raises(ValueError, match="Conv1D"):
        int4_table(tiny_model("gpt2"))
    with pytest.raises(ModelLoadError, match="choose one of"):
        load("default", weights="int8")
    with pytest.raises(ModelLoadError, match="float32"):
        load("default", weights="int4", dtype="bfloat16")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load("default", weights="int4", kv_cache="float8")


@pytest.mark.slow
def test_default_model_int4_mode(default_model):
    """The embedded Q4_1 model: every decoder projection is recovered exactly, and self-speculation
    and prompt lookup over the int4 runtime give the int4 vanilla loop's tokens."""
    import exitspec

    m = exitspec.load("default", weights="int4")
    assert len(m.int4) == 7 * m.config.num_hidden_layers  # q, k, v, o, gate, up, down in every layer
    assert m.weights == "int4" and m.int4 is None  # packed into the runtime, the unpacked copy freed
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "List three prime numbers."]
    ref = greedy(m, prompts, n=24)
    out = greedy(m, prompts, n=24, strategy="self-spec", exit_layer=20, draft_len=3)
    assert out.token_ids == ref.token_ids
    assert greedy(m, prompts, n=24, strategy="lookup", draft_len=3).token_ids == ref.token_ids
    # The fp32 model's greedy answer to a factual prompt starts the same way.
    dense = greedy(default_model, prompts[:1], n=8)
    assert ref.token_ids[0][:4] == dense.token_ids[0][:4]
    # An fp16 KV cache: lossless strategies still give its vanilla loop's tokens, and it sits as close to
    # the dense model as the fp32 cache does (teacher-forced on the dense model's text).
    m16 = exitspec.load("default", weights="int4", kv_cache="float16")
    ref16 = greedy(m16, prompts, n=24)
    assert greedy(m16, prompts, n=24, strategy="lookup", draft_len=3).token_ids == ref16.token_ids
    assert greedy(m16, prompts, n=24, strategy="self-spec", exit_layer=20, draft_len=3).token_ids == ref16.token_ids
    from exitspec.bench.quality import fidelity
    from exitspec.decoding.api import encode_prompt

    ids = [encode_prompt(m.tokenizer, p) for p in prompts]
    texts = [(len(i), i + t) for i, t in zip(ids, greedy(default_model, prompts, n=24).token_ids, strict=True)]
    f32, f16 = fidelity(default_model, m, texts), fidelity(default_model, m16, texts)
    assert f16["kl_nats"] < max(2 * f32["kl_nats"], 0.01) and f16["top1_agreement"] >= 0.9
    with pytest.raises(ModelLoadError, match="fp16 cache needs the fused stack: weights='int4'"):
        exitspec.load("default", kv_cache="float16")


@pytest.mark.slow
def test_bench_runs_int4_rows_beside_the_dense_model(default_model, tmp_path):
    """A [[run]] with weights = "int4" runs on a second, int4 copy of the model: its vanilla loop is a
    baseline candidate compared with the dense loop, and lossless strategies on it are audited
    against the int4 vanilla loop (kv_cache = "float16": a third copy, audited likewise)."""
    from exitspec.bench.config import BenchConfig
    from exitspec.bench.runner import BenchRunner
    from exitspec.prompts import mixed_prompts

    cfg = BenchConfig(num_prompts=2, max_new_tokens=10, repeats=1, warmup=0, quality=False, runs=[
        {"name": "vanilla", "weights": "int4"},
        {"name": "self-spec", "weights": "int4", "exit_layer": 20, "draft_len": 2},
        {"name": "hf-prompt-lookup", "weights": "int4"},
        {"name": "vanilla", "weights": "int4", "kv_cache": "float16"},
        {"name": "lookup", "weights": "int4", "kv_cache": "float16", "draft_len": 2}])
    outcome = BenchRunner(cfg, default_model, mixed_prompts("heldout", 1)[:2], tmp_path, progress=False).run()
    rows = {r["label"]: r for r in outcome.rows}
    v4 = rows["vanilla[weights=int4]@T0"]
    assert v4["weights"] == "int4" and v4["lossless_claim"] is False and v4["agreement"] is not None
    spec = rows["self-spec[draft_len=2,exit_layer=20,weights=int4]@T0"]
    assert spec["lossless_ok"] is True and spec["speedup"] > 0
    fastest = max(rows[k]["tokens_per_s"] for k in ("vanilla@T0", "hf-generate@T0", "vanilla[weights=int4]@T0",
                                                     "vanilla[kv_cache=float16,weights=int4]@T0"))
    assert spec["baseline_tokens_per_s"] == fastest
    assert rows["hf-prompt-lookup[weights=int4]@T0"]["status"].startswith("error: hf-prompt-lookup is a peer")
    # An fp16 KV cache runs on its own int4 copy; lookup over it is audited against vanilla over it.
    v16 = rows["vanilla[kv_cache=float16,weights=int4]@T0"]
    assert v16["kv_cache"] == "float16" and v16["lossless_claim"] is False and v16["agreement"] is not None
    look = rows["lookup[draft_len=2,kv_cache=float16,weights=int4]@T0"]
    assert look["lossless_ok"] is True and look["kv_cache"] == "float16"

"""The GPU path, on tiny in-memory models: skipped (with the reason) where torch sees no CUDA GPU.

`bash scripts/cuda_checks.sh` runs exactly these on a GPU machine that has no network (the working
tree only). They check what a CPU run cannot: the model and its cache on the device, bf16 by
default there, the lossless strategies still token-for-token lossless, training on the device, the
benchmark and the server over it.
"""

from __future__ import annotations

import pytest
import torch

import exitspec
from conftest import char_tokenizer, save_tiny_model, tiny_model
from exitspec.loading import LoadedModel
from exitspec.runtime.clock import now
from exitspec.training.trainer import Trainer
from helpers_strategies import PROMPTS, greedy
from helpers_training import random_examples
from test_training import _cfg

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU here")]


def on_gpu(family: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return LoadedModel.from_hf(tiny_model(family).to("cuda", dtype), char_tokenizer(), name=f"tiny-{family}-cuda")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox", "gpt2"])
def test_vanilla_greedy_equals_hf_greedy_on_the_gpu(family):
    m = on_gpu(family)
    assert m.lm.device.type == "cuda"
    for prompt in ("hello there", "The quick brown fox jumps"):
        ids = m.tokenizer(prompt)["input_ids"]
        x = torch.tensor([ids], device="cuda")
        ref = m.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                               pad_token_id=95)[0, len(ids):].tolist()
        assert exitspec.generate(m, prompt, chat=False, max_new_tokens=24, ignore_eos=True).token_ids[0] == ref


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lossless_strategies_stay_lossless_on_the_gpu(family, dtype):
    m = on_gpu(family, dtype)
    m.lm.row_invariant = True  # bit-identical rows in 1- and k-row calls, as lossless needs
    ref = greedy(m, PROMPTS).token_ids
    assert greedy(m, PROMPTS, strategy="self-spec", exit_layer=2, draft_len=3).token_ids == ref
    assert greedy(m, PROMPTS, strategy="dssd", exit_layers=[2, 4], threshold=0.5).token_ids == ref
    assert greedy(m, PROMPTS, strategy="lookup", draft_len=4).token_ids == ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_block_head_drafts_losslessly_on_the_gpu(dtype):
    """A block head (its own fp32 layer, its keys / values beside the bf16 cache) on the device."""
    from exitspec.heads.bundle import HeadBundle

    m = on_gpu("llama", dtype)
    m.lm.row_invariant = True
    L = m.lm.num_layers
    m.heads = HeadBundle.create(m.lm, [2, L - 1], "block", init="copy")
    ref = greedy(m, PROMPTS).token_ids
    assert greedy(m, PROMPTS, strategy="self-spec", exit_layer=2, draft_len=3).token_ids == ref
    out = greedy(m, PROMPTS, strategy="self-spec", exit_layer=L - 1, draft_len=3)
    assert out.token_ids == ref and out.stats.accepted > 0.8 * out.stats.drafted


def test_load_runs_bf16_on_the_gpu_by_default(tmp_path):
    m = exitspec.load(str(save_tiny_model(tmp_path / "tiny")), device="cuda")
    assert m.lm.dtype == torch.bfloat16 and m.lm.device.type == "cuda"
    out = exitspec.generate(m, "hi", chat=False, max_new_tokens=8, ignore_eos=True)
    assert len(out.token_ids[0]) == 8 and out.stats.tokens_per_s > 0
    t = now("cuda")
    assert now("cuda") >= t


def test_a_few_training_steps_on_the_gpu_lower_the_kl(tmp_path):
    m = on_gpu("llama", torch.bfloat16)
    result = Trainer(m, _cfg(epochs=4, lr=1e-2), random_examples(16), tmp_path, progress=False).train()
    assert all(p.device.type == "cuda" for p in result.bundle.heads.parameters())
    first, last = result.history[0]["kd"], result.history[-1]["kd"]
    assert all(last[k] < first[k] for k in first), (first, last)


def test_bench_runs_on_the_gpu(tmp_path):
    from exitspec.bench.results import SavedResults
    from exitspec.cli import main

    folder = save_tiny_model(tmp_path / "tiny", layers=3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'"say {i} please"\n' for i in range(6)))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(folder), "--device", "cuda", "--prompts", str(prompts), "--split", "all",
                 "--num-prompts", "3", "--max-new-tokens", "6", "--repeats", "1", "--warmup", "0",
                 "--no-progress", "--run", "self-spec exit_layer=1", "--out", str(out)]) == 0
    assert all(r["status"] == "ok" for r in SavedResults(out).rows)


def test_serve_answers_on_the_gpu(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from exitspec.server.app import ServerConfig, create_app

    m = exitspec.load(str(save_tiny_model(tmp_path / "tiny")), device="cuda")
    with TestClient(create_app(m, ServerConfig(strategy="vanilla"))) as client:
        r = client.post("/v1/completions", json={"model": m.name, "prompt": "hi", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5

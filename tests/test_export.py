"""Exits exported as standard draft models: the same logits as the exit, lossless in HF's assisted
generation, refused where the architecture cannot express the head."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, save_tiny_model, tiny_loaded
from exitspec.export.draft import ExportError, export_draft
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.sequences import teacher_pass

IDS = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9, 3, 3, 12]])


KINDS = {"norm_lm": ("norm_lm", {}), "lm_head": ("lm_head", {}), "block": ("block", {"init": "new"}),
         "option-b": ("block", {"init": "copy", "tune_head": True})}  # the research plan's Option B


def bundle_of(m, kind: str, layer: int = 3) -> HeadBundle:
    kind, options = KINDS[kind]
    bundle = HeadBundle.create(m.lm, [layer], kind, base_model=m.name, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a tuned head: not the base's weights any more
        for p in bundle.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return bundle


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", FAMILIES)
def test_the_exported_draft_computes_the_exit(tmp_path, family, kind):
    m = tiny_loaded(family)
    bundle = bundle_of(m, kind)
    draft = AutoModelForCausalLM.from_pretrained(export_draft(m, bundle, 3, tmp_path / "draft")).eval()
    depth = 4 if kind in ("block", "option-b") else 3  # a block head is one more layer
    assert draft.config.num_hidden_layers == depth == bundle.head(3).layers_run and type(draft) is type(m.model)
    with torch.no_grad():
        got = draft(IDS).logits
        ref = bundle.head(3)(teacher_pass(m.lm, IDS, [3]).hidden[3])
    assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize("family, kind", [("llama", "lm_head"), ("gpt2", "lm_head"), ("llama", "option-b")])
def test_hf_assisted_generation_with_the_draft_is_lossless(tmp_path, family, kind):
    m = tiny_loaded(family)
    draft = AutoModelForCausalLM.from_pretrained(export_draft(m, bundle_of(m, kind), 3, tmp_path / "d")).eval()
    for prompt in ([5, 17, 33], [60, 41, 7, 9, 3]):
        x = torch.tensor([prompt])
        kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False, pad_token_id=95)
        plain = m.model.generate(x, **kw)
        assisted = m.model.generate(x, assistant_model=draft, **kw)
        assert assisted.tolist() == plain.tolist()


def test_heads_no_standard_layer_expresses_are_refused(tmp_path, capsys):
    from exitspec.cli import main

    m = tiny_loaded("llama")
    for kind in ("swiglu", "linear"):
        with pytest.raises(ExportError, match="exportable kinds: norm_lm"):
            export_draft(m, HeadBundle.create(m.lm, [3], kind), 3, tmp_path / kind)
        assert not (tmp_path / kind).exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a model folder"):
        export_draft(m, HeadBundle.create(m.lm, [3], "norm_lm"), 3, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not 4"):
        export_draft(m, HeadBundle.create(m.lm, [3], "norm_lm"), 4, tmp_path / "x")
    folder = save_tiny_model(tmp_path / "tiny")
    from exitspec.loading import load

    lm = load(str(folder)).lm
    HeadBundle.create(lm, [2], "swiglu").save(tmp_path / "sw")
    HeadBundle.create(lm, [2], "lm_head").save(tmp_path / "lh")
    assert main(["export-draft", "--model", str(folder), "--heads", str(tmp_path / "sw"), "--exit-layer", "2",
                 "--out", str(tmp_path / "o1")]) == 2
    assert "exportable kinds" in capsys.readouterr().err and not (tmp_path / "o1").exists()
    assert main(["export-draft", "--model", str(folder), "--heads", str(tmp_path / "lh"), "--exit-layer", "2",
                 "--out", str(tmp_path / "o2")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o2").config.num_hidden_layers == 2
    # A reduced draft vocabulary would need an LM-head bias, which Llama's head lacks: refused, nothing written.
    assert main(["export-draft", "--model", str(folder), "--heads", str(tmp_path / "lh"), "--exit-layer", "2",
                 "--out", str(tmp_path / "o3"), "--draft-vocab", "32"]) == 2
    assert "has none; export the full head" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_an_exported_exit_drafts_in_hf_as_the_exit_does_in_self_spec(tmp_path):
    """The `hf-assisted` bench peer: HF's speculative decoding with exit 3 exported as its draft model
    (norm_lm here: no bundle attached). Lossless, and its acceptance is self-spec's at that exit with
    the same draft length (the same drafts; only HF's last, shortened round may differ)."""
    from exitspec.bench.config import BenchConfig
    from exitspec.bench.runner import BenchRunner
    from helpers_bench import tiny_prompts

    m = tiny_loaded("gpt2")
    cfg = BenchConfig(num_prompts=3, max_new_tokens=24, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "hf-assisted", "draft_exit": 5, "draft_len": 3},
                            {"name": "self-spec", "exit_layer": 5, "draft_len": 3},
                            {"name": "hf-assisted", "draft_exit": 5, "colour": 1}])
    rows = {r["label"]: r for r in BenchRunner(cfg, m, tiny_prompts(), tmp_path, progress=False).run().rows}
    hf, ours = rows["hf-assisted[draft_exit=5,draft_len=3]@T0"], rows["self-spec[draft_len=3,exit_layer=5]@T0"]
    assert hf["status"] == "ok" and hf["lossless_ok"] is True and ours["lossless_ok"] is True
    assert ours["acceptance_rate"] > 0.2
    assert hf["acceptance_rate"] == pytest.approx(ours["acceptance_rate"], abs=0.1)
    assert "hf-assisted takes draft_exit" in rows["hf-assisted[colour=1,draft_exit=5]@T0"]["status"]


@pytest.mark.parametrize("family", FAMILIES)
def test_an_exported_draft_passes_the_checks_vllms_draft_model_path_makes(tmp_path, family):
    from exitspec.export.engines import vllm_command, vllm_draft_problems
    from exitspec.loading import load

    target = save_tiny_model(tmp_path / "target", family)
    m = load(str(target))
    draft = export_draft(m, bundle_of(m, "option-b"), 3, tmp_path / "draft")
    assert vllm_draft_problems(draft, target) == []
    cmd = vllm_command(str(target), draft, 5)
    assert cmd.startswith(f"vllm serve {target} --speculative-config ") and '"method": "draft_model"' in cmd
    # A draft from another model (another vocabulary, as deep as the target) is refused with the reasons.
    other = save_tiny_model(tmp_path / "other", "llama" if family != "llama" else "qwen2", layers=6)
    problems = " | ".join(vllm_draft_problems(other, target))
    assert "model types differ" in problems and "it would cost as much as it saves" in problems

"""Exit-head kinds: untrained == norm_lm exactly, bundles round-trip bit-exact, wrong bases refused."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_loaded
from exitspec.heads.bundle import BundleError, HeadBundle
from exitspec.heads.kinds import HEAD_KINDS, default_adapter_width, make_head

TRAINABLE = ["linear", "swiglu", "lm_head"]


def _hidden(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(2, 7, lm.hidden_size, generator=g)  # (B, T, C)


def _perturb(bundle, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bundle.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_kinds_are_registered():
    assert {"norm_lm", "linear", "swiglu", "lm_head"} <= set(HEAD_KINDS)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("kind", TRAINABLE)
def test_untrained_head_reproduces_norm_lm_exactly(family, kind):
    lm = tiny_loaded(family).lm
    h = _hidden(lm)
    ref = make_head("norm_lm", lm, 3)(h)
    head = make_head(kind, lm, 3)
    assert sum(p.numel() for p in head.parameters()) > 0
    assert torch.equal(head(h), ref)
    assert torch.equal(ref, lm.logits(h))  # norm_lm is the logit lens


def test_swiglu_width_and_parameter_budget():
    lm = tiny_loaded("llama").lm
    head = make_head("swiglu", lm, 2, width=24)
    C = lm.hidden_size
    assert sum(p.numel() for p in head.parameters()) == 3 * C * 24 + C
    auto = default_adapter_width(lm)
    assert auto % 8 == 0 and make_head("swiglu", lm, 2).width == auto


def test_heads_train_only_their_own_parameters():
    lm = tiny_loaded("llama").lm
    head = make_head("swiglu", lm, 2)
    names = {n for n, _ in head.named_parameters()}
    assert names == {"norm.weight", "gate.weight", "up.weight", "down.weight"}  # no base weights


def test_bad_kind_and_options_are_clear_errors():
    lm = tiny_loaded("llama").lm
    with pytest.raises(ValueError, match="unknown head kind"):
        make_head("mystery", lm, 2)
    with pytest.raises(ValueError, match="bad options"):
        make_head("linear", lm, 2, width=3)
    with pytest.raises(ValueError, match="exit layer"):
        make_head("swiglu", lm, lm.num_layers)


@pytest.mark.parametrize("kind", TRAINABLE)
def test_save_load_round_trip_is_bit_exact(tmp_path, kind):
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, [2, 4], kind, base_model=m.name)
    _perturb(bundle)
    bundle.save(tmp_path / "b")
    loaded = HeadBundle.load(tmp_path / "b", m.lm)
    assert loaded.layers == [2, 4] and loaded.config.head_kinds == {"2": kind, "4": kind}
    for k, v in bundle.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    h = _hidden(m.lm)
    for layer in (2, 4):
        assert torch.equal(bundle.head(layer)(h), loaded.head(layer)(h))


def test_fp16_save_stores_rounded_weights_and_options(tmp_path):
    m = tiny_loaded("llama")
    bundle = HeadBundle.create(m.lm, [3], "swiglu", base_model=m.name, width=16)
    _perturb(bundle)
    bundle.save(tmp_path / "b", dtype=torch.float16)
    loaded = HeadBundle.load(tmp_path / "b", m.lm)
    assert loaded.head(3).width == 16
    for k, v in bundle.state_dict().items():
        assert torch.equal(v.half().float(), loaded.state_dict()[k]), k


def test_mismatched_base_is_refused(tmp_path):
    m = tiny_loaded("llama", seed=0)
    HeadBundle.create(m.lm, [2], "swiglu", base_model=m.name).save(tmp_path / "b")
    with pytest.raises(BundleError, match="different weights"):
        HeadBundle.load(tmp_path / "b", tiny_loaded("llama", seed=1).lm)
    with pytest.raises(BundleError, match="not this model"):
        HeadBundle.load(tmp_path / "b", tiny_loaded("gpt2").lm)
    with pytest.raises(BundleError, match="not this model"):
        HeadBundle.load(tmp_path / "b", tiny_loaded("llama", layers=4).lm)


def test_load_attaches_heads_in_one_call_and_refuses_a_bundle_of_another_model(tmp_path):
    import exitspec
    from conftest import save_tiny_model

    folder = save_tiny_model(tmp_path / "model", seed=0)
    other = save_tiny_model(tmp_path / "other", seed=1)
    m = exitspec.load(str(folder))
    assert m.heads is None
    HeadBundle.create(m.lm, [2, 4], "swiglu", base_model=m.name).save(tmp_path / "b")
    loaded = exitspec.load(str(folder), heads=tmp_path / "b")
    assert isinstance(loaded.heads, HeadBundle) and loaded.heads.layers == [2, 4]
    with pytest.raises(BundleError, match="different weights"):
        exitspec.load(str(other), heads=tmp_path / "b")
    later = exitspec.load(str(folder))
    assert exitspec.attach_heads(later, tmp_path / "b") is later.heads


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    m = tiny_loaded("llama")
    HeadBundle.create(m.lm, [2], "swiglu", base_model=m.name, width=16).save(tmp_path / "b")
    cfg = (tmp_path / "b" / "bundle.json").read_text().replace('"swiglu"', '"linear"')
    (tmp_path / "b" / "bundle.json").write_text(cfg.replace('"width": 16', ''))
    with pytest.raises((BundleError, ValueError)):
        HeadBundle.load(tmp_path / "b", m.lm)


@pytest.mark.slow
def test_shipped_bundle_loads_and_beats_norm_lm_on_heldout_prompts(default_model):
    """The shipped default bundle: fp16 swiglu heads that are closer to the full model than the
    logit lens at every exit, on the full model's own answers to held-out prompts."""
    import dataclasses

    from exitspec.calibration.evaluate import evaluate_heads
    from exitspec.calibration.sequences import greedy_sequences, heldout_prompts
    from exitspec.heads.bundle import shipped_bundle_path
    from exitspec.loading import attach_heads

    model = dataclasses.replace(default_model, heads=None)
    bundle = attach_heads(model, "default")
    assert model.heads is bundle and bundle.config.head_kinds["12"] == "swiglu"
    # fp16 exit heads (5.3 MB), the 16-bit datastore (1.5 MB) and the fp16 lookahead head (4.9 MB), never a
    # tuned copy of the LM head (+57 MB)
    assert bundle.lookahead is not None
    assert sum(f.stat().st_size for f in shipped_bundle_path().iterdir()) < 12.5e6
    seqs = greedy_sequences(model, heldout_prompts("eval", 5), max_new_tokens=32)
    baseline = HeadBundle.create(model.lm, bundle.layers, "norm_lm")
    rows = evaluate_heads(model, bundle, seqs, baseline=baseline, label="trained")
    by = {(r["bundle"], r["layer"]): r for r in rows}
    for layer in bundle.layers:
        base, ours = by["norm_lm", layer], by["trained", layer]
        assert ours["kl"] < base["kl"] and ours["agreement"] > base["agreement"], (base, ours)

"""The head bundles shipped inside the package, one per embedded model: `heads="default"` (and
`--heads default`, `heads="auto"`) resolves to the bundle made for the loaded model, found by the
architecture in each bundle.json's fingerprint; a model with none shipped, or a bundle of another
model, is refused with the reason.

Fast tests: the resolution on tiny random models (bundles saved to a temporary folder standing in for
the package's), the refusals, and the shipped bundle.json files themselves (read as JSON: size,
settings, provenance). Slow tests (`-m slow`): the real Gemma 3 270M gets its own bundle from
"default" (Python and the CLI), refuses SmolLM2's, and decodes losslessly with the recommended
self-spec settings.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

import exitspec
from conftest import tiny_loaded
from exitspec import loading
from exitspec.cli import main
from exitspec.heads.bundle import (
    CONFIG_FILE,
    SHIPPED_ROOT,
    BundleError,
    HeadBundle,
    shipped_bundle_for,
    shipped_bundle_path,
    shipped_bundles,
)
from exitspec.loading import GEMMA3_MODEL, attach_heads
from helpers_strategies import greedy

GEMMA3_BUNDLE = SHIPPED_ROOT / "gemma3-270m"


def test_the_shipped_bundle_is_chosen_by_the_models_architecture(tmp_path):
    llama, gpt2 = tiny_loaded("llama"), tiny_loaded("gpt2")
    HeadBundle.create(llama.lm, [2], "swiglu", base_model="tiny-llama", width=8).save(tmp_path / "a")
    HeadBundle.create(gpt2.lm, [1], "swiglu", base_model="tiny-gpt2", width=8).save(tmp_path / "b")
    (tmp_path / "not-a-bundle").mkdir()  # skipped: no bundle.json
    assert set(shipped_bundles(tmp_path)) == {tmp_path / "a", tmp_path / "b"}
    assert shipped_bundle_for(llama.lm, tmp_path) == tmp_path / "a"
    assert shipped_bundle_for(gpt2.lm, tmp_path) == tmp_path / "b"
    assert shipped_bundle_for(tiny_loaded("llama", layers=4).lm, tmp_path) is None  # another shape: none fits


def test_default_heads_on_a_model_with_none_shipped_are_refused_and_auto_attaches_none():
    m = tiny_loaded("llama")
    with pytest.raises(BundleError, match=r"no head bundle is shipped for tiny-llama .*exitspec train"):
        attach_heads(m, "default")
    assert m.heads is None
    assert attach_heads(m, "auto") is None and m.heads is None


def test_each_embedded_model_has_its_own_small_shipped_bundle():
    """Read as JSON only: SmolLM2's and Gemma 3's bundles, for different architectures, each small, and
    Gemma's recommending a lossless self-spec setting with a reduced draft vocabulary whose token
    ranking the bundle itself keeps (no data needed at run time)."""
    found = shipped_bundles()
    assert {f.name for f in found} >= {"smollm2-135m-instruct", GEMMA3_BUNDLE.name}
    arch = {f.name: cfg["fingerprint"]["arch"]["model_type"] for f, cfg in found.items()}
    assert arch["smollm2-135m-instruct"] == "llama" and arch[GEMMA3_BUNDLE.name] == "gemma3_text"
    cfg = found[GEMMA3_BUNDLE]
    assert cfg["base_model"] == loading.GEMMA3_NAME
    assert sum(f.stat().st_size for f in GEMMA3_BUNDLE.iterdir()) < 4e6  # fp16 adapters, no 262k-row head
    assert set(cfg["head_kinds"].values()) == {"swiglu"} and cfg["training"]["config"]["save_dtype"] == "float16"
    rec = cfg["recommended"]["self-spec"]
    assert rec["exit_layer"] in cfg["exit_layers"] and rec["draft_len"] >= 1
    assert 0 < rec["draft_vocab"] <= len(cfg["training"]["token_frequencies"])
    assert all(str(layer) in cfg["thresholds"] for layer in cfg["exit_layers"])  # calibrated
    assert all(cfg["training"]["heldout_eval"]["trained"][str(x)]["agreement"] > 0 for x in cfg["exit_layers"])
    assert json.loads((shipped_bundle_path() / CONFIG_FILE).read_text())["base_model"] == "SmolLM2-135M-Instruct"


# --- the real Gemma 3 270M (slow) -----------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village"]


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec(loading.GEMMA3_PACKAGE) is None and not (
            loading.cache_dir() / f"{loading.GEMMA3_NAME}-{loading.GEMMA3_SHA256[:12]}").is_dir():
        pytest.skip(f"{loading.GEMMA3_PACKAGE} is not installed (scripts/setup.sh installs it)")
    return exitspec.load(GEMMA3_MODEL)


@pytest.mark.slow
def test_gemma3_default_heads_are_its_own_and_self_spec_with_them_is_lossless(gemma3):
    m = gemma3
    bundle = attach_heads(m, "default")
    assert m.heads is bundle and bundle.config.base_model == loading.GEMMA3_NAME
    assert shipped_bundle_for(m.lm) == GEMMA3_BUNDLE
    # SmolLM2's bundle on Gemma: refused by architecture, and the attached heads stay as they were.
    with pytest.raises(BundleError, match="trained for SmolLM2-135M-Instruct .*not this model"):
        attach_heads(m, shipped_bundle_path())
    assert m.heads is bundle
    ref = greedy(m, PROMPTS[:2], n=10).token_ids
    out = greedy(m, PROMPTS[:2], n=10, strategy="self-spec")  # the bundle's recommended exit, drafts, draft vocab
    assert out.token_ids == ref and out.stats.drafted > 0 and out.stats.accepted > 0


@pytest.mark.slow
def test_cli_heads_default_under_gemma3_loads_its_bundle(capsys):
    assert main(["generate", "The capital of France is", "--model", GEMMA3_MODEL, "--weights", "dense",
                 "--heads", "default", "--strategy", "self-spec", "--max-new-tokens", "6", "--threads", "2"]) == 0
    err = capsys.readouterr().err
    layers = json.loads((GEMMA3_BUNDLE / CONFIG_FILE).read_text())["exit_layers"]
    assert f"exit heads at layers {layers}" in err and "strategy self-spec" in err

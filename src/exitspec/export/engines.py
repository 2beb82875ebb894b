"""How an exported exit (export/draft.py) is served by engines that run past one process, and the
checks vLLM makes on a draft model, run here without vLLM.

vLLM cannot run on a CPU-only machine, so its draft-model path is checked as far as a config allows:
vLLM's SpeculativeConfig (method "draft_model") refuses a draft whose vocabulary size differs from the
target's, its model registry loads only known architecture classes (no custom code), and drafts
must tokenize alike (vLLM tokenizes once, with the target's tokenizer). We check those, plus what a
draft needs to be useful: the same context length and a shallower stack than the target.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

# Architecture classes of the families exitspec exports that vLLM's model registry serves natively.
VLLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPTNeoXForCausalLM",
                      "GPT2LMHeadModel", "Gemma3ForCausalLM")


def vllm_draft_problems(draft: str | Path, target: str | Path) -> list[str]:
    """Reasons vLLM would refuse (or gain nothing from) `draft` as the draft model of `target`, two
    HF model folders; empty when none is found."""
    d, t = AutoConfig.from_pretrained(draft), AutoConfig.from_pretrained(target)
    problems = []
    if d.vocab_size != t.vocab_size:
        problems.append(f"vocabulary sizes differ (draft {d.vocab_size}, target {t.vocab_size}): vLLM's "
                        "draft_model method needs them equal")
    arch = (getattr(d, "architectures", None) or ["?"])[0]
    if arch not in VLLM_ARCHITECTURES:
        problems.append(f"architecture {arch} is not one vLLM serves natively ({', '.join(VLLM_ARCHITECTURES)})")
    if getattr(d, "auto_map", None):
        problems.append("the draft config names custom code (auto_map); vLLM's registry loads standard classes")
    if d.model_type != t.model_type:
        problems.append(f"model types differ (draft {d.model_type}, target {t.model_type})")
    depth = getattr(d, "num_hidden_layers", getattr(d, "n_layer", None))
    target_depth = getattr(t, "num_hidden_layers", getattr(t, "n_layer", None))
    if depth is not None and target_depth is not None and depth >= target_depth:
        problems.append(f"the draft has {depth} layers, the target {target_depth}: it would cost as much as it saves")
    d_ctx = getattr(d, "max_position_embeddings", getattr(d, "n_positions", None))
    t_ctx = getattr(t, "max_position_embeddings", getattr(t, "n_positions", None))
    if d_ctx != t_ctx:
        problems.append(f"context lengths differ (draft {d_ctx}, target {t_ctx}): vLLM caps requests at the smaller")
    if AutoTokenizer.from_pretrained(draft).get_vocab() != AutoTokenizer.from_pretrained(target).get_vocab():
        problems.append("the tokenizers' vocabularies differ: drafts would be other tokens than the target's")
    return problems


def vllm_command(target: str, draft: str | Path, num_speculative_tokens: int = 4) -> str:
    """The `vllm serve` line that serves `target` with `draft` drafting (vLLM's draft_model method)."""
    spec = {"model": str(draft), "num_speculative_tokens": num_speculative_tokens, "method": "draft_model"}
    return f"vllm serve {shlex.quote(target)} --speculative-config {shlex.quote(json.dumps(spec))}"


def llama_cpp_command(target_gguf: str, draft_gguf: str | Path, draft_max: int = 4) -> str:
    """The `llama-server` line that serves `target_gguf` with an exported draft GGUF drafting."""
    return (f"llama-server -m {shlex.quote(target_gguf)} -md {shlex.quote(str(draft_gguf))} "
            f"--spec-type draft-simple --spec-draft-n-max {draft_max}")

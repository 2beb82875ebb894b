"""A trained exit as a standard draft model: the base model's own architecture class, cut to its
first `layer` decoder layers, ending in the exit's head, saved as an HF folder that
`AutoModelForCausalLM.from_pretrained(DIR)` loads with no custom code. Engines that take a separate
draft model for speculative decoding (HF `generate(assistant_model=...)`, vLLM, llama.cpp) can then
draft with it.

Only what the architecture expresses exactly is exported. A `norm_lm` exit is the plain truncation
(the layers, the frozen final norm, the frozen LM head); an `lm_head` exit swaps in its tuned LM head
(embeddings then untied). A `block` exit is a decoder layer of the architecture (heads/block.py),
written as the draft's last layer (l + 1 layers in all), with its tuned LM head where it has one. The
`linear` and `swiglu` adapters sit between the last layer and the final norm, where no standard layer
does, so they are refused with the kinds that do export.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from exitspec.atomic import atomic_dir
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import LoadedModel

EXPORTABLE = {"norm_lm": "plain truncation: the first layers, the final norm, the LM head",
              "lm_head": "the first layers, the final norm and the exit's tuned LM head",
              "block": "the first layers, the exit's own decoder layer after them, the final norm, the (tuned) LM head"}
_LAYER = re.compile(r"\.(?:layers|h)\.(\d+)\.")  # model.layers.3. / gpt_neox.layers.3. / transformer.h.3.


class ExportError(ValueError):
    """An exit that cannot be written as a standard checkpoint; the message says which can."""


def draft_state(model: LoadedModel, bundle: HeadBundle, layer: int) -> tuple[dict, dict]:
    """(config dict, state dict) of the draft model for exit `layer`."""
    if layer not in bundle.layers:
        raise ExportError(f"the bundle has exits at layers {bundle.layers}, not {layer}")
    kind = bundle.config.head_kinds.get(str(layer), "")
    if kind not in EXPORTABLE:
        kinds = "; ".join(f"{k} ({why})" for k, why in EXPORTABLE.items())
        raise ExportError(f"the {kind!r} head at layer {layer} is not a layer the {model.config.model_type} "
                          f"architecture has, so no standard checkpoint reproduces it; exportable kinds: {kinds}")
    head = bundle.head(layer)
    depth = head.layers_run  # the draft's decoder layers
    cfg = model.config.to_dict()
    cfg["n_layer" if "n_layer" in cfg else "num_hidden_layers"] = depth
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = cfg["layer_types"][:depth]
    state = {k: v for k, v in model.model.state_dict().items()
             if (m := _LAYER.search(k)) is None or int(m.group(1)) < layer}
    if kind == "block":  # the head's layer takes the place of base layer `layer` (same module path)
        base_layer = model.lm.adapter.layers[layer]
        prefix = next(name for name, mod in model.model.named_modules() if mod is base_layer)
        for k, v in head.block.state_dict().items():
            state[f"{prefix}.{k}"] = v.detach().to(model.lm.dtype).clone()
    if head.head_weight() is not model.lm.lm_head.weight:  # a tuned LM head
        if head.head_bias() is not None:
            raise ExportError("this tuned LM head has a bias, which the architecture's LM head does not")
        head_module = model.model.get_output_embeddings()  # by module: a tied weight's first name is the embedding's
        out_key = next(name for name, mod in model.model.named_modules() if mod is head_module) + ".weight"
        state[out_key] = head.head_weight().detach().to(model.lm.dtype).clone()
        cfg["tie_word_embeddings"] = False
    return cfg, state


def check_draft_vocab(model: LoadedModel, draft_vocab) -> None:
    """A reduced draft vocabulary (decoding's `draft_vocab`) exports exactly only as the full head with
    every other row pushed down by a large negative bias; an architecture whose LM head has no bias
    (Llama, Qwen2, Mistral, GPT-NeoX, GPT-2: all of them in transformers) cannot express that, and
    zeroed rows would still win wherever every kept logit is negative. So it is refused there."""
    if draft_vocab is None:
        return
    head = model.model.get_output_embeddings()
    if getattr(head, "bias", None) is None:
        raise ExportError(f"a reduced draft vocabulary needs a bias on the LM head to push the other rows down, "
                          f"and {type(model.model).__name__}'s LM head has none; export the full head (drop "
                          "--draft-vocab): engines draft over the whole vocabulary at the cost of the full LM head")
    raise ExportError("exporting a reduced draft vocabulary is not implemented for LM heads with a bias yet")


def export_draft(model: LoadedModel, bundle: HeadBundle, layer: int, out: str | Path) -> Path:
    """Write exit `layer` of `bundle` as a draft model folder at `out` (atomically). An existing `out`
    is replaced only where it is a model folder (an earlier export), never another folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise ExportError(f"{out} exists and is not a model folder; choose a new folder for the draft model")
    cfg_dict, state = draft_state(model, bundle, layer)
    config = type(model.config).from_dict(cfg_dict)
    with torch.device("meta"):  # no random weights for layers about to be replaced
        draft = type(model.model)(config)
    draft.load_state_dict(state, assign=True, strict=False)
    missing = [k for k, v in draft.state_dict().items() if v.is_meta]
    if missing:
        raise ExportError(f"the draft model misses weights {missing[:3]}; this architecture is not supported")
    draft.tie_weights()
    with atomic_dir(out) as tmp:
        draft.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
    return Path(out)

"""A trained exit as a GGUF file that llama.cpp loads: the same draft model as export/draft.py (the
base's first `layer` decoder layers, its final norm, the exit's LM head), written with the `gguf`
package in the tensor layout, names and metadata of llama.cpp's own HF converter.

Why not run llama.cpp's converter on the exported HF folder: that script is not installed with the
`gguf` package, it needs llama.cpp's checkout and its Python deps, and it identifies a tokenizer's
pre-tokenizer by hashing its output on a probe text against a table it updates by hand. Writing the
few tensors of a draft ourselves keeps `exitspec export-draft --gguf Q8_0` one step.

What llama.cpp expects, and where this file gets it right:
- tensor names: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,
  ffn_up,ffn_down}, output_norm, output (only for an untied or tuned head; absent, llama.cpp ties the
  output to token_embd);
- the LLAMA arch applies rope to adjacent pairs (x0,x1),(x2,x3).. while HF rotates halves
  (x_i, x_{i+d/2}); the converter therefore reorders the rows of each head of W_q and W_k so that
  row 2i is HF's row i and row 2i+1 is HF's row i+d/2 (`_interleave`). QWEN2 runs NEOX rope (halves,
  as HF) and takes the rows as they are;
- 1-D tensors (norms, biases, rope factors) stay F32; matrices are F16 or Q8_0 (blocks of 32 along
  a row; a row not a multiple of 32 falls back to F16, as the converter does);
- the tokenizer as metadata: byte-level BPE only ("gpt2": tokens in the GPT-2 byte alphabet, merges,
  token types, special ids, add_bos/add_eos, the chat template).

Supported: HF model types llama and mistral (GGUF arch "llama"), qwen2 ("qwen2"), with rope types
default, linear and llama3 and a byte-level BPE tokenizer. Anything else is refused (ExportError).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from exitspec.export.draft import ExportError, draft_state
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import LoadedModel, embedded_gguf_path

GGUF_TYPES = {"Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
              "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16)}
# HF model_type -> GGUF arch. Mistral is llama.cpp's "llama" (its converter maps it so too; a sliding
# window is not expressed there, which matters only past the window's length).
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_INTERLEAVED_ROPE = {"llama"}  # GGUF archs whose rope pairs adjacent dims (Q/K rows reordered)
_ROPE_TYPES = ("default", "linear", "llama3")
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# llama.cpp's names for the pre-tokenizers HF writes as JSON (the split before BPE; llama.cpp
# re-implements each by name). Unknown ones get "default", llama.cpp's generic split.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {_LLAMA3: "llama-bpe", _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


def check_gguf(model: LoadedModel) -> str:
    """The GGUF arch for this model, or ExportError saying what is supported (cheap: no weights)."""
    cfg = model.config
    arch = ARCHS.get(cfg.model_type)
    if arch is None:
        raise ExportError(f"GGUF export supports the model types {sorted(ARCHS)} (llama.cpp archs llama, qwen2), "
                          f"not {cfg.model_type!r}; export the HF folder and convert it with llama.cpp instead")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"llama.cpp's {arch} runs a SiLU MLP, this model's activation is {cfg.hidden_act!r}")
    if (rope_type := _rope(cfg.to_dict())[0]) not in _ROPE_TYPES:
        raise ExportError(f"rope type {rope_type!r} is not exported; supported: {', '.join(_ROPE_TYPES)}")
    _tokenizer_spec(model.tokenizer)
    return arch


def export_gguf(model: LoadedModel, bundle: HeadBundle, layer: int, out: str | Path, qtype: str = "Q8_0") -> Path:
    """Write exit `layer` of `bundle` as a GGUF draft model at `out` (a .gguf path), atomically.
    An existing `out` is replaced only where it is a GGUF file."""
    out = Path(out)
    if qtype not in GGUF_TYPES:
        raise ExportError(f"GGUF tensor type {qtype!r} is not supported; use one of {', '.join(GGUF_TYPES)}")
    if out.suffix != ".gguf" or out.is_dir() or (out.exists() and _magic(out) != b"GGUF"):
        raise ExportError(f"{out} is not a .gguf file path (or exists and is not a GGUF file); "
                          "choose a new path ending in .gguf")
    arch = check_gguf(model)
    cfg, state = draft_state(model, bundle, layer)
    ggml_type, file_type = GGUF_TYPES[qtype]
    w = gguf.GGUFWriter(None, arch)  # tensors stay in memory until written below
    _add_params(w, cfg, layer, file_type, f"{model.name} exit {layer}")
    _add_tokenizer(w, model, cfg["vocab_size"])

    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    for key, t in state.items():
        if key == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # tied: llama.cpp reuses token_embd
        name = _gguf_name(key)
        role = name.split(".")[-2]  # "blk.3.attn_q.weight" -> "attn_q"
        if arch in _INTERLEAVED_ROPE and role in ("attn_q", "attn_k"):
            t = _interleave(t, heads if role == "attn_q" else kv_heads)
        _add_tensor(w, name, t.detach().float().cpu().numpy(), ggml_type)
    if (factors := _llama3_rope_factors(cfg)) is not None:
        _add_tensor(w, "rope_freqs.weight", factors.numpy(), ggml_type)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 -> the user's usual file mode
        os.replace(tmp, out)  # atomic within one directory: the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _gguf_name(key: str) -> str:
    """HF state-dict key -> GGUF tensor name ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    base, _, suffix = key.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{suffix}"
    if (m := _KEY.match(key)) and m.group(2) in _BLOCK:
        return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ExportError(f"no GGUF tensor for {key}: this checkpoint has a layer llama.cpp's arch does not")


def _interleave(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of W_q / W_k (or their bias), [n_heads*d, ...], from HF's rotate-half order to llama.cpp's
    pairs: per head, view the d rows as [2, d/2] (halves), transpose to [d/2, 2], flatten."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _add_tensor(w: gguf.GGUFWriter, name: str, data: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> None:
    """Norms, biases and other 1-D tensors F32; matrices `ggml_type` (Q8_0 -> F16 where a row is not whole blocks)."""
    qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or name.endswith("_norm.weight") else ggml_type
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    w.add_tensor(name, packed, raw_dtype=qtype)  # Q8_0: uint8 bytes [rows, cols/32*34]; shape derived from them


def _rope(cfg: dict) -> tuple[str, dict]:
    """(rope type, parameters) from transformers 5's `rope_parameters` or 4.x's rope_theta + rope_scaling."""
    params = cfg.get("rope_parameters") or {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta")}
    return params.get("rope_type", params.get("type")) or "default", params


def _add_params(w: gguf.GGUFWriter, cfg: dict, layer: int, file_type: gguf.LlamaFileType, name: str) -> None:
    """The hyperparameters llama.cpp reads under `<arch>.` (block_count is the draft's: `layer`)."""
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(layer)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    if head_dim != hidden // heads:  # e.g. Mistral-Nemo: d_head * heads != hidden
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope_type, rope = _rope(cfg)
    w.add_rope_freq_base(rope.get("rope_theta") or 10000.0)
    w.add_rope_dimension_count(head_dim)
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _llama3_rope_factors(cfg: dict) -> torch.Tensor | None:
    """Llama 3.1's rope scaling as llama.cpp takes it: a `rope_freqs` tensor [d/2] that each base
    frequency is divided by (1 for short wavelengths, `factor` for long ones, a smooth ramp between)."""
    rope_type, p = _rope(cfg)
    if rope_type != "llama3":
        return None
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base, factor, ctx = p.get("rope_theta") or 10000.0, p["factor"], p["original_max_position_embeddings"]
    lo, hi = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi * base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # 2*pi / inv_freq
    smooth = ((ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)  # 0: long wavelength (scaled), 1: short (kept)
    return (1 / ((1 - smooth) / factor + smooth)).float()


def _tokenizer_spec(tok) -> dict:
    """The backend tokenizer's JSON, refused unless it is byte-level BPE with merges."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    byte_level = '"ByteLevel"' in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if spec["model"].get("type") != "BPE" or not byte_level or not spec["model"].get("merges"):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2 style with merges: Llama 3, Qwen2, "
                          "SmolLM); this one is not: export the HF folder and convert it with llama.cpp")
    return spec


def _pre_tokenizer(model: LoadedModel, spec: dict) -> str:
    """llama.cpp's name for the split before BPE: the source GGUF's own where the model came from one
    (exact), else recognised from the tokenizer JSON, else "default"."""
    source = embedded_gguf_path(str(model.source)) or Path(str(model.source))
    if source.suffix == ".gguf" and source.is_file():
        field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"  # the plain GPT-2 split (llama.cpp spells this one with a hyphen)
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # the GPT-2 split after one-digit splitting (SmolLM, StarCoder)
    split = next((p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"), None)
    return _PRE_SPLITS.get(split, "default")


def _add_tokenizer(w: gguf.GGUFWriter, model: LoadedModel, vocab_size: int) -> None:
    """tokenizer.ggml.* for byte-level BPE: one token per id up to the model's vocab (ids the tokenizer
    lacks are "[PAD<id>]", UNUSED), merges as "a b", added special tokens CONTROL, other added ones
    USER_DEFINED, and the special ids / add-BOS flags from what the tokenizer does."""
    tok = model.tokenizer
    spec = _tokenizer_spec(tok)
    added = tok.added_tokens_decoder  # {id: AddedToken}
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {i: a.content for i, a in added.items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)}, past the model's vocab_size {vocab_size}")
    T = gguf.TokenType
    types = [T.UNUSED if i not in by_id else T.NORMAL if i not in added else
             T.CONTROL if added[i].special else T.USER_DEFINED for i in range(vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(model, spec))
    w.add_token_list([by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for kind, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                      ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if (token_id := getattr(tok, f"{kind}_token_id", None)) is not None:
            add(token_id)
    ids = tok.encode("a")  # what encoding adds around a text: llama.cpp's add_bos / add_eos
    w.add_add_bos_token(tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    w.add_add_eos_token(tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id)
    if isinstance(getattr(tok, "chat_template", None), str):
        w.add_chat_template(tok.chat_template)

"""Architecture adapters: run one HF decoder layer at a time against our KV cache.

Each adapter reads HF's own submodules (projections, norms, activations, rotary embedding) and
does only the glue HF does inside its forward: split heads, rotate, write the cache, attend, add
the residual. No HF file is copied, nothing is patched, the config is never touched.

Supported: the Llama family (llama, qwen2, mistral; SmolLM2 is llama), GPT-NeoX (Pythia), GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from exitspec.models.ops import attention, linear


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass
class StepContext:
    """Everything the layers of one forward call share, computed once per call."""

    positions: torch.Tensor  # (B, T) absolute positions of the new tokens
    rows: torch.Tensor | None  # (B, 1) row index for scattered cache writes; None = contiguous slice
    start: int  # first position when all rows share positions (contiguous fast path)
    attend_len: int  # L: slots 0..L-1 are attended (max position + 1)
    mask: torch.Tensor | None  # (B, 1, T, L) bool, True = may attend; None = attend everything
    rope: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) each (B, T, rot_dim)
    windowed_mask: dict[int, torch.Tensor | None]  # sliding-window masks by window size


def _write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k, v (B, Hkv, T, D) at the tokens' positions; return the attended cache views."""
    T = k.shape[2]
    if ctx.rows is None:
        cache_k[:, :, ctx.start: ctx.start + T] = k
        cache_v[:, :, ctx.start: ctx.start + T] = v
    else:
        # Advanced indices (B,1) and (B,T) around a slice put the indexed dims first: (B, T, Hkv, D).
        cache_k[ctx.rows, :, ctx.positions] = k.transpose(1, 2)
        cache_v[ctx.rows, :, ctx.positions] = v.transpose(1, 2)
    return cache_k[:, :, : ctx.attend_len], cache_v[:, :, : ctx.attend_len]


class Adapter:
    """Interface of an architecture adapter. Shapes: B batch, T new tokens, C hidden size."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # --- sizes --------------------------------------------------------------------------------
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_kv_heads: int
    head_dim: int
    max_positions: int

    # --- pieces -------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B,T) -> (B,T,C)
        raise NotImplementedError

    def rope(self, h: torch.Tensor, positions: torch.Tensor):  # -> (cos, sin) or None
        return None

    def layer(self, i: int, h: torch.Tensor, cache_kv, ctx: StepContext, skip_mlp: bool = False):
        raise NotImplementedError

    def window(self, i: int) -> int | None:
        """Sliding-window size of layer i, or None for full attention."""
        return None

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def mlp_params(self, i: int) -> int:
        raise NotImplementedError


class LlamaAdapter(Adapter):
    """llama / qwen2 / mistral: pre-norm, RoPE, grouped-query attention, gated MLP."""

    family = "llama"
    model_types = ("llama", "qwen2", "mistral")

    def __init__(self, model):
        super().__init__(model)
        base = model.model
        self.base = base
        self.layers = base.layers
        attn0 = self.layers[0].self_attn
        c = self.config
        self.num_layers = len(self.layers)
        self.hidden_size = c.hidden_size
        self.vocab_size = c.vocab_size
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = attn0.head_dim
        self.max_positions = c.max_position_embeddings

    def embed(self, ids, positions):
        return self.base.embed_tokens(ids)

    def rope(self, h, positions):
        return self.base.rotary_emb(h, positions)

    def window(self, i):
        return getattr(self.layers[i].self_attn, "sliding_window", None)

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        blk = self.layers[i]
        at = blk.self_attn
        B, T, _ = h.shape
        x = blk.input_layernorm(h)
        q = linear(x, at.q_proj.weight, at.q_proj.bias).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = linear(x, at.k_proj.weight, at.k_proj.bias).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = linear(x, at.v_proj.weight, at.v_proj.bias).view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope
        q, k = _rotate(q, k, cos, sin)
        kk, vv = _write_kv(*cache_kv, k, v, ctx)
        mask = ctx.windowed_mask.get(self.window(i), ctx.mask)
        o = attention(q, kk, vv, mask, at.scaling)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, -1)
        h = h + linear(o, at.o_proj.weight, at.o_proj.bias)
        if skip_mlp:
            return h
        mlp = blk.mlp
        x = blk.post_attention_layernorm(h)
        gate = mlp.act_fn(linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias))
        up = linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
        return h + linear(gate * up, mlp.down_proj.weight, mlp.down_proj.bias)

    @property
    def final_norm(self):
        return self.base.norm


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: LayerNorm, partial rotary, fused per-head QKV, (parallel) residual."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)

    def __init__(self, model):
        super().__init__(model)
        base = model.gpt_neox
        self.base = base
        self.layers = base.layers
        c = self.config
        self.num_layers = len(self.layers)
        self.hidden_size = c.hidden_size
        self.vocab_size = c.vocab_size
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.max_positions = c.max_position_embeddings

    def embed(self, ids, positions):
        return self.base.embed_in(ids)

    def rope(self, h, positions):
        return self.base.rotary_emb(h, positions)

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        blk = self.layers[i]
        at = blk.attention
        B, T, _ = h.shape
        x = blk.input_layernorm(h)
        # HF lays the fused projection out per head as [q | k | v] (B, T, H, 3D).
        qkv = linear(x, at.query_key_value.weight, at.query_key_value.bias)
        qkv = qkv.view(B, T, -1, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = ctx.rope
        q, k = _rotate(q, k, cos, sin)
        kk, vv = _write_kv(*cache_kv, k, v, ctx)
        o = attention(q, kk, vv, ctx.mask, at.scaling).transpose(1, 2).reshape(B, T, -1)
        attn_out = linear(o, at.dense.weight, at.dense.bias)
        if skip_mlp:
            return h + attn_out
        if blk.use_parallel_residual:
            return h + attn_out + self._mlp(blk, blk.post_attention_layernorm(h))
        h = h + attn_out
        return h + self._mlp(blk, blk.post_attention_layernorm(h))

    @staticmethod
    def _mlp(blk, x):
        m = blk.mlp
        return linear(m.act(linear(x, m.dense_h_to_4h.weight, m.dense_h_to_4h.bias)),
                      m.dense_4h_to_h.weight, m.dense_4h_to_h.bias)

    @property
    def final_norm(self):
        return self.base.final_layer_norm


class GPT2Adapter(Adapter):
    """GPT-2: learned absolute positions, LayerNorm, Conv1D projections (weights stored (in, out))."""

    family = "gpt2"
    model_types = ("gpt2",)

    def __init__(self, model):
        super().__init__(model)
        base = model.transformer
        self.base = base
        self.layers = base.h
        c = self.config
        self.num_layers = len(self.layers)
        self.hidden_size = c.n_embd
        self.vocab_size = c.vocab_size
        self.num_heads = c.n_head
        self.num_kv_heads = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.max_positions = c.n_positions

    def embed(self, ids, positions):
        return self.base.wte(ids) + self.base.wpe(positions)

    @staticmethod
    def _conv1d(x, mod):
        # HF Conv1D computes x @ W + b with W stored (in, out).
        return torch.addmm(mod.bias, x.reshape(-1, x.shape[-1]), mod.weight).view(*x.shape[:-1], -1)

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        blk = self.layers[i]
        at = blk.attn
        B, T, C = h.shape
        x = blk.ln_1(h)
        q, k, v = self._conv1d(x, at.c_attn).split(C, dim=-1)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        kk, vv = _write_kv(*cache_kv, k, v, ctx)
        o = attention(q, kk, vv, ctx.mask, at.scaling).transpose(1, 2).reshape(B, T, C)
        h = h + self._conv1d(o, at.c_proj)
        if skip_mlp:
            return h
        m = blk.mlp
        return h + self._conv1d(m.act(self._conv1d(blk.ln_2(h), m.c_fc)), m.c_proj)

    @property
    def final_norm(self):
        return self.base.ln_f


def _rotate(q, k, cos, sin):
    """Apply (possibly partial) rotary embeddings to the first cos.shape[-1] dims of q and k."""
    cos = cos.unsqueeze(1)  # (B, 1, T, rot)
    sin = sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_r, q_p = q[..., :rot], q[..., rot:]
    k_r, k_p = k[..., :rot], k[..., rot:]
    q_r = q_r * cos + _rotate_half(q_r) * sin
    k_r = k_r * cos + _rotate_half(k_r) * sin
    return torch.cat([q_r, q_p], dim=-1), torch.cat([k_r, k_p], dim=-1)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, GPTNeoXAdapter, GPT2Adapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; exitspec runs {', '.join(SUPPORTED_MODEL_TYPES)}"
    )

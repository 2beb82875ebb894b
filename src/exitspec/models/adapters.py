"""Architecture adapters: run one HF decoder layer at a time against our KV cache.

Each adapter reads HF's own submodules (projections, norms, activations, rotary embedding) and
does only the glue HF does inside its forward: split heads, rotate, write the cache, attend, add
the residual. No HF file is copied, nothing is patched, the config is never touched.

Supported: the Llama family (llama, qwen2, mistral; SmolLM2 is llama), GPT-NeoX (Pythia), GPT-2, and
Gemma 3 (models/gemma3.py). The interface they implement is models/interface.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exitspec import kernels
from exitspec.models.dims import ModelDims
from exitspec.models.gemma3 import Gemma3Adapter
from exitspec.models.int4 import Int4Groups, Int4Linear
from exitspec.models.interface import (  # the interface lives apart so that family modules (gemma3) can subclass it
    Adapter,
    Modules,
    StepContext,
    UnsupportedArchitectureError,
    rotate_half,
    sliding_window,
    write_kv,
)
from exitspec.models.kquants import QuantLinear
from exitspec.models.ops import Linear, attention, outside_inference_mode

# Re-exported: the runtime and the tests import these from here.
__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "Adapter", "StepContext", "UnsupportedArchitectureError",
           "adapter_for", "sliding_window"]


@dataclass
class _LlamaPlan:
    """One Llama-family layer's tensors, gathered once (shapes for C hidden, I intermediate)."""

    # Dense (Linear), 4-bit groups (Int4Linear) or a K-quant GGUF's blocks (QuantLinear), see Adapter.projection.
    qkv: Linear | Int4Linear | QuantLinear  # (H*D + 2*Hkv*D, C) fused [q | k | v]; dense: HF's q/k/v are views of it
    o: Linear | Int4Linear | QuantLinear  # (C, H*D)
    gate_up: Linear | Int4Linear | QuantLinear  # (2I, C) fused [gate | up]; dense: HF's gate/up are views of it
    down: Linear | Int4Linear | QuantLinear  # (C, I)
    act: object
    ln1: torch.Tensor
    eps1: float
    ln2: torch.Tensor
    eps2: float
    norm_shape: tuple[int]
    scaling: float
    window: int | None


class LlamaAdapter(Adapter):
    """llama / qwen2 / mistral: pre-norm, RoPE, grouped-query attention, gated MLP."""

    family = "llama"
    model_types = ("llama", "qwen2", "mistral")
    fused_tree = True  # kernels/csrc/llama.cpp takes tree masks

    def __init__(self, model, int4=None, fuse=True):
        super().__init__(model, int4, fuse)
        base = model.model
        self.base = base
        self.layers = base.layers
        attn0 = self.layers[0].self_attn
        c = self.config
        self.dims = ModelDims(num_layers=len(self.layers), hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                              num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                              head_dim=attn0.head_dim, max_positions=c.max_position_embeddings)
        self._plans = [self._plan(blk) for blk in self.layers]
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, D) cos, sin
        self.stack = self._fused_stack() if fuse else None
        self.fused = self.stack is not None

    def _fused_stack(self):
        """The whole stack as one C++ object (kernels/csrc/llama.cpp) where every projection runs on
        exitspec's q4 kernel and the layer is the plain Llama one (SiLU MLP, full-width rotate-half
        RoPE); None otherwise (the per-op path below then runs, K-quant blocks included)."""
        plans = self._plans
        if not plans or any(not isinstance(getattr(p, name), Int4Linear) or getattr(p, name).kernel is None
                            for p in plans for name in ("qkv", "o", "gate_up", "down")):
            return None
        c = self.config
        ops = kernels.load()
        if p_act(plans) is not F.silu or getattr(c, "partial_rotary_factor", 1.0) != 1.0 \
                or not ops.attention_supports(self.head_dim):
            return None
        inter = plans[0].gate_up.out_features // 2
        stack = ops.LlamaStack(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, inter,
                               plans[0].scaling)
        for p in plans:
            stack.add_layer(p.qkv.kernel, p.o.kernel, p.gate_up.kernel, p.down.kernel,
                            p.ln1.detach().float().contiguous(), p.eps1, p.ln2.detach().float().contiguous(), p.eps2,
                            p.window or 0)
        return stack

    def run(self, h, cache, ctx, start, stop, skip_mlp):
        if self.stack is None:
            return super().run(h, cache, ctx, start, stop, skip_mlp)
        cos, sin = ctx.rope
        skip = [i in skip_mlp for i in range(self.num_layers)] if skip_mlp else []
        return self.stack.forward(h.contiguous(), cache.k, cache.v, ctx.positions.contiguous(), cos.contiguous(),
                                  sin.contiguous(), start, stop, skip, ctx.tree)

    def embed(self, ids, positions):
        return F.embedding(ids, self.base.embed_tokens.weight)  # what HF's nn.Embedding does, one call less

    # RoPE variants whose tables depend only on the position (not on the sequence length).
    STATIC_ROPE = ("default", "linear", "llama3", "yarn")

    def rope(self, h, positions):
        """(cos, sin), each (B, T, D), as HF's rotary embedding computes them. For static RoPE types
        they are read from a table HF's module filled once for positions 0..n-1 (each entry is one
        product inv_freq * position, then cos/sin: the same values whatever else is in the call),
        saving the small ops HF's module runs on every forward."""
        rot = self.base.rotary_emb
        if getattr(rot, "rope_type", "default") not in self.STATIC_ROPE or positions.device != h.device:
            return rot(h, positions)
        need = int(positions.max()) + 1
        table = self._rope_table
        if table is None or table[0].shape[0] < need or table[0].dtype != h.dtype:
            n = min(max(need, 2 * (table[0].shape[0] if table is not None else 256)), self.max_positions)
            with outside_inference_mode():  # kept across calls, in and out of inference mode
                cos, sin = rot(h, torch.arange(max(n, need), device=h.device)[None])
            table = self._rope_table = (cos[0], sin[0])
        return table[0][positions], table[1][positions]

    def norm(self, h):
        return torch.rms_norm(h, (self.hidden_size,), self.base.norm.weight, self.base.norm.variance_epsilon)

    def window(self, i):
        return self._plans[i].window

    residual_outputs = ("self_attn.o_proj", "mlp.down_proj")

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        return self._layer(self._plans[i], h, cache_kv, ctx, skip_mlp)

    def block(self, blk, h, cache_kv, ctx):
        at, mlp = blk.self_attn, blk.mlp
        ln1, ln2 = blk.input_layernorm, blk.post_attention_layernorm
        act = F.silu if getattr(self.config, "hidden_act", None) == "silu" else mlp.act_fn
        plan = _LlamaPlan(qkv=Modules([at.q_proj, at.k_proj, at.v_proj]), o=Modules([at.o_proj]),
                          gate_up=Modules([mlp.gate_proj, mlp.up_proj]), down=Modules([mlp.down_proj]), act=act,
                          ln1=ln1.weight, eps1=ln1.variance_epsilon, ln2=ln2.weight, eps2=ln2.variance_epsilon,
                          norm_shape=(self.hidden_size,), scaling=at.scaling, window=sliding_window(self.config, at))
        return self._layer(plan, h, cache_kv, ctx)

    def _layer(self, p: _LlamaPlan, h, cache_kv, ctx, skip_mlp=False):
        B, T, _ = h.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = torch.rms_norm(h, p.norm_shape, p.ln1, p.eps1)  # bit-identical to HF's LlamaRMSNorm
        qkv = p.qkv(x, self.min_rows).view(B, T, H + 2 * Hkv, D)  # (B, T, H+2Hkv, D)
        # Rotate q and k heads in one pass (elementwise, so bit-identical to rotating them apart).
        qk = qkv[:, :, : H + Hkv].transpose(1, 2)  # (B, H+Hkv, T, D)
        cos, sin = ctx.rope_by_head()
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :H], qk[:, H:]
        v = qkv[:, :, H + Hkv:].transpose(1, 2)  # (B, Hkv, T, D)
        kk, vv = write_kv(*cache_kv, k, v, ctx)
        mask = ctx.windowed_mask.get(p.window, ctx.mask) if p.window is not None else ctx.mask
        o = attention(q, kk, vv, mask, p.scaling, self.min_rows)  # (B, H, T, D)
        h = h + p.o(o.transpose(1, 2).reshape(B, T, H * D), self.min_rows)
        if skip_mlp:
            return h
        x = torch.rms_norm(h, p.norm_shape, p.ln2, p.eps2)
        gu = p.gate_up(x, self.min_rows)  # (B, T, 2I): [gate | up]
        I = gu.shape[-1] // 2  # noqa: E741
        return h + p.down(p.act(gu[..., :I]) * gu[..., I:], self.min_rows)

    def _plan(self, blk) -> _LlamaPlan:
        """Per-layer tensors gathered once: fused q|k|v and gate|up weights (aliased by HF's
        parameters, see ops.fuse_linears), norm weights, activation. Saves ~25 attribute lookups
        and 3 matmul dispatches per layer per step."""
        at, mlp = blk.self_attn, blk.mlp
        act = F.silu if getattr(self.config, "hidden_act", None) == "silu" else mlp.act_fn
        ln1, ln2 = blk.input_layernorm, blk.post_attention_layernorm
        return _LlamaPlan(
            qkv=self.projection([at.q_proj, at.k_proj, at.v_proj]), o=self.projection([at.o_proj]),
            gate_up=self.projection([mlp.gate_proj, mlp.up_proj]), down=self.projection([mlp.down_proj]), act=act,
            ln1=ln1.weight, eps1=ln1.variance_epsilon, ln2=ln2.weight, eps2=ln2.variance_epsilon,
            norm_shape=(self.hidden_size,), scaling=at.scaling, window=sliding_window(self.config, at))

    @property
    def final_norm(self):
        return self.base.norm


class GPTNeoXAdapter(Adapter):
    """GPT-NeoX / Pythia: LayerNorm, partial rotary, fused per-head QKV, (parallel) residual."""

    family = "gpt_neox"
    model_types = ("gpt_neox",)

    def __init__(self, model, int4=None, fuse=True):
        super().__init__(model, int4, fuse)
        base = model.gpt_neox
        self.base = base
        self.layers = base.layers
        c = self.config
        self.dims = ModelDims(num_layers=len(self.layers), hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                              num_heads=c.num_attention_heads, num_kv_heads=c.num_attention_heads,
                              head_dim=c.hidden_size // c.num_attention_heads,
                              max_positions=c.max_position_embeddings)
        self._proj = [self._projections(blk) for blk in self.layers]

    def _projections(self, blk) -> dict[str, Linear | Int4Linear]:
        at, m = blk.attention, blk.mlp
        return {"qkv": self.projection([at.query_key_value]), "dense": self.projection([at.dense]),
                "up": self.projection([m.dense_h_to_4h]), "down": self.projection([m.dense_4h_to_h])}

    def embed(self, ids, positions):
        return self.base.embed_in(ids)

    def rope(self, h, positions):
        return self.base.rotary_emb(h, positions)

    residual_outputs = ("attention.dense", "mlp.dense_4h_to_h")

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        return self._layer(self.layers[i], self._proj[i], h, cache_kv, ctx, skip_mlp)

    def block(self, blk, h, cache_kv, ctx):
        at, m = blk.attention, blk.mlp
        proj = {"qkv": at.query_key_value, "dense": at.dense, "up": m.dense_h_to_4h, "down": m.dense_4h_to_h}
        return self._layer(blk, proj, h, cache_kv, ctx)

    def _layer(self, blk, proj, h, cache_kv, ctx, skip_mlp=False):
        at = blk.attention
        B, T, _ = h.shape
        x = blk.input_layernorm(h)
        # HF lays the fused projection out per head as [q | k | v] (B, T, H, 3D).
        qkv = proj["qkv"](x)
        qkv = qkv.view(B, T, -1, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        cos, sin = ctx.rope
        q, k = _rotate(q, k, cos, sin)
        kk, vv = write_kv(*cache_kv, k, v, ctx)
        o = attention(q, kk, vv, ctx.mask, at.scaling).transpose(1, 2).reshape(B, T, -1)
        attn_out = proj["dense"](o)
        if skip_mlp:
            return h + attn_out
        if blk.use_parallel_residual:
            return h + attn_out + self._mlp(blk, proj, blk.post_attention_layernorm(h))
        h = h + attn_out
        return h + self._mlp(blk, proj, blk.post_attention_layernorm(h))

    @staticmethod
    def _mlp(blk, proj, x):
        return proj["down"](blk.mlp.act(proj["up"](x)))

    @property
    def final_norm(self):
        return self.base.final_layer_norm


class GPT2Adapter(Adapter):
    """GPT-2: learned absolute positions, LayerNorm, Conv1D projections (weights stored (in, out))."""

    family = "gpt2"
    model_types = ("gpt2",)

    def __init__(self, model, int4=None, fuse=True):
        super().__init__(model, int4, fuse)
        base = model.transformer
        self.base = base
        self.layers = base.h
        c = self.config
        self.dims = ModelDims(num_layers=len(self.layers), hidden_size=c.n_embd, vocab_size=c.vocab_size,
                              num_heads=c.n_head, num_kv_heads=c.n_head, head_dim=c.n_embd // c.n_head,
                              max_positions=c.n_positions)

    def embed(self, ids, positions):
        return self.base.wte(ids) + self.base.wpe(positions)

    @staticmethod
    def _conv1d(x, mod):
        # HF Conv1D computes x @ W + b with W stored (in, out).
        return torch.addmm(mod.bias, x.reshape(-1, x.shape[-1]), mod.weight).view(*x.shape[:-1], -1)

    residual_outputs = ("attn.c_proj", "mlp.c_proj")

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        return self._layer(self.layers[i], h, cache_kv, ctx, skip_mlp)

    def block(self, blk, h, cache_kv, ctx):
        return self._layer(blk, h, cache_kv, ctx)

    def _layer(self, blk, h, cache_kv, ctx, skip_mlp=False):
        at = blk.attn
        B, T, C = h.shape
        x = blk.ln_1(h)
        q, k, v = self._conv1d(x, at.c_attn).split(C, dim=-1)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        kk, vv = write_kv(*cache_kv, k, v, ctx)
        o = attention(q, kk, vv, ctx.mask, at.scaling).transpose(1, 2).reshape(B, T, C)
        h = h + self._conv1d(o, at.c_proj)
        if skip_mlp:
            return h
        m = blk.mlp
        return h + self._conv1d(m.act(self._conv1d(blk.ln_2(h), m.c_fc)), m.c_proj)

    @property
    def final_norm(self):
        return self.base.ln_f


def p_act(plans: list[_LlamaPlan]):
    """The activation every layer shares (None if they differ)."""
    acts = {p.act for p in plans}
    return acts.pop() if len(acts) == 1 else None


def _rotate(q, k, cos, sin):
    """Apply (possibly partial) rotary embeddings to the first cos.shape[-1] dims of q and k."""
    cos = cos.unsqueeze(1)  # (B, 1, T, rot)
    sin = sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q_r, q_p = q[..., :rot], q[..., rot:]
    k_r, k_p = k[..., :rot], k[..., rot:]
    q_r = q_r * cos + rotate_half(q_r) * sin
    k_r = k_r * cos + rotate_half(k_r) * sin
    return torch.cat([q_r, q_p], dim=-1), torch.cat([k_r, k_p], dim=-1)


ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, GPTNeoXAdapter, GPT2Adapter, Gemma3Adapter)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module, int4: dict[nn.Linear, Int4Groups] | None = None, fuse: bool = True) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model, int4, fuse)
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; exitspec runs {', '.join(SUPPORTED_MODEL_TYPES)}"
    )

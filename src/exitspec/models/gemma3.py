"""Gemma 3 (`gemma3_text`; Gemma 3 270M is one): HF's own modules run one layer at a time.

What sets a Gemma 3 layer apart from a Llama one, all read from HF's modules and config:
  * two attention kinds by `config.layer_types`: sliding-window layers ("sliding_attention", window
    `config.sliding_window`) and global ones ("full_attention"), each with its OWN RoPE base
    (`rope_parameters[kind]["rope_theta"]`: 10k local, 1M global). `rope` computes one table per
    kind and stacks them, (K, B, T, D), in `StepContext.rope`; each layer picks its kind's row.
  * RMSNorm scales by (1 + weight), computed in fp32 (HF's Gemma3RMSNorm); the weight is stored
    zero-centred. torch.rms_norm with the weight (1 + w) is bit-identical to it in fp32.
  * q_norm / k_norm: an RMSNorm over each head's D features of q and k, before RoPE.
  * four norms a layer: input, post-attention (on the attention output, before the residual add),
    pre-feed-forward and post-feed-forward (on the MLP output, before the residual add).
  * the embedding is multiplied by sqrt(hidden) (HF's `embed_scale` buffer, in the weight's dtype).
  * attention scaling query_pre_attn_scalar ** -0.5 (HF's `scaling`), not head_dim ** -0.5.
  * a gated MLP with gelu (tanh approximation), HF's `act_fn`.
  * optional final logit softcapping, cap * tanh(logits / cap), applied by the runtime after the LM
    head (`Adapter.logit_softcap`); Gemma 3's released configs leave it unset.
Attention-logit softcapping (a Gemma 2 setting) and bidirectional attention (Gemma 3 embedding
models) are refused by name: SDPA cannot softcap, and a decoder that sees later tokens cannot decode.

With weights="int4" on a K-quant GGUF (Gemma 3 270M's Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0; models/kquants.py)
the whole stack runs as one C++ call (kernels/csrc/gemma.cpp, `GemmaStack`; both kernel builds): the
projections on the K-quant kernels from the file's own blocks (a fused q|k|v or gate|up mixing block
types), and the glue this module runs as ~40 torch ops a layer (the four sandwich norms, q/k norms,
each kind's RoPE table, GELU-tanh, residuals) in C++ on the calling thread, attention on exitspec's
kernel with each layer's window and query_pre_attn_scalar scaling (token trees included: the `tree`
strategy verifies its tries on it as on the Llama stack). The per-op path below stays the
reference the fused stack is tested against (`fuse=False`), and runs where the stack cannot: dense
weights, Q4_0 / Q4_1 groups (one q4-kernel call per projection, Adapter.projection), no kernels.
Where a Gemma 3 270M step goes, with and without the stack, against the machine's read bandwidth:
benchmarks/gemma3/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from exitspec import kernels
from exitspec.models.dims import ModelDims
from exitspec.models.int4 import Int4Linear
from exitspec.models.interface import (
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


def gemma_rms(x: torch.Tensor, weight1: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Gemma3RMSNorm over the last dim of x, given `weight1` = 1 + weight in fp32: computed in
    fp32 and cast back to x's dtype, as HF does (bit-identical to it in fp32)."""
    return torch.rms_norm(x.float(), (x.shape[-1],), weight1, eps).to(x.dtype)


def _one_plus(norm: nn.Module) -> torch.Tensor:
    """(1 + weight) of a Gemma RMSNorm in fp32: what HF multiplies by."""
    return 1.0 + norm.weight.float()


@dataclass
class _GemmaPlan:
    """One Gemma 3 layer's tensors, gathered once (C hidden, I intermediate, D head dim)."""

    qkv: Linear | Int4Linear | QuantLinear | Modules  # (H*D + 2*Hkv*D, C) fused [q | k | v]
    o: Linear | Int4Linear | QuantLinear | Modules  # (C, H*D)
    gate_up: Linear | Int4Linear | QuantLinear | Modules  # (2I, C) fused [gate | up]
    down: Linear | Int4Linear | QuantLinear | Modules  # (C, I)
    act: object  # gelu, tanh approximation (HF's act_fn)
    # (1 + weight) in fp32 of the layer's norms: (C,) for the four around attention and MLP, (D,) for q/k.
    ln_in: torch.Tensor
    ln_post_attn: torch.Tensor
    ln_pre_ff: torch.Tensor
    ln_post_ff: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    eps: float  # every Gemma norm of a model shares config.rms_norm_eps
    scaling: float  # query_pre_attn_scalar ** -0.5
    window: int | None  # sliding window, None for a global layer
    rope: int  # which stacked RoPE table (index into Gemma3Adapter.rope_kinds)


class Gemma3Adapter(Adapter):
    """gemma3_text: local / global attention with their own RoPE bases, q/k norms, sandwich norms."""

    family = "gemma3"
    model_types = ("gemma3_text",)
    fused_tree = True  # kernels/csrc/gemma.cpp takes tree masks (sliding windows counted in path positions)

    # RoPE types whose tables depend only on the position (read from a table filled once, as Llama's).
    STATIC_ROPE = ("default", "linear", "llama3", "yarn")

    def __init__(self, model, int4=None, fuse=True):
        super().__init__(model, int4, fuse)
        c = self.config
        if getattr(c, "attn_logit_softcapping", None) is not None:
            raise UnsupportedArchitectureError(
                f"gemma3_text with attn_logit_softcapping={c.attn_logit_softcapping} is not supported: exitspec "
                "attends with torch's SDPA, which cannot softcap attention logits (Gemma 3's released models "
                "leave it unset)")
        if getattr(c, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                "gemma3_text with use_bidirectional_attention=True (an embedding model) cannot decode: every "
                "position would attend to later ones")
        base = model.model
        self.base = base
        self.layers = base.layers
        attn0 = self.layers[0].self_attn
        self.dims = ModelDims(num_layers=len(self.layers), hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                              num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                              head_dim=attn0.head_dim, max_positions=c.max_position_embeddings)
        # HF's final softcap, cap * tanh(logits / cap), which the runtime applies after the LM head.
        cap = getattr(c, "final_logit_softcapping", None)
        self.logit_softcap = float(cap) if cap else None
        # Attention kinds in a fixed order: the order of the stacked RoPE tables.
        self.rope_kinds: tuple[str, ...] = tuple(sorted(set(c.layer_types)))
        self._plans = [self._plan(blk, self.projection) for blk in self.layers]
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # (K, positions, D) cos, sin
        self.stack = self._fused_stack() if fuse else None
        self.fused = self.stack is not None

    def _fused_stack(self):
        """The whole stack as one C++ object (kernels/csrc/gemma.cpp) where every projection runs from a
        K-quant GGUF's blocks (QuantLinear) and the layer is the released Gemma 3 one (gelu-tanh MLP,
        no projection bias); None otherwise (the per-op path below then runs)."""
        plans, c = self._plans, self.config
        if not plans or any(not isinstance(getattr(p, name), QuantLinear) or getattr(p, name).bias is not None
                            for p in plans for name in ("qkv", "o", "gate_up", "down")):
            return None
        ops = kernels.load()
        if ops is None or getattr(c, "hidden_activation", None) != "gelu_pytorch_tanh" \
                or not ops.attention_supports(self.head_dim) or len({p.eps for p in plans}) != 1 \
                or len({p.scaling for p in plans}) != 1:
            return None
        p0 = plans[0]
        stack = ops.GemmaStack(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                               p0.gate_up.out_features // 2, p0.scaling)
        for p in plans:
            norms = [t.detach().float().contiguous() for t in (p.ln_in, p.ln_post_attn, p.ln_pre_ff, p.ln_post_ff,
                                                             p.q_norm, p.k_norm)]
            stack.add_layer(p.qkv.kernel, p.o.kernel, p.gate_up.kernel, p.down.kernel, *norms, p.eps,
                            p.window or 0, p.rope)
        return stack

    def run(self, h, cache, ctx, start, stop, skip_mlp):
        if self.stack is None:
            return super().run(h, cache, ctx, start, stop, skip_mlp)
        cos, sin = ctx.rope  # (K, B, T, D) each: one table per attention kind
        skip = [i in skip_mlp for i in range(self.num_layers)] if skip_mlp else []
        return self.stack.forward(h.contiguous(), cache.k, cache.v, ctx.positions.contiguous(), cos.contiguous(),
                                  sin.contiguous(), start, stop, skip, ctx.tree)

    # --- pieces ---------------------------------------------------------------------------------
    def embed(self, ids, positions):
        emb = self.base.embed_tokens
        # HF's Gemma3TextScaledWordEmbedding: the row times sqrt(hidden) rounded to the weight's dtype.
        return F.embedding(ids, emb.weight) * emb.embed_scale.to(emb.weight.dtype)

    def rope(self, h, positions):
        """(cos, sin), each (K, B, T, D): row k is HF's table for the attention kind rope_kinds[k]
        (its own base), as HF's rotary embedding computes it. Static RoPE types read a table HF's
        module filled once for positions 0..n-1 (each entry depends on its position alone)."""
        rot = self.base.rotary_emb
        static = all(rot.rope_type.get(kind, "default") in self.STATIC_ROPE for kind in self.rope_kinds)
        if not static or positions.device != h.device:
            tables = [rot(h, positions, kind) for kind in self.rope_kinds]
            return torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])
        need = int(positions.max()) + 1
        table = self._rope_table
        if table is None or table[0].shape[1] < need or table[0].dtype != h.dtype:
            n = min(max(need, 2 * (table[0].shape[1] if table is not None else 256)), self.max_positions)
            n = max(n, need)
            with outside_inference_mode():  # kept across calls, in and out of inference mode
                at = torch.arange(n, device=h.device)[None]
                tables = [rot(h, at, kind) for kind in self.rope_kinds]
            table = self._rope_table = (torch.stack([c[0] for c, _ in tables]), torch.stack([s[0] for _, s in tables]))
        return table[0][:, positions], table[1][:, positions]  # (K, B, T, D) each

    def window(self, i):
        return self._plans[i].window

    def norm(self, h):
        return gemma_rms(h, _one_plus(self.base.norm), self.base.norm.eps)

    @property
    def final_norm(self):
        return self.base.norm

    # Zeroed, o_proj and down_proj make the layer the identity: the post-attention and
    # post-feed-forward norms map a zero vector to zero.
    residual_outputs = ("self_attn.o_proj", "mlp.down_proj")

    def layer(self, i, h, cache_kv, ctx, skip_mlp=False):
        return self._layer(self._plans[i], h, cache_kv, ctx, skip_mlp)

    def block(self, blk, h, cache_kv, ctx):
        # Modules, not fused copies: autograd reaches the block's own parameters (heads/block.py).
        return self._layer(self._plan(blk, Modules), h, cache_kv, ctx)

    def _layer(self, p: _GemmaPlan, h: torch.Tensor, cache_kv, ctx: StepContext, skip_mlp: bool = False):
        B, T, _ = h.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = gemma_rms(h, p.ln_in, p.eps)
        qkv = p.qkv(x, self.min_rows).view(B, T, H + 2 * Hkv, D)  # (B, T, H+2Hkv, D)
        # q/k norms act on each head's D features, so they run before the heads are moved forward.
        q = gemma_rms(qkv[:, :, :H], p.q_norm, p.eps).transpose(1, 2)  # (B, H, T, D)
        k = gemma_rms(qkv[:, :, H: H + Hkv], p.k_norm, p.eps).transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[:, :, H + Hkv:].transpose(1, 2)  # (B, Hkv, T, D)
        cos, sin = ctx.rope[0][p.rope].unsqueeze(1), ctx.rope[1][p.rope].unsqueeze(1)  # (B, 1, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kk, vv = write_kv(*cache_kv, k, v, ctx)
        mask = ctx.windowed_mask.get(p.window, ctx.mask) if p.window is not None else ctx.mask
        o = attention(q, kk, vv, mask, p.scaling, self.min_rows)  # (B, H, T, D)
        h = h + gemma_rms(p.o(o.transpose(1, 2).reshape(B, T, H * D), self.min_rows), p.ln_post_attn, p.eps)
        if skip_mlp:
            return h
        x = gemma_rms(h, p.ln_pre_ff, p.eps)
        gu = p.gate_up(x, self.min_rows)  # (B, T, 2I): [gate | up]
        I = gu.shape[-1] // 2  # noqa: E741
        return h + gemma_rms(p.down(p.act(gu[..., :I]) * gu[..., I:], self.min_rows), p.ln_post_ff, p.eps)

    def _plan(self, blk: nn.Module, projection) -> _GemmaPlan:
        """A layer's tensors: projections through `projection` (fused / 4-bit for the model's own
        layers, Modules for a trainable copy), norms as (1 + weight), its window and RoPE kind."""
        at, mlp = blk.self_attn, blk.mlp
        return _GemmaPlan(
            qkv=projection([at.q_proj, at.k_proj, at.v_proj]), o=projection([at.o_proj]),
            gate_up=projection([mlp.gate_proj, mlp.up_proj]), down=projection([mlp.down_proj]), act=mlp.act_fn,
            ln_in=_one_plus(blk.input_layernorm), ln_post_attn=_one_plus(blk.post_attention_layernorm),
            ln_pre_ff=_one_plus(blk.pre_feedforward_layernorm), ln_post_ff=_one_plus(blk.post_feedforward_layernorm),
            q_norm=_one_plus(at.q_norm), k_norm=_one_plus(at.k_norm), eps=blk.input_layernorm.eps,
            scaling=at.scaling, window=sliding_window(self.config, at),
            rope=self.rope_kinds.index(self.config.layer_types[at.layer_idx]))

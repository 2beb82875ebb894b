"""The interface every architecture adapter implements (`Adapter`), the state one forward call's
layers share (`StepContext`), and the glue the families have in common: the cache write, the
sliding window HF applies, rotate-half RoPE, projections read from modules.

Kept apart from the families (models/adapters.py: Llama, GPT-NeoX, GPT-2; models/gemma3.py) so a
family in its own module subclasses it without a circle of imports (adapters.py names every family).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from exitspec.models.dims import ModelDims, dim
from exitspec.models.int4 import Int4Groups, Int4Linear
from exitspec.models.kquants import GGUFBlocks, QuantLinear
from exitspec.models.ops import Linear, fuse_linears, fused_bias


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
    # (cos, sin) each (B, T, rot_dim); a family whose layers use several RoPE bases stacks its tables
    # on a leading axis, (K, B, T, rot_dim), and each layer picks its own (models/gemma3.py).
    rope: tuple[torch.Tensor, torch.Tensor] | None
    windowed_mask: dict[int, torch.Tensor | None]  # sliding-window masks by window size
    # (cos, sin) each (B, 1, T, rot), broadcast over heads: unsqueezed once per call, not per layer.
    rope_heads: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # A token tree (decoding/token_tree.py): (B, T) int64 visibility masks over the row's new tokens
    # (bit i: token i), which write slots root + i rather than their positions (root + depth); the
    # fused stack takes the masks, the per-layer path has them in `mask`. None: a plain causal call.
    tree: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # (B, T) cache slots written, where they are not `positions`

    def rope_by_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_heads is None:
            cos, sin = self.rope
            self.rope_heads = (cos.unsqueeze(1), sin.unsqueeze(1))
        return self.rope_heads


def write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k, v (B, Hkv, T, D) at the tokens' slots (their positions but in a token tree); return the
    attended cache views."""
    T = k.shape[2]
    if ctx.rows is None:
        cache_k[:, :, ctx.start: ctx.start + T] = k
        cache_v[:, :, ctx.start: ctx.start + T] = v
    else:
        slots = ctx.positions if ctx.slots is None else ctx.slots
        # Advanced indices (B,1) and (B,T) around a slice put the indexed dims first: (B, T, Hkv, D).
        cache_k[ctx.rows, :, slots] = k.transpose(1, 2)
        cache_v[ctx.rows, :, slots] = v.transpose(1, 2)
    return cache_k[:, :, : ctx.attend_len], cache_v[:, :, : ctx.attend_len]


class Adapter:
    """Interface of an architecture adapter. Shapes: B batch, T new tokens, C hidden size."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, int4: dict[nn.Linear, Int4Groups | GGUFBlocks] | None = None,
                 fuse: bool = True):
        self.model = model
        self.config = model.config
        # 1: plain kernels; ops.MIN_ROWS: row-invariant mode (set by LayeredModel, see ops.linear).
        self.min_rows = 1
        # Projections whose checkpoint weights are 4-bit groups (models/int4.py) or a K-quant GGUF's blocks
        # (models/kquants.py); empty = all dense.
        self.int4 = int4 or {}
        # May a fused kernel stack replace the per-layer path where one exists (False: tests compare them)?
        self.fuse = fuse

    def projection(self, mods: list[nn.Linear]) -> Linear | Int4Linear | QuantLinear:
        """One projection, or several sharing an input fused into one (q|k|v, gate|up), run as
        4-bit groups where the checkpoint stores them so, from a K-quant GGUF's blocks on exitspec's
        K-quant kernels (one call for a fused q|k|v or gate|up whatever block types its parts have),
        else dense (prepacked where that helps)."""
        parts = [self.int4.get(m) for m in mods]
        if all(isinstance(p, GGUFBlocks) for p in parts):
            return QuantLinear(parts, fused_bias(mods))
        if all(isinstance(p, Int4Groups) for p in parts):
            return Int4Linear(Int4Groups.cat(parts), fused_bias(mods))
        w, b = fuse_linears(mods) if len(mods) > 1 else (mods[0].weight, mods[0].bias)
        return Linear(w, b)

    # --- sizes: one ModelDims, built by each family's __init__ ----------------------------------
    dims: ModelDims
    num_layers = dim("num_layers")
    hidden_size = dim("hidden_size")
    vocab_size = dim("vocab_size")
    num_heads = dim("num_heads")
    num_kv_heads = dim("num_kv_heads")
    head_dim = dim("head_dim")
    max_positions = dim("max_positions")

    # --- pieces -------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B,T) -> (B,T,C)
        raise NotImplementedError

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        """The call's RoPE tables for StepContext.rope: (cos, sin), or None for a model without RoPE."""
        return None

    def layer(self, i: int, h: torch.Tensor, cache_kv, ctx: StepContext, skip_mlp: bool = False):
        raise NotImplementedError

    def block(self, blk: nn.Module, h: torch.Tensor, cache_kv, ctx: StepContext) -> torch.Tensor:
        """A decoder layer module of this architecture that is not one of the model's own (an exit
        head's trainable copy, heads/block.py) over h (B, T, C), against `cache_kv` (that layer's own
        keys / values) and a masked `ctx`: the same math as `layer`, read from the module's own
        parameters each call (no fused or packed copies), so autograd reaches them."""
        raise NotImplementedError

    # Names, inside a decoder layer, of the projections that write into the residual stream; zeroed,
    # the layer is the identity (a new layer that starts as a no-op, heads/block.py).
    residual_outputs: tuple[str, ...] = ()

    # Final logit softcapping, logits -> cap * tanh(logits / cap), applied by the runtime after the LM
    # head (LayeredModel.head); None = none (every family but a Gemma config that sets it).
    logit_softcap: float | None = None

    # A fused kernel stack runs layers start..stop in one call (LlamaAdapter over q4 weights, Gemma3Adapter
    # over K-quant blocks); it masks by position itself, so the step context then carries no mask.
    fused: bool = False
    # Whether that fused stack takes token-tree masks (StepContext.tree; the Llama and Gemma 3 stacks
    # do). The per-layer path always can: its masks are dense.
    fused_tree: bool = False

    # The fused C++ stack where one runs (kernels/csrc/llama.cpp, gemma.cpp), else None.
    stack = None

    def take_stack_times(self) -> dict[str, float] | None:
        """ms the fused stack spent since the last call, by part ("products", "attention", "glue"); None
        where no fused stack runs."""
        if self.stack is None:
            return None
        return dict(zip(("products", "attention", "glue"), self.stack.take_times(), strict=True))

    def run(self, h: torch.Tensor, cache, ctx: StepContext, start: int, stop: int,
            skip_mlp: set[int] | frozenset[int]) -> torch.Tensor:
        """Layers start..stop-1 over h (B, T, C); the cache's lengths are the caller's to mark."""
        for i in range(start, stop):
            h = self.layer(i, h, cache.layer(i), ctx, skip_mlp=i in skip_mlp)
        return h

    def window(self, i: int) -> int | None:
        """Sliding-window size of layer i, or None for full attention."""
        return None

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm applied to h (B, T, C)."""
        return self.final_norm(h)

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    def mlp_params(self, i: int) -> int:
        raise NotImplementedError


def sliding_window(config, attn: nn.Module) -> int | None:
    """The sliding window HF applies in this attention layer (keys at positions > p - window for a
    query at p), or None for full attention. HF keeps it in different places by family: Qwen2's
    attention module holds it per layer (from config.layer_types), while Mistral's has no such
    attribute and every layer reads config.sliding_window when it runs (transformers 5);
    reading only the attribute silently dropped Mistral's window."""
    window = getattr(attn, "sliding_window", None)
    if window is not None:
        return int(window)
    types = getattr(config, "layer_types", None)
    if types is not None:
        layer = attn.layer_idx
        return int(config.sliding_window) if types[layer] == "sliding_attention" and config.sliding_window else None
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    return int(window) if window else None


class Modules:
    """Projections by module, called like a plan's fused Linear: [m1(x) | m2(x) | ...] (B, T, sum out)."""

    def __init__(self, mods: list[nn.Linear]):
        self.mods = mods

    def __call__(self, x: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
        return torch.cat([m(x) for m in self.mods], -1) if len(self.mods) > 1 else self.mods[0](x)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

"""The layered runtime: an HF decoder run in pieces — embed, layers start..stop, final norm, LM head.

Every decoding strategy is written against this one interface. A forward over new tokens is:

    h = lm.embed(ids, positions)                       # (B, T, C)
    h = lm.run_layers(h, positions, cache, 0, lm.num_layers)
    logits = lm.logits(h)                              # (B, T, V)

and an early exit at layer l is simply `run_layers(..., 0, l)` followed by an exit head; the deep
part `run_layers(..., l, L)` can run later, on the same positions, reusing the cache of layers < l.
"""

from __future__ import annotations

import torch

from exitspec import kernels
from exitspec.models.adapters import Adapter, StepContext, adapter_for
from exitspec.models.dims import dim
from exitspec.models.int4 import Int4Groups, Q8Linear
from exitspec.models.kquants import GGUFBlocks, QuantLinear
from exitspec.models.ops import MIN_ROWS, Linear, onednn_packing_available, outside_inference_mode
from exitspec.runtime.clock import ForwardClock
from exitspec.runtime.kv_cache import KVCache, aligned

# Most tokens of a token tree per row (decoding/token_tree.py): the fused attention kernel keeps a
# query's visibility over the tree in one 64-bit mask (kernels/csrc/attention.h); the per-layer path
# keeps the same limit, so that a strategy behaves alike on both.
MAX_TREE_NODES = 64


class LayeredModel:
    num_layers = dim("num_layers")
    hidden_size = dim("hidden_size")
    vocab_size = dim("vocab_size")
    max_positions = dim("max_positions")

    @outside_inference_mode()  # what it builds (fused weights, packed heads) outlives any decode loop
    def __init__(self, model: torch.nn.Module, *, row_invariant: bool | None = None,
                 int4: dict[torch.nn.Linear, Int4Groups | GGUFBlocks] | None = None, fuse: bool = True,
                 kv_dtype: torch.dtype | None = None):
        """`int4`: the 4-bit groups of the projections (models/int4.py), or a K-quant GGUF's blocks
        (models/kquants.py; the LM head's too where it is stored in K-quant blocks other than Q8_0);
        `exitspec.load(..., weights="int4")` builds it. Where exitspec's CPU kernels run (kernels/), a
        Llama-family stack of 4-bit groups then runs as one fused C++ call per `run_layers`
        (`fuse=False` keeps the per-layer path, for comparisons), K-quant blocks one projection at a
        time, and an LM head stored as GGUF Q8_0 runs from its int8 codes, one in other K-quant blocks
        on the K-quant kernel; otherwise the projections use torch's int4 kernel and the LM head a
        prepacked bf16 copy (`backend` says which runs).

        `row_invariant` (see the property) defaults to on with int4 weights: their products round
        their inputs to bf16, which turns the ~1e-7 row-count differences of fp32 attention into
        2^-9 ones and flips greedy near-ties between vanilla (1 row) and verification (k rows). The
        fused stack and the q4/q8/bf16 kernels are row-invariant by construction; on the per-layer
        path only attention pays (4 query rows).

        `kv_dtype`: the KV cache's element type, None = the model's dtype; torch.float16 where the
        fused stack runs (`kv_cache_dtypes()`): keys and values rounded to fp16 as they are written
        (as llama.cpp's default cache), half the bytes that attention reads per cached token, the
        part of a step that grows with the context. Every strategy on this runtime uses the same
        cache, so lossless decoding stays token-for-token equal to vanilla decoding with it."""
        self.model = model
        self.adapter: Adapter = adapter_for(model, int4, fuse)
        self.weights = "int4" if int4 else "dense"
        a = self.adapter
        self.row_invariant = bool(int4) if row_invariant is None else row_invariant
        self.dims = a.dims  # the model's sizes (models/dims.py); num_layers etc. below read it
        self.lm_head = a.lm_head
        self.final_norm = a.final_norm
        head_w, head_b = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        blocks = (int4 or {}).get(self.lm_head)
        # The head's K-quant blocks, kept: a reduced draft vocabulary packs its rows from them
        # (decoding/draft_vocab.py). None where the head is not stored so.
        self.head_blocks: GGUFBlocks | None = blocks if isinstance(blocks, GGUFBlocks) else None
        self._head = QuantLinear([blocks], head_b) if self.head_blocks is not None else \
            Q8Linear.from_weight(head_w, head_b) if int4 else None
        if self._head is None:
            if int4 and onednn_packing_available(torch.bfloat16, head_w.device):
                head_w = head_w.detach().to(torch.bfloat16)
            self._head = Linear(head_w, head_b)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.kv_dtype = kv_dtype or self.dtype
        if self.kv_dtype not in self.kv_cache_dtypes():
            names = ", ".join(str(d).removeprefix("torch.") for d in self.kv_cache_dtypes())
            raise ValueError(
                f"a {str(self.kv_dtype).removeprefix('torch.')} KV cache cannot run on this runtime (it runs: "
                f"{names}); an fp16 cache needs the fused stack: weights='int4' on a Llama-family model stored as "
                "Q4_0 / Q4_1 groups, or a Gemma 3 stored as K-quant blocks, with exitspec's CPU kernels"
            )
        # Distinct sliding-window sizes, looked up once rather than per layer per step.
        self._windows = sorted({w for i in range(self.num_layers) if (w := a.window(i)) is not None})
        # Time inside embed / run_layers / logits: a decode step's time outside it is host work.
        self.clock = ForwardClock()

    @property
    def backend(self) -> str:
        """Which kernels run the decoder projections and the LM head, in words: for K-quant blocks, each
        block type with the projections stored in it."""
        if self.weights == "dense":
            return f"torch ({str(self.dtype).replace('torch.', '')} weights)"
        ops = kernels.load()
        isa = f", {ops.ISA} build: {ops.NUMERICS}" if ops is not None else ""
        projs = list(_projections(self.adapter))
        kquant = any(isinstance(m, QuantLinear) for _, m in projs)
        if self.adapter.fused:
            layers = f"exitspec fused C++ stack ({f'K-quant blocks: {_kquant_types(projs)}' if kquant else 'q4'})"
        elif kquant:
            layers = f"exitspec K-quant kernels per projection: {_kquant_types(projs)}"
        elif any(getattr(m, "kernel", None) is not None for _, m in projs):
            layers = "exitspec q4 kernel per projection"
        else:
            layers = "torch's int4 kernel"
        if isinstance(self._head, QuantLinear):
            head = f"exitspec K-quant kernel ({self._head.types[0]})"
        elif isinstance(self._head, Q8Linear):
            head = "exitspec q8 kernel"
        else:  # not the file's Q8_0 or K-quant blocks, or no kernels: say so rather than look quantised
            head = "prepacked bf16 copy of the de-quantised weights (no Q8_0 / K-quant head the kernels run)"
        why = kernels.unavailable_reason()
        return (f"layers: {layers}; LM head: {head}{isa}"
                + (f" (exitspec kernels unavailable: {why})" if why else ""))

    @property
    def row_invariant(self) -> bool:
        """True: a row's logits are bit-identical in 1-row and k-row calls (Llama family; padded
        kernels, see models/ops.linear for the cost). False (default): fastest kernels, rows may
        differ by ~5e-5 in the logits."""
        return self.adapter.fused or self.adapter.min_rows > 1

    @row_invariant.setter
    def row_invariant(self, on: bool) -> None:
        # The fused kernels are row-invariant by construction; the setting only pads the per-op path.
        self.adapter.min_rows = MIN_ROWS if on else 1

    # ------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, hidden_layer: int | None = None, *,
                  head_cache: torch.dtype | None = None) -> KVCache:
        """`head_cache`: the element type of one more layer's keys / values, for an exit head that is a
        decoder layer reading the hidden states kept at `hidden_layer` (heads/block.py); None = none."""
        if max_len > self.max_positions:
            raise ValueError(
                f"{max_len} positions asked for but the model supports {self.max_positions}; "
                "shorten the prompt or lower max_new_tokens"
            )
        d = self.dims
        extra = None
        if head_cache is not None:
            if hidden_layer is None:
                raise ValueError("an exit head's own layer reads the kept hidden states: name hidden_layer")
            extra = KVCache(1, batch, d.num_kv_heads, d.head_dim, max_len, dtype=head_cache, device=self.device)
        return KVCache(d.num_layers, batch, d.num_kv_heads, d.head_dim, max_len, dtype=self.kv_dtype,
                       device=self.device, hidden_layer=hidden_layer, hidden_size=d.hidden_size,
                       hidden_dtype=self.dtype, head_cache=extra)

    def kv_cache_dtypes(self) -> tuple[torch.dtype, ...]:
        """The KV cache element types this runtime can run: its own dtype, and fp16 where the fused
        C++ stack attends (its attention kernel reads fp16 keys/values as fp32; the per-op path's
        torch attention would need a converted copy of the whole cache every step)."""
        return (self.dtype, torch.float16) if self.adapter.fused and self.dtype != torch.float16 else (self.dtype,)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.clock:
            return self.adapter.embed(ids, positions)

    def context(self, h: torch.Tensor, positions: torch.Tensor, tree: torch.Tensor | None = None) -> StepContext:
        """Shared per-call state: cache write pattern, causal mask, rotary tables. `tree`: (B, T) int64
        masks when the new tokens are a token tree (decoding/token_tree.py): token t of row b writes slot
        positions[b, 0] + t and sees the slots before the root and the tree tokens of its mask (bit i:
        token i); its position (RoPE) is root + depth."""
        if tree is not None and (tree.shape != positions.shape or positions.shape[1] > MAX_TREE_NODES):
            raise ValueError(f"tree masks {tuple(tree.shape)} must match the positions {tuple(positions.shape)}, "
                             f"with at most {MAX_TREE_NODES} tokens per row (the attention kernel's 64-bit masks); "
                             "verify a smaller tree")
        if tree is not None and not self.takes_trees:
            raise ValueError("this runtime's fused stack takes no token-tree masks; verify chains (no tree), or "
                             "load the model with fuse=False for the per-layer path")
        with self.clock:  # part of the forward (run_layers builds it when not given one)
            return self._context(h, positions, tree)

    def _context(self, h: torch.Tensor, positions: torch.Tensor, tree: torch.Tensor | None) -> StepContext:
        if self.adapter.fused:  # the fused kernels attend by position: no mask, no cache write pattern
            return StepContext(positions=positions, rows=None, start=0, attend_len=0, mask=None,
                               rope=self.adapter.rope(h, positions), windowed_mask={},
                               tree=None if tree is None else tree.to(torch.long).contiguous())
        return self.masked_context(h, positions, tree)

    @property
    def takes_trees(self) -> bool:
        """Can a forward verify a token tree (`context(tree=...)`)? The per-layer path always can; a fused
        stack where it takes tree masks (the Llama family's and Gemma 3's)."""
        return not self.adapter.fused or self.adapter.fused_tree

    def masked_context(self, h: torch.Tensor, positions: torch.Tensor,
                       tree: torch.Tensor | None = None) -> StepContext:
        """The per-layer path's context (cache write pattern, causal and window masks, rotary tables),
        also what a decoder layer outside the stack needs (adapter.block) when the stack is fused."""
        if tree is not None:
            return self._tree_context(h, positions, tree)
        B, T = positions.shape
        if B == 1:
            # Batch 1 (every decode step of a single sequence) always writes contiguous positions;
            # one .tolist() replaces several tensor reductions and host syncs.
            pl = positions[0].tolist()
            contiguous = pl == list(range(pl[0], pl[0] + T))
            start, attend_len = pl[0], max(pl) + 1
        else:
            first = positions[:, :1]
            # Fast path: every row writes the same contiguous positions.
            contiguous = bool((positions == first[:1] + torch.arange(T, device=positions.device)).all())
            start = int(positions[0, 0])
            attend_len = int(positions.max()) + 1
        # Attend to a SLOT_ALIGN multiple of slots, masking those past each query's position: this
        # makes a row's attention bit-identical whatever the call's row count (see kv_cache.py).
        real_len, attend_len = attend_len, aligned(attend_len)
        slots = torch.arange(attend_len, device=positions.device)
        causal = slots[None, None, :] <= positions[:, :, None]  # (B, T, L)
        mask = causal.unsqueeze(1)  # (B, 1, T, L)
        windowed: dict[int, torch.Tensor | None] = {}
        for w in self._windows:
            if real_len > w:
                near = slots[None, None, :] > positions[:, :, None] - w
                windowed[w] = (near & causal).unsqueeze(1)
        rows = None if contiguous else torch.arange(B, device=positions.device)[:, None]
        return StepContext(positions=positions, rows=rows, start=start, attend_len=attend_len,
                           mask=mask, rope=self.adapter.rope(h, positions), windowed_mask=windowed)

    def _tree_context(self, h: torch.Tensor, positions: torch.Tensor, tree: torch.Tensor) -> StepContext:
        """masked_context for a token tree: the dense mask that the fused kernel's tree masks stand for.
        Token t of row b sits in slot root_b + t and sees slots < root_b plus the tree slots of its mask;
        a sliding window compares positions, and a tree slot's position is its token's (root + depth).
        Mathematically the attention of a plain decode of the same path; SDPA sums the ancestors in
        other slots than that decode, so (unlike the fused kernel's) its low bits may differ from it."""
        B, T = positions.shape
        dev = positions.device
        root = positions[:, :1]  # (B, 1): the root's position is its slot
        slots = root + torch.arange(T, device=dev)  # (B, T)
        attend_len = aligned(int(slots.max()) + 1)
        j = torch.arange(attend_len, device=dev)
        sees = ((tree.to(dev)[:, :, None] >> torch.arange(T, device=dev)) & 1) != 0  # (B, T, T): t sees token i
        mask = (j[None, None, :] < root[:, :, None]).expand(B, T, attend_len).clone()  # (B, T, L): the prefix
        mask.scatter_(2, slots[:, None, :].expand(B, T, T), sees)
        key_pos = j.expand(B, attend_len).clone().scatter_(1, slots, positions)  # (B, L): each slot's position
        windowed: dict[int, torch.Tensor | None] = {}
        for w in self._windows:
            if int(positions.max()) + 1 > w:
                windowed[w] = ((key_pos[:, None, :] > positions[:, :, None] - w) & mask).unsqueeze(1)
        same_root = bool((root == root[:1]).all())
        return StepContext(positions=positions, rows=None if same_root else torch.arange(B, device=dev)[:, None],
                           start=int(root[0, 0]), attend_len=attend_len, mask=mask.unsqueeze(1),
                           rope=self.adapter.rope(h, positions), windowed_mask=windowed,
                           tree=tree.to(torch.long).contiguous(), slots=slots)

    def run_layers(
        self,
        h: torch.Tensor,  # (B, T, C) hidden states entering layer `start`
        positions: torch.Tensor,  # (B, T)
        cache: KVCache,
        start: int,
        stop: int,
        *,
        ctx: StepContext | None = None,
        skip_mlp: set[int] | frozenset[int] = frozenset(),
    ) -> torch.Tensor:  # (B, T, C) hidden states leaving layer stop-1
        if not 0 <= start <= stop <= self.num_layers:
            raise ValueError(f"layer range {start}..{stop} outside 0..{self.num_layers}")
        with self.clock:
            if ctx is None:
                ctx = self.context(h, positions)
            # A token tree fills slots root..root+T-1 (its positions stop at root + depth).
            end = positions[:, -1] + 1 if ctx.tree is None else positions[:, 0] + positions.shape[1]
            cache.check_room(end)
            h = self.adapter.run(h, cache, ctx, start, stop, skip_mlp)
            cache.mark_filled(start, stop, end)
            return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter.norm(h)

    def head(self, h_normed: torch.Tensor) -> torch.Tensor:
        # ops.Linear rather than the module: same math, but row-count invariant and prepacked where
        # that is faster (see models/ops.py).
        logits = self._head(h_normed, self.adapter.min_rows)
        cap = self.adapter.logit_softcap  # HF's order of operations: divide, tanh, multiply
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (B, T, C) -> (B, T, V)."""
        with self.clock:
            return self.head(self.adapter.norm(h))

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Full model on new tokens: (B, T) ids -> (B, T, V) logits, cache updated."""
        h = self.embed(ids, positions)
        h = self.run_layers(h, positions, cache, 0, self.num_layers)
        return self.logits(h)

    def layer_weight_bytes(self, start: int, stop: int) -> int:
        """Bytes of projection weights one token reads through layers start..stop-1, as this runtime
        holds them (a kernel's packed codes and scales, or dense tensors; norms and biases, a few KB,
        not counted): what a draft pass of an exit at `stop` streams (decoding/draft_work.py)."""
        total = 0
        for i in range(start, stop):
            projs = [m for _, m in _layer_projections(self.adapter, i)]
            total += sum(m.nbytes for m in projs) if projs else sum(
                p.numel() * p.element_size() for p in self.adapter.layers[i].parameters() if p.dim() == 2)
        return total

    @property
    def head_weight_bytes(self) -> int:
        """Bytes of LM-head weights one token's logits read, as the runtime runs the head."""
        return self._head.nbytes

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: embedding, layers, final norm, LM head (tied heads counted once)."""
        def count(m):
            return sum(p.numel() for p in m.parameters())
        layers = sum(count(blk) for blk in self.adapter.layers)
        total = sum(p.numel() for p in self.model.parameters())  # dedups tied weights
        head = count(self.lm_head)
        norm = count(self.final_norm)
        return {"total": total, "layers": layers, "per_layer": layers // self.num_layers,
                "lm_head": head, "final_norm": norm,
                "tied_embeddings": int(total < layers + norm + 2 * head)}


def _layer_projections(adapter: Adapter, i: int):
    """(name, projection object) of layer i's projections as the adapter built them; nothing for an
    adapter that runs HF's modules directly (GPT-2)."""
    if getattr(adapter, "_plans", None):
        plan = adapter._plans[i]
        yield from (("qkv", plan.qkv), ("o", plan.o), ("gate_up", plan.gate_up), ("down", plan.down))
    elif getattr(adapter, "_proj", None):
        yield from adapter._proj[i].items()


def _projections(adapter: Adapter):
    """(name, projection object) of every projection an adapter built (to report which kernel runs them)."""
    for i in range(adapter.num_layers):
        yield from _layer_projections(adapter, i)


# The parts of a fused projection, in the order they are stacked (models/adapters.py, models/gemma3.py).
_PARTS = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def _kquant_types(projs) -> str:
    """"Q5_0 (81 tensors: q, k, v, gate, up), Q4_K (27: o, down), ...": each block type the K-quant
    kernels run, with how many tensors and which projections are stored in it, most tensors first."""
    found: dict[str, list[str]] = {}  # block type -> the part name of each tensor
    for name, m in projs:
        if isinstance(m, QuantLinear):
            for part, kind in zip(_PARTS.get(name, (name,)), m.types, strict=True):
                found.setdefault(kind, []).append(part)
    ranked = sorted(found.items(), key=lambda kv: -len(kv[1]))
    return ", ".join(f"{kind} ({len(parts)}{' tensors' if i == 0 else ''}: {', '.join(dict.fromkeys(parts))})"
                     for i, (kind, parts) in enumerate(ranked))

"""A preallocated, position-indexed KV cache (the gpt-fast design) with per-layer fill lengths.

Slot j of every layer holds the key/value of the token at position j. Three things follow:
- Writing is an index_put at the tokens' positions; nothing is ever concatenated or reallocated.
- Rollback after a rejected draft is just a smaller length: stale slots beyond it are masked out by
  the causal rule "a query at position p attends to slots j <= p", and are overwritten before any
  later query can see them (a token at position p writes slot p before it attends).
- Rows of a batch may have different lengths: each row's queries carry their own positions.

Per-layer lengths exist because self-speculation fills the layers below the exit further than the
layers above it while drafting. `hidden` optionally keeps the hidden states entering layer
`hidden_layer` (the exit layer's output), so that verification can resume at that layer for the
drafted tokens instead of recomputing them from the bottom (the LayerSkip trick).

Keys and values are stored in `dtype`: the model's, or fp16 under the fused int4 stack
(`LayeredModel(kv_dtype=...)`, `exitspec.load(kv_cache="float16")`); the kept hidden states stay in
the activations' dtype (`hidden_dtype`), since verification resumes from them.

`head_cache` optionally holds one more layer: the keys / values of an exit head that is itself a
decoder layer (heads/block.py), over the hidden states entering `hidden_layer`. It lives beside the
model's layers (whose count the fused C++ stack checks) and follows every rollback and reorder.
"""

from __future__ import annotations

import torch

# Physical slots are allocated in multiples of this, and every call attends to a multiple of it
# (slots past a query's position are masked). SDPA's CPU kernel gives a query different low bits
# depending on how many key slots the call covers, even masked ones, unless that count is a multiple
# of its vector width; with 16 it depends only on which 16-slot block the position falls in, so a
# row gets bit-identical results in a 1-row and a k-row call (see models/ops.py and
# runtime/profile.row_invariance). Costs at most 15 masked slots of attention per call.
SLOT_ALIGN = 16


def aligned(n: int) -> int:
    """n rounded up to a multiple of SLOT_ALIGN."""
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


class CacheFullError(RuntimeError):
    """The cache has no room for the tokens to be written."""


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        hidden_layer: int | None = None,
        hidden_size: int | None = None,
        hidden_dtype: torch.dtype | None = None,
        head_cache: KVCache | None = None,
    ):
        shape = (num_layers, batch, num_kv_heads, aligned(max_len), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (n_layer, B, Hkv, L, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # lengths[l, b]: how many leading positions of row b are valid in layer l.
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.long)
        self.max_len = max_len
        self.hidden_layer = hidden_layer
        self.hidden: torch.Tensor | None = None
        self.head_cache = head_cache
        if hidden_layer is not None:
            if hidden_size is None:
                raise ValueError("hidden_size is needed to keep hidden states")
            # (B, L, C); kept in the activations' dtype (`hidden_dtype`) even when k / v are narrower
            self.hidden = torch.zeros(batch, max_len, hidden_size, dtype=hidden_dtype or dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def check_room(self, end_positions: torch.Tensor) -> None:
        """Raise if any row would write past the preallocated length."""
        need = int(end_positions.max())
        if need > self.max_len:
            raise CacheFullError(
                f"KV cache holds {self.max_len} positions but {need} are needed; "
                "raise max_len (prompt length + max_new_tokens + draft length)"
            )

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def mark_filled(self, start: int, stop: int, end_positions: torch.Tensor) -> None:
        """Layers start..stop-1 now hold rows up to `end_positions` (B,) (exclusive)."""
        self.lengths[start:stop] = end_positions.to(self.lengths.device)

    def rollback(self, lengths: torch.Tensor | int, layers: slice = slice(None)) -> None:
        """Truncate rows to at most `lengths` (int or (B,)) in the given layers. O(1): no data moves."""
        cur = self.lengths[layers]
        new = torch.as_tensor(lengths, dtype=torch.long).expand_as(cur)
        self.lengths[layers] = torch.minimum(cur, new)
        if self.head_cache is not None:  # the exit head's layer reads positions the model's layers roll back
            self.head_cache.rollback(lengths)

    def keep_path(self, roots: list[int], paths: list[list[int]]) -> None:
        """After a token tree's verification (decoding/token_tree.py): move each row's accepted path into
        sequence order. Row b's tree token paths[b][k] (slot roots[b] + paths[b][k]) goes to slot
        roots[b] + k in every layer, with its kept hidden state and its exit head's keys / values, so
        the row reads as if the path had been decoded one token at a time. A path is increasing from
        the root (paths[b][0] == 0; a parent precedes its children), so a token only moves down, and a
        prefix already in place (a first branch accepted) moves nothing. Lengths are the caller's
        (rollback to roots + len(path))."""
        for b, (root, path) in enumerate(zip(roots, paths, strict=True)):
            first = next((k for k, i in enumerate(path) if i != k), len(path))
            if first == len(path):
                continue
            dst = torch.arange(root + first, root + len(path), device=self.k.device)
            src = torch.tensor([root + i for i in path[first:]], device=self.k.device)
            for t in (self.k, self.v):  # (n_layer, B, Hkv, L, D): index_select copies before index_copy_ writes
                t[:, b].index_copy_(2, dst, t[:, b].index_select(2, src))
            if self.hidden is not None:  # (B, L, C)
                self.hidden[b].index_copy_(0, dst, self.hidden[b].index_select(0, src))
        if self.head_cache is not None:
            self.head_cache.keep_path(roots, paths)

    def keep_hidden(self, h: torch.Tensor, positions: torch.Tensor) -> None:
        """Store hidden states h (B, T, C) of `hidden_layer` at their positions (B, T)."""
        assert self.hidden is not None
        rows = torch.arange(h.shape[0], device=h.device)[:, None]
        self.hidden[rows, positions] = h

    def reorder(self, rows: torch.Tensor, max_len: int | None = None) -> None:
        """Keep only the given batch rows (e.g. drop finished sequences); `max_len` also shortens
        every row to that many positions (when the rows left need no more: less memory)."""
        if max_len is not None and max_len < self.max_len:
            n = aligned(max_len)
            self.k, self.v = self.k[:, :, :, :n], self.v[:, :, :, :n]
            if self.hidden is not None:
                self.hidden = self.hidden[:, :max_len]
            self.max_len = max_len
        # Indexing copies: the kept rows come out contiguous (the fused kernels need that).
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()
        self.lengths = self.lengths[:, rows.cpu()]
        if self.hidden is not None:
            self.hidden = self.hidden[rows].contiguous()
        if self.head_cache is not None:
            self.head_cache.reorder(rows, max_len)

    def append(self, other: KVCache) -> None:
        """Add `other`'s rows after this cache's (continuous batching: newly prefilled rows join a
        running batch). Both must keep the same layers; the longer position count wins and the
        shorter cache's rows get zero slots past their end (never attended: kv_cache's rule above)."""
        if (other.num_layers, other.k.shape[2], other.k.shape[4], other.hidden_layer) != (
                self.num_layers, self.k.shape[2], self.k.shape[4], self.hidden_layer) or \
                (other.head_cache is None) != (self.head_cache is None):
            raise ValueError("only a cache of the same layout can be appended")
        n = max(self.max_len, other.max_len)
        slots = aligned(n)
        self.k = torch.cat([_pad(self.k, 3, slots), _pad(other.k, 3, slots)], 1)  # (n_layer, B1+B2, Hkv, L, D)
        self.v = torch.cat([_pad(self.v, 3, slots), _pad(other.v, 3, slots)], 1)
        self.lengths = torch.cat([self.lengths, other.lengths], 1)
        if self.hidden is not None:
            self.hidden = torch.cat([_pad(self.hidden, 1, n), _pad(other.hidden, 1, n)], 0)  # (B1+B2, L, C)
        if self.head_cache is not None:
            self.head_cache.append(other.head_cache)
        self.max_len = n


def _pad(t: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """t with dimension `dim` zero-padded at its end to n entries."""
    if t.shape[dim] == n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)

"""A draft datastore: n-gram continuations from the model's own earlier answers (REST-style).

Prompt lookup (lookup.py) copies from the row's own context, which helps only where the output
repeats it. The self-distillation data that trained the exit heads is a second source: the base
model's greedy answers to ~1,800 training prompts, i.e. the phrases *this* model habitually
produces ("Here is a Python function that", "```python\\ndef", "Step 1:"). The store maps every
n-gram of those answers to the continuation that most often followed it (He et al. 2023, REST:
retrieval-based speculative decoding, with the model's own text as the datastore).

A proposal is only a draft: the full model verifies it, so a wrong or even hash-collided proposal
costs a wasted row in the verification pass, never a wrong token.

Layout (numpy, built once per corpus):
  stream     (T,) int64   the sequences concatenated, -1 between them
  keys[n]    (M_n,) int64 sorted hashes of the n-grams that have a continuation
  starts[n]  (M_n,) int64 where in `stream` the chosen continuation of each n-gram starts
The hash of an n-gram is sum(tok_i * base^i) with base = vocab size, in int64 arithmetic: exact
while base^n < 2^63 (4-grams of a vocabulary below 2^15.75 ~ 55k tokens), a wrapped hash beyond.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

SIG = 3  # the continuation is chosen by its first SIG tokens: the most frequent such prefix wins


class NgramStore:
    def __init__(self, stream: np.ndarray, vocab_size: int, min_n: int = 2, max_n: int = 4):
        """stream: token ids with -1 after each sequence, the layout a head bundle stores its corpus in."""
        if not 1 <= min_n <= max_n <= 8:
            raise ValueError(f"need 1 <= min_n ({min_n}) <= max_n ({max_n}) <= 8")
        self.base = int(vocab_size) + 1  # +1: the separator -1 hashes as its own symbol
        self.ns = range(max_n, min_n - 1, -1)  # longest first: a longer match predicts better
        self.stream = np.asarray(stream, dtype=np.int64)
        if len(self.stream) and (self.stream.min() < -1 or self.stream.max() >= vocab_size):
            # A proposal is fed to the embedding: an id outside the vocabulary would crash decoding.
            raise ValueError(f"draft corpus token ids must be in 0..{vocab_size - 1}")
        self.tokens = int((self.stream >= 0).sum())
        self.keys: dict[int, np.ndarray] = {}
        self.starts: dict[int, np.ndarray] = {}
        for n in self.ns:
            self.keys[n], self.starts[n] = self._index(n)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], vocab_size: int, min_n: int = 2,
                       max_n: int = 4) -> NgramStore:
        stream = [t for seq in sequences for t in [*seq, -1]]
        return cls(np.array(stream, dtype=np.int64), vocab_size, min_n, max_n)

    def _hash(self, windows: np.ndarray) -> np.ndarray:
        """(..., n) tokens -> (...) int64 hash (wrapping multiply-add; separators hash as base - 1)."""
        w = np.where(windows < 0, self.base - 1, windows)
        h = np.zeros(w.shape[:-1], dtype=np.int64)
        with np.errstate(over="ignore"):
            for i in range(w.shape[-1]):
                h = h * np.int64(self.base) + w[..., i]
        return h

    def _hash_one(self, gram: Sequence[int]) -> int:
        """`_hash` of one n-gram in Python integers (no numpy call per lookup: for a few tokens its
        per-call overhead costs far more than the arithmetic), wrapped to int64 exactly as numpy's
        multiply-add wraps."""
        h = 0
        for t in gram:
            h = (h * self.base + (self.base - 1 if t < 0 else t) + 2**63) % 2**64 - 2**63
        return h

    def _index(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.stream
        T = len(s)
        if n >= T:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        j = np.arange(n, T)  # continuation start: the n-gram is s[j-n:j], the first copied token s[j]
        win = np.lib.stride_tricks.sliding_window_view(s, n)[: T - n]  # (T-n, n): row i = s[i:i+n] = s[j-n:j]
        ok = (win >= 0).all(1) & (s[j] >= 0)  # no separator inside the n-gram, a real next token
        j, win = j[ok], win[ok]
        if len(j) == 0:  # no sequence is long enough for an n-gram with a continuation
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pad = np.concatenate([s, np.full(SIG, -1, np.int64)])
        sig = self._hash(np.lib.stride_tricks.sliding_window_view(pad, SIG)[j])  # continuation prefix
        key = self._hash(win)
        # For each key, the continuation prefix seen most often (ties: the earliest occurrence).
        order = np.lexsort((j, sig, key))  # by key, then sig, then position
        key, sig, j = key[order], sig[order], j[order]
        new_group = np.r_[True, (key[1:] != key[:-1]) | (sig[1:] != sig[:-1])]
        g_start = np.flatnonzero(new_group)
        g_count = np.diff(np.r_[g_start, len(key)])
        g_key = key[g_start]
        best = np.lexsort((j[g_start], -g_count, g_key))  # by key, most frequent first, then earliest
        first = np.r_[True, g_key[best][1:] != g_key[best][:-1]]
        pick = g_start[best][first]
        return key[pick], j[pick]

    def propose(self, ctx: Sequence[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens that most often followed ctx's longest suffix seen in the store, and that
        suffix's length ([], 0 if none)."""
        return next(self.propose_each(ctx, k), ([], 0))

    def propose_each(self, ctx: Sequence[int], k: int) -> Iterator[tuple[list[int], int]]:
        """`propose`'s answer for every suffix length that matches, longest first: (tokens, n). A token
        tree (decoding/strategies/tree_lookup.py) verifies the continuations of several at once."""
        for n in self.ns:
            if len(ctx) < n:
                continue
            keys = self.keys[n]
            h = self._hash_one(ctx[-n:])
            i = int(np.searchsorted(keys, h))
            if i < len(keys) and keys[i] == h:
                start = int(self.starts[n][i])
                out = self.stream[start:start + k]
                end = np.flatnonzero(out < 0)
                yield out[: end[0] if len(end) else len(out)].tolist(), n

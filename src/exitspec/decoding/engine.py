"""The decode engine: continuous (iteration-level) batching of one strategy over one KV cache.

Rows come and go while the batch runs. `add()` queues a tokenised prompt with its own settings
(max_new_tokens, temperature / top_p / seed, stop strings, EOS rule); every `step()` then

  1. drops cancelled rows at once (their cache rows are freed, the strategy forgets them);
  2. admits waiting rows into a prefill group when the batch has room (`max_rows`), as many as
     one prefill chunk holds, so that a burst of requests starts streaming group by group;
  3. runs one chunk of that group's prefill (`prefill_tokens` positions over the group, so a long
     prompt does not stall the running rows for more than a chunk), and when the group's prompts
     are all in its own cache, appends the group to the running batch (KVCache.append);
  4. runs ONE strategy step over every running row, streams each row's new tokens and text,
     applies its stop rules, and drops the rows that finished.

It is the one decode loop: `decode()` (driver.py: the CLI, the Python API, benchmarks) adds its
prompts and steps the engine until it is empty; the server's scheduler keeps engines running and
adds requests as they arrive. Both consume the same events (events.py).

Why a group is prefilled in its own cache and then appended, rather than into free rows of the
running cache: the fused C++ stack runs every row of the cache it is given, so the running cache
must hold exactly the running rows. A join and a leave each copy the cache once (O(rows x positions)),
which on the default model is about one decode step per event.

Why the result does not depend on who shares the batch: every kernel is row-invariant (a row's
logits are the same in a 1-row and a k-row call; see models/ops.py and runtime/kv_cache.py), each
row attends only to its own positions, and each row samples from its own generator (sampling.py's
RowSampling). So a greedy row gives exactly its solo output, and so does a seeded sampled row under
vanilla, lookup and self-spec (dssd's and cascade's drafting draws depend on the batch).

Not thread-safe: one thread owns an engine (the server's decode worker).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from exitspec.decoding.config import GenerateConfig, GenerationError, eos_ids_for
from exitspec.decoding.events import Event, FinishEvent, RowStats, TokenEvent
from exitspec.decoding.sampling import RowSampling
from exitspec.decoding.strategy import DecodeState, Strategy
from exitspec.decoding.text import RowText
from exitspec.runtime.clock import now
from exitspec.runtime.kv_cache import KVCache
from exitspec.runtime.layered import LayeredModel


class _Row:
    """One request's row: its settings, what it generated, its text stream and statistics."""

    def __init__(self, row_id: int, prompt: list[int], config: GenerateConfig, eos: set[int],
                 generator: torch.Generator | None, need: int, tokenizer):
        self.id, self.prompt, self.config, self.eos, self.generator = row_id, prompt, config, eos, generator
        self.need = need  # cache positions: prompt + max_new_tokens + the strategy's extra + 1
        self.seq = list(prompt)  # prompt + generated; the last token is pending (strategy.py)
        self.generated: list[int] = []
        self.text = RowText(tokenizer, config.stop)
        self.stats = RowStats()


@dataclass
class _Prefill:
    """A group of admitted rows whose prompts run into their own cache, a chunk per engine step."""

    rows: list[_Row]
    cache: KVCache
    total: int  # positions to run: the longest prompt but its last (pending) token
    done: int = 0


def prefill_positions(lm: LayeredModel, cache: KVCache, seqs: list[list[int]], start: int, stop: int) -> None:
    """Run positions start..stop-1 of every row's prompt but its last (pending) token through all
    layers, ragged rows padded; afterwards row b's cache holds min(len(seqs[b]) - 1, stop) positions."""
    lens = [len(s) - 1 for s in seqs]
    T = stop - start
    if T <= 0:
        return
    # Pads take the positions after a row's real tokens: they write cache slots that the row's
    # later tokens overwrite before any query can attend to them (see runtime/kv_cache.py).
    ids = torch.tensor([[s[p] if p < n else s[0] for p in range(start, stop)] for s, n in zip(seqs, lens, strict=True)],
                       device=lm.device)  # (B, T)
    pos = torch.arange(start, stop, device=lm.device).expand(len(seqs), T).contiguous()  # (B, T)
    with torch.inference_mode():
        h = lm.embed(ids, pos)
        if cache.hidden is not None:  # keep the prompt's states at that layer too (an exit head may read them)
            h = lm.run_layers(h, pos, cache, 0, cache.hidden_layer)
            cache.keep_hidden(h, pos)
            lm.run_layers(h, pos, cache, cache.hidden_layer, lm.num_layers)
        else:
            lm.run_layers(h, pos, cache, 0, lm.num_layers)
    cache.lengths[:] = torch.tensor([min(n, stop) for n in lens])


class Engine:
    def __init__(self, lm: LayeredModel, tokenizer, strategy: Strategy, *, heads: object | None = None,
                 max_rows: int = 32, prefill_tokens: int | None = None):
        """`max_rows`: most rows decoded together (running + prefilling). `prefill_tokens`: positions
        one prefill chunk may run over its whole group (None: a group's prompts in one call)."""
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        self.lm, self.tokenizer, self.strategy, self.heads = lm, tokenizer, strategy, heads
        self.max_rows, self.prefill_tokens = max_rows, prefill_tokens
        self.default_eos = set(eos_ids_for(lm.model, tokenizer))
        self.waiting: deque[_Row] = deque()
        self.prefill: _Prefill | None = None
        self.rows: list[_Row] = []  # running rows, in the order of the batch (state.seqs, cache rows)
        self.state: DecodeState | None = None
        self._cancelled: set[int] = set()
        self._next_id = 0
        self.prefill_s = 0.0  # time spent in prefill chunks
        self.steps = 0  # strategy steps run
        self.last_batch = 0  # rows in the last strategy step

    # --- what callers see ---------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefill or self.rows)

    @property
    def size(self) -> int:
        """Rows holding a cache row or waiting for one."""
        return len(self.waiting) + (len(self.prefill.rows) if self.prefill else 0) + len(self.rows)

    def need(self, prompt_len: int, max_new_tokens: int) -> int:
        """Cache positions a row needs (prompt + completion + the strategy's drafts + 1)."""
        return prompt_len + max_new_tokens + self.strategy.extra_positions() + 1

    def add(self, prompt: list[int], config: GenerateConfig, generator: torch.Generator | None = None) -> int:
        """Queue a tokenised prompt; returns its row id (the `row` of its events). `generator`: the
        row's random source (default: one seeded from config.sampling.seed); rows given the same
        generator object and settings sample as one batch (what generate() does with a batch)."""
        config.validate()
        if not prompt:
            raise GenerationError("every prompt must have at least one token")
        need = self.need(len(prompt), config.max_new_tokens)
        if need > self.lm.max_positions:
            extra = self.strategy.extra_positions()  # drafts are written past the last token before rollback
            drafts = f" + {self.strategy.name}'s {extra} draft positions" if extra else ""
            raise GenerationError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({config.max_new_tokens}){drafts} exceeds the "
                f"model's context of {self.lm.max_positions} positions; shorten the prompt or lower max_new_tokens"
                + (" or the draft length" if extra else "")
            )
        if generator is None and not config.sampling.greedy:
            generator = config.sampling.generator(self.lm.device)
        eos = set() if config.ignore_eos else set(config.eos_token_ids or self.default_eos)
        row = _Row(self._next_id, list(prompt), config, eos, generator, need, self.tokenizer)
        self._next_id += 1
        self.waiting.append(row)
        return row.id

    def cancel(self, row_id: int) -> None:
        """Drop a row at the next step (its FinishEvent then says "cancelled")."""
        self._cancelled.add(row_id)

    def step(self) -> list[Event]:
        """One iteration: drop cancelled rows, admit and prefill (a chunk), one strategy step."""
        events: list[Event] = []
        if self._cancelled:
            self._drop_cancelled(events)
        if self.prefill is None and self.waiting:
            self._admit()
        if self.prefill is not None:
            self._prefill_chunk(events)
        if self.rows:
            self._decode(events)
        return events

    # --- rows joining -------------------------------------------------------------------------------
    def _admit(self) -> None:
        if self.rows and not self.strategy.joinable:
            return  # this strategy's batch runs to its end first
        room = self.max_rows - len(self.rows)
        if room <= 0:
            return
        # A group takes the waiting rows whose prompts fit one prefill chunk (at least one row): a
        # burst of requests then streams out group by group, each joining the running batch as soon
        # as its prompts are in, instead of every row of the burst waiting for the whole burst's
        # prefill (time to first token: the first rows' own prefill, not everyone's). A strategy
        # whose rows cannot join a running batch takes every waiting row at once.
        group, budget = [], self.prefill_tokens if self.strategy.joinable else None
        while self.waiting and len(group) < room:
            if group and budget is not None and budget < len(self.waiting[0].prompt):
                break
            row = self.waiting.popleft()
            group.append(row)
            if budget is not None:
                budget -= len(row.prompt)
        s = self.strategy
        cache = self.lm.new_cache(len(group), max(r.need for r in group), hidden_layer=s.keep_hidden_layer(),
                                  head_cache=s.head_cache_dtype())
        self.prefill = _Prefill(group, cache, total=max(len(r.prompt) for r in group) - 1)

    def _prefill_chunk(self, events: list[Event]) -> None:
        pf = self.prefill
        if pf.done < pf.total:
            chunk = pf.total - pf.done if self.prefill_tokens is None else max(1, self.prefill_tokens // len(pf.rows))
            stop = min(pf.total, pf.done + chunk)
            t0 = now(self.lm.device)
            prefill_positions(self.lm, pf.cache, [r.prompt for r in pf.rows], pf.done, stop)
            self.prefill_s += now(self.lm.device) - t0
            pf.done = stop
        if pf.done >= pf.total:
            self.prefill = None
            self._join(pf, events)

    def _join(self, pf: _Prefill, events: list[Event]) -> None:
        keep = [i for i, r in enumerate(pf.rows) if r.id not in self._cancelled]
        for r in pf.rows:
            if r.id in self._cancelled:
                self._finish(r, "cancelled", events)
        if not keep:
            return
        if len(keep) < len(pf.rows):
            pf.cache.reorder(torch.tensor(keep, device=self.lm.device))
        rows = [pf.rows[i] for i in keep]
        sampling = RowSampling([r.config.sampling for r in rows], [r.generator for r in rows])
        if not self.rows:
            self.rows = rows
            self.state = DecodeState(lm=self.lm, cache=pf.cache, seqs=[r.seq for r in rows], sampling=sampling,
                                     heads=self.heads)
            self.strategy.prepare(self.state)
            return
        st = self.state
        st.cache.append(pf.cache)
        st.seqs += [r.seq for r in rows]
        st.sampling.extend(sampling)
        self.rows += rows
        self.strategy.add_rows(st, len(rows))

    # --- rows leaving -------------------------------------------------------------------------------
    def _drop_cancelled(self, events: list[Event]) -> None:
        gone = self._cancelled
        for r in [r for r in self.waiting if r.id in gone]:
            self.waiting.remove(r)
            self._finish(r, "cancelled", events)
            gone.discard(r.id)
        keep = [j for j, r in enumerate(self.rows) if r.id not in gone]
        if len(keep) < len(self.rows):
            for r in self.rows:
                if r.id in gone:
                    self._finish(r, "cancelled", events)
                    gone.discard(r.id)
            self._keep(keep)
        pending = {r.id for r in self.prefill.rows} if self.prefill else set()
        gone &= pending  # ids of rows that already left are forgotten; a prefilling row leaves when it joins

    def _keep(self, keep: list[int]) -> None:
        """Only the running rows at batch indices `keep` stay."""
        if not keep:
            self.rows, self.state = [], None  # the cache goes with the state
            return
        st = self.state
        self.rows = [self.rows[j] for j in keep]
        st.cache.reorder(torch.tensor(keep, device=self.lm.device), max_len=max(r.need for r in self.rows))
        st.seqs = [r.seq for r in self.rows]
        st.sampling.select(keep)
        self.strategy.select_rows(keep)

    def _finish(self, r: _Row, reason: str, events: list[Event], text: str | None = None) -> None:
        if text is None:
            text = r.text.text(r.generated) if r.generated else ""
        events.append(FinishEvent(row=r.id, reason=reason, token_ids=list(r.generated), text=text, stats=r.stats))

    # --- the step -----------------------------------------------------------------------------------
    def _decode(self, events: list[Event]) -> None:
        # The step's time outside the model's forwards is its host work (ForwardClock), kept per row.
        t0, forward0 = time.perf_counter(), self.lm.clock.seconds
        stepped = list(self.rows)
        with torch.inference_mode():
            out = self.strategy.step(self.state)
        self.steps += 1
        self.last_batch = B = len(self.rows)
        keep: list[int] = []
        for j, r in enumerate(self.rows):
            rs, cfg = r.stats, r.config
            rs.steps += 1
            rs.batch_peak = max(rs.batch_peak, B)
            rs.layers_computed += out.layers_computed[j]
            if out.drafted is not None:
                rs.drafted += out.drafted[j]
                rs.accepted += out.accepted[j]
                rs.accept_lengths.append(out.accepted[j])
                rs.draft_lengths.append(out.drafted[j])
            if "sources" in out.extra:
                rs.cycle_sources.append(out.extra["sources"][j])
            new, layers, reason = [], [], ""
            for tok, layer in zip(out.tokens[j], out.exit_layers[j], strict=True):
                new.append(tok)
                layers.append(layer)
                if tok in r.eos:
                    reason = "eos"
                    break
                if len(r.generated) + len(new) >= cfg.max_new_tokens:
                    reason = "length"
                    break
            r.generated.extend(new)
            r.seq.extend(new)
            rs.new_tokens += len(new)
            rs.exit_layers.update(layers)
            text = r.text.text(r.generated)
            cut = r.text.find_stop(text) if cfg.stop else None
            if cut is not None:
                text, reason = text[:cut], "stop"
            delta = r.text.delta(text, final=bool(reason))
            events.append(TokenEvent(row=r.id, token_ids=new, text=delta, exit_layers=layers))
            if reason:
                self._finish(r, reason, events, text)
            else:
                keep.append(j)
        host = time.perf_counter() - t0 - (self.lm.clock.seconds - forward0)
        for r in stepped:  # finished rows' stats too: their FinishEvents hold the same objects
            r.stats.host_s += host
        if len(keep) < B:
            self._keep(keep)

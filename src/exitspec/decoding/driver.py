"""The decode driver: prefill, run a strategy step by step, stop rules, streaming text, stats.

One loop for every strategy, so stopping, detokenisation and statistics behave identically
whichever strategy produced the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from exitspec.decoding.events import DoneEvent, Event, FinishEvent, GenerationStats, RowStats, TokenEvent
from exitspec.decoding.sampling import SamplingParams
from exitspec.decoding.strategy import DecodeState, Strategy
from exitspec.runtime.clock import now
from exitspec.runtime.layered import LayeredModel


class GenerationError(ValueError):
    """Impossible generation settings or input; the message says what to change."""


@dataclass
class GenerateConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    eos_token_ids: list[int] | None = None  # None: the tokenizer's / model's EOS ids
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")


def eos_ids_for(model, tokenizer) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in [src] if isinstance(src, int) else src:
            if i not in ids:
                ids.append(int(i))
    return ids


class _RowText:
    """Incremental detokenisation with hold-back for stop strings and incomplete characters.

    Decoding the whole answer after every step costs O(length) per step, O(length^2) per answer.
    Instead, as in vLLM's detokenizer, only the tokens since the last complete point are
    decoded, together with the chunk before it for context (so a SentencePiece word-start space or a
    byte-level character split over tokens comes out as in a full decode); the new text is what that
    decode adds to the context's. Tokenizers that rewrite spaces across tokens while decoding
    (`clean_up_tokenization_spaces`) keep the full decode."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters already emitted
        self.incremental = not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self.done = ""  # text of ids[:read]
        self.prefix = self.read = 0  # ids[prefix:read]: the context re-decoded with the new tokens

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, ids: list[int]) -> str:
        """The text of `ids` (the row's generated tokens so far, a growing list)."""
        if not self.incremental:
            return self._decode(ids)
        before = self._decode(ids[self.prefix:self.read])
        now = self._decode(ids[self.prefix:])
        if not now.startswith(before):  # the context decodes differently with what follows: start over
            self.done, self.prefix, self.read = self._decode(ids), self.read, len(ids)
            return self.done
        text = self.done + now[len(before):]
        if not now.endswith("\ufffd"):  # a complete point: later steps decode from here
            self.done, self.prefix, self.read = text, self.read, len(ids)
        return text

    def find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def delta(self, text: str, final: bool) -> str:
        end = len(text) if final else max(self.sent, len(text) - self.hold)
        if not final and text[self.sent:end].endswith("\ufffd"):
            return ""  # a multi-byte character is not complete yet
        out = text[self.sent:end]
        self.sent = end
        return out


def prefill(lm: LayeredModel, state: DecodeState) -> None:
    """Run every prompt token but the last (pending) one through all layers, ragged rows padded."""
    lens = [len(s) - 1 for s in state.seqs]
    T = max(lens)
    if T == 0:
        return
    # Pads take the positions after a row's real tokens: they write cache slots that the row's
    # later tokens overwrite before any query can attend to them (see runtime/kv_cache.py).
    ids = torch.tensor([s[:n] + [s[0]] * (T - n) for s, n in zip(state.seqs, lens, strict=True)],
                       device=lm.device)
    pos = torch.arange(T, device=lm.device).expand(len(lens), T).contiguous()
    cache = state.cache
    with torch.inference_mode():
        h = lm.embed(ids, pos)
        if cache.hidden is not None:  # keep the prompt's states at that layer too (an exit head may read them)
            h = lm.run_layers(h, pos, cache, 0, cache.hidden_layer)
            cache.keep_hidden(h, pos)
            lm.run_layers(h, pos, cache, cache.hidden_layer, lm.num_layers)
        else:
            lm.run_layers(h, pos, cache, 0, lm.num_layers)
    cache.lengths[:] = torch.tensor(lens)


def decode(
    lm: LayeredModel,
    tokenizer,
    prompts: list[list[int]],
    strategy: Strategy,
    config: GenerateConfig,
    heads: object | None = None,
) -> Iterator[Event]:
    """Generate for a batch of tokenised prompts, yielding events (see decoding/events.py)."""
    config.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt must have at least one token")
    longest = max(len(p) for p in prompts)
    max_len = longest + config.max_new_tokens + strategy.extra_positions() + 1
    if max_len > lm.max_positions:
        raise GenerationError(
            f"prompt ({longest} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the model's "
            f"context of {lm.max_positions} positions; shorten the prompt or lower max_new_tokens"
        )
    eos = set() if config.ignore_eos else set(config.eos_token_ids or eos_ids_for(lm.model, tokenizer))
    B = len(prompts)
    stats = GenerationStats(strategy=strategy.name, num_layers=lm.num_layers, batch=B,
                            prompt_tokens=sum(len(p) for p in prompts), rows=[RowStats() for _ in prompts])
    t0 = now(lm.device)
    cache = lm.new_cache(B, max_len, hidden_layer=strategy.keep_hidden_layer(), head_cache=strategy.head_cache_dtype())
    state = DecodeState(lm=lm, cache=cache, seqs=[list(p) for p in prompts], params=config.sampling,
                        generator=config.sampling.generator(lm.device) if not config.sampling.greedy else None,
                        heads=heads)
    prefill(lm, state)
    stats.prefill_s = now(lm.device) - t0
    strategy.prepare(state)

    active = list(range(B))  # original row index of each active batch row
    generated: list[list[int]] = [[] for _ in prompts]
    texts = [_RowText(tokenizer, config.stop) for _ in prompts]
    final_text = [""] * B
    reasons = [""] * B
    first_token_at = None
    with torch.inference_mode():
        while active:
            out = strategy.step(state)
            if first_token_at is None:
                first_token_at = now(lm.device)
            keep: list[int] = []
            for j, row in enumerate(active):
                rs = stats.rows[row]
                rs.steps += 1
                rs.layers_computed += out.layers_computed[j]
                if out.drafted is not None:
                    rs.drafted += out.drafted[j]
                    rs.accepted += out.accepted[j]
                    rs.accept_lengths.append(out.accepted[j])
                new, layers, reason = [], [], ""
                for tok, layer in zip(out.tokens[j], out.exit_layers[j], strict=True):
                    new.append(tok)
                    layers.append(layer)
                    if tok in eos:
                        reason = "eos"
                        break
                    if len(generated[row]) + len(new) >= config.max_new_tokens:
                        reason = "length"
                        break
                generated[row].extend(new)
                state.seqs[j].extend(new)
                rs.new_tokens += len(new)
                rs.exit_layers.update(layers)
                text = texts[row].text(generated[row])
                cut = texts[row].find_stop(text) if config.stop else None
                if cut is not None:
                    text, reason = text[:cut], "stop"
                delta = texts[row].delta(text, final=bool(reason))
                yield TokenEvent(row=row, token_ids=new, text=delta, exit_layers=layers)
                if reason:
                    final_text[row], reasons[row] = text, reason
                    yield FinishEvent(row=row, reason=reason, token_ids=list(generated[row]), text=text)
                else:
                    keep.append(j)
            if len(keep) < len(active):
                active = [active[j] for j in keep]
                state.seqs = [state.seqs[j] for j in keep]
                if keep:
                    rows = torch.tensor(keep, device=lm.device)
                    state.cache.reorder(rows)
                    strategy.select_rows(keep)
    end = now(lm.device)
    stats.new_tokens = sum(len(g) for g in generated)
    stats.time_to_first_token_s = (first_token_at or end) - t0
    stats.decode_s = end - t0 - stats.prefill_s
    stats.total_s = end - t0
    yield DoneEvent(stats=stats, texts=final_text, token_ids=generated, finish_reasons=reasons)

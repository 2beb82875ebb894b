"""A contender: anything the benchmark can time on one prompt — an exitspec strategy or a peer.

Every contender returns the same `Sample`, so the runner, metrics and audit never care which
library produced the tokens. exitspec strategies come from the registry
(`exitspec.decoding.api.make_strategy`), so strategies added later are benchmarked without changes
here; peers (HF generate, HF early exit, HF prompt lookup, economize) live in bench/peers.py, and
bench/runner.make_contender picks one for a run spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from exitspec.bench.config import RunSpec
from exitspec.decoding.api import generate, make_strategy


@dataclass
class Sample:
    """One timed generation of one prompt."""

    tokens: list[int]  # generated ids (prompt excluded)
    total_s: float  # wall time from the call to the last token (prefill included)
    ttft_s: float | None = None  # time to the first generated token; None when the library hides it
    target_calls: int | None = None  # full-model forward calls (verifications), prefill's included
    drafted: int | None = None  # draft tokens proposed
    accept_lengths: list[int] | None = None  # accepted drafts per verification
    draft_lengths: list[int] | None = None  # drafts verified per verification (exitspec's own strategies)
    accept_lengths_exact: bool = True  # False: only their mean is known (HF peers), no histogram
    layers_computed: float | None = None  # decoder layers run, summed over tokens
    exit_hist: dict[int, int] = field(default_factory=dict)  # exit layer -> tokens
    gates: dict | None = None  # the strategy's gate work in LM-head rows (its cost_counts(); bench/costs.py)
    host_s: float | None = None  # its steps' time outside the model's forwards (exitspec's loop: RowStats.host_s)
    cycle_sources: list[str] | None = None  # per step, where its drafts came from (hybrid)


class PeerUnavailable(ValueError):
    """A peer that cannot run on this machine or model (no binary, no GGUF): the run is skipped with
    the reason, not failed."""


def spread_accepts(total: int, n: int) -> list[int] | None:
    """Per-verification accepted counts when only the total is known: n values summing to total
    (their mean is exact; their spread is not, so histograms skip contenders built this way)."""
    if n <= 0:
        return None
    q, r = divmod(total, n)
    return [q + 1] * r + [q] * (n - r)


class Contender:
    """Interface: `run(prompt_ids, max_new_tokens, temperature, seed) -> Sample`."""

    lossless: bool = False  # greedy output must equal vanilla's (checked by the audit)
    uses_heads: bool = False  # its drafts come from the attached exit heads (else the logit lens)

    def __init__(self, spec: RunSpec, model):
        self.spec = spec
        self.model = model

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Sample:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.spec.name, **self.spec.opts}


class ExitspecContender(Contender):
    """An exitspec strategy from the registry, run through the one decode driver."""

    def __init__(self, spec: RunSpec, model, factory=None):
        super().__init__(spec, model)
        # A factory lets tests inject a strategy object; normally the registry builds it.
        self.factory = factory or (lambda: make_strategy(spec.name, model, **spec.strategy_opts))
        try:
            probe = self.factory()
        except TypeError as err:
            raise ValueError(f"strategy {spec.name!r} rejected options {spec.strategy_opts}: {err}; check the [[run]] "
                             "options against the strategy's constructor") from err
        self.lossless = bool(getattr(probe, "lossless", False))
        self.uses_heads = model.heads is not None
        self.strategy_description = probe.describe()

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Sample:
        # A fresh strategy per prompt: strategies may keep per-generation state (adaptive drafts).
        strategy = self.factory()
        r = generate(self.model, None, prompt_ids=[ids], strategy=strategy, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed, ignore_eos=True)
        st, row = r.stats, r.stats.rows[0]
        speculative = row.drafted > 0 or bool(row.accept_lengths)
        counts = getattr(strategy, "cost_counts", None)
        return Sample(tokens=list(r.token_ids[0]), total_s=st.total_s, ttft_s=st.time_to_first_token_s,
                      target_calls=row.steps, drafted=row.drafted if speculative else None,
                      accept_lengths=list(row.accept_lengths) if speculative else None,
                      draft_lengths=list(row.draft_lengths) if speculative else None,
                      layers_computed=row.layers_computed, exit_hist=dict(row.exit_layers),
                      gates=counts() if counts else None, host_s=row.host_s,
                      cycle_sources=list(row.cycle_sources) or None)

    def describe(self) -> dict:
        return {**super().describe(), **self.strategy_description}

"""The cost model next to the measurement: what a speculative row should have given, and why not.

For a self-spec row the benchmark times the parts of one cycle on this machine and model, on a warm
cache at the run's typical context (decoding/spec_costs.cycle_costs: a vanilla step, a draft pass
with and without the exit head, one verification of gamma + 1 rows), and Leviathan et al.'s formula
turns the row's measured E[accepted] into a predicted speedup over vanilla decoding:

    predicted = vanilla step x (E[accepted] + 1) / cycle

For lookup, tree and hybrid rows a cycle is priced from two parts measured apart, over the row's own
verifications s (each with its own drafts and a_s accepted; the first left out, as the decode phase
leaves it out):

    cycle_s   = forward x cost_s  +  host
    predicted = sum(a_s + 1) / sum(cycle_s)   (tokens/s, over the vanilla loop's)

  forward  the vanilla loop's 1-row forward as run: its decode-phase step less its own host work per
           step (so both rows are priced against the same machine at the same moment);
  cost_s   that verification's forward in 1-row forwards, timed alone: lookup's K+1 rows on the
           runtime's row-cost curve (runtime/profile.row_costs), a tree's nodes on its position-cost
           table (position_costs, the table the tree sizes itself by), a hybrid head cycle's K+1 draft
           passes, K heads and verification (spec_costs.cycle_costs at K drafts, over its vanilla
           step timed alone), a hybrid lookup cycle as lookup's;
  host     the row's time per step outside the model's forwards, accounted by the engine around each
           step (RowStats.host_s, LayeredModel.clock): drafting, verification's argmax, rollback,
           detokenising. It is the row's own, but a part of its own: the forwards' share of its time
           is not read, it is predicted.

Measured: the decode phase's tokens over its time, against the vanilla loop of the same runtime and
temperature (prefill is no part of either). Where the two differ by more than 10%, the row says
which side moved: the cycle as run (decode time / verifications) against the predicted one, split
into its forwards and host work, so the report names the cause (a verification that costs more as
run than its curve says, host work, a cache longer than the timed context) instead of a bare gap.
"""

from __future__ import annotations

from dataclasses import dataclass

from exitspec.decoding.spec_costs import cycle_costs, expected_speedup
from exitspec.runtime.profile import interpolate_cost, position_costs, row_costs

TOLERANCE = 0.10
HEAD = "head"  # hybrid's cycle source of head drafts (decoding/strategies/hybrid.py)


@dataclass
class VanillaPace:
    """The vanilla loop's decode phase on one runtime and temperature: what other rows are priced against."""

    tokens_per_s: float  # decode-phase tokens/s
    host_ms: float  # per step, outside the model's forwards

    @property
    def step_ms(self) -> float:
        return 1000.0 / self.tokens_per_s

    @property
    def forward_ms(self) -> float:
        """The 1-row forward as run: the step less its host work."""
        return self.step_ms - self.host_ms


@dataclass
class Cycle:
    """One verification of a row after its first: drafts verified, drafts accepted, where they came from."""

    drafted: int
    accepted: int
    source: str = ""


def _first_step_tokens(r: dict) -> int:
    """Tokens the first step emitted: it ends the time to the first token (decoding/driver.py)."""
    lens = r.get("accept_lengths")
    return lens[0] + 1 if lens else 1


def _decode_seconds(per_prompt: list[dict]) -> float:
    return sum(r["time_s"] - (r["ttft_s"] or 0.0) for r in per_prompt)


def decode_tokens_per_s(per_prompt: list[dict]) -> float | None:
    """Tokens after the first step over the time after it, pooled over prompts."""
    tokens = sum(r["new_tokens"] - _first_step_tokens(r) for r in per_prompt)
    seconds = _decode_seconds(per_prompt)
    return tokens / seconds if seconds > 0 and tokens > 0 else None


def host_ms_per_step(per_prompt: list[dict]) -> float | None:
    """The rows' time outside the model's forwards per step (None where the runs did not account it)."""
    if any(r.get("host_s") is None or not r.get("steps") for r in per_prompt):
        return None
    return 1000.0 * sum(r["host_s"] for r in per_prompt) / sum(r["steps"] for r in per_prompt)


def vanilla_pace(per_prompt: list[dict]) -> VanillaPace | None:
    tps, host = decode_tokens_per_s(per_prompt), host_ms_per_step(per_prompt)
    return VanillaPace(tps, host) if tps and host is not None and host < 1000.0 / tps else None


def cycles(per_prompt: list[dict]) -> list[Cycle]:
    """Every prompt's verifications but its first, from the per-prompt records."""
    out = []
    for r in per_prompt:
        drafts, accepts = r.get("draft_lengths") or [], r.get("accept_lengths") or []
        sources = r.get("cycle_sources") or [""] * len(drafts)
        out += [Cycle(k, a, s) for k, a, s in list(zip(drafts, accepts, sources, strict=True))[1:]]
    return out


def self_spec_prediction(strategy, row: dict, per_prompt: list[dict], vanilla_decode_tps: float | None,
                         context: int, repeats: int = 10) -> dict:
    """Predicted vs measured decode speedup of a self-spec row (`strategy`: a SelfSpec as run)."""
    if row.get("mean_accepted") is None or not vanilla_decode_tps:
        return {}
    lm = strategy.drafter.head.lm
    costs = cycle_costs(lm, strategy.drafter, strategy.gamma, context=context, repeats=repeats)
    predicted = expected_speedup(costs, row["mean_accepted"])
    decode_tps = decode_tokens_per_s(per_prompt)
    out = {"predicted_speedup": predicted, "cycle_ms": costs["cycle_ms"], "vanilla_step_ms": costs["vanilla_step_ms"],
           "cost_context": context}
    if decode_tps is None:
        return out
    measured = decode_tps / vanilla_decode_tps
    out["measured_decode_speedup"] = measured
    if abs(measured / predicted - 1) > TOLERANCE:
        verifications = sum(max(0, (r["verifications"] or 0) - 1) for r in per_prompt)  # after the first step
        run_cycle = 1000 * _decode_seconds(per_prompt) / verifications if verifications else float("nan")
        out["prediction_note"] = (
            f"a cycle took {run_cycle:.1f} ms as run vs {costs['cycle_ms']:.1f} ms timed alone; a vanilla step "
            f"{1000 / vanilla_decode_tps:.1f} ms as run vs {costs['vanilla_step_ms']:.1f} ms timed alone "
            f"(context {context})")
    return out


def priceable_cycles(per_prompt: list[dict], vanilla: VanillaPace | None) -> list[Cycle]:
    """The row's verifications after its first (cycles), or none where the row cannot be priced: no
    vanilla pace to price it against, or host time the runs did not account."""
    if vanilla is None or host_ms_per_step(per_prompt) is None:
        return []
    return cycles(per_prompt)


def _priced(per_prompt: list[dict], steps: list[Cycle], costs: list[float], vanilla: VanillaPace,
            shape: str) -> dict:
    """Predicted vs measured for verifications `steps` whose forwards cost `costs` (1-row forwards
    each, timed alone); `shape` says in the note what priced them."""
    host = host_ms_per_step(per_prompt)
    forward = vanilla.forward_ms * sum(costs)  # ms over all the steps
    predicted_ms = forward + host * len(steps)
    predicted = 1000.0 * sum(c.accepted + 1 for c in steps) / predicted_ms / vanilla.tokens_per_s
    out = {"predicted_speedup": predicted, "cycle_ms": predicted_ms / len(steps), "host_ms": host,
           "vanilla_step_ms": vanilla.step_ms, "mean_verified_rows": sum(c.drafted + 1 for c in steps) / len(steps)}
    decode_tps = decode_tokens_per_s(per_prompt)
    if decode_tps is None:
        return out
    measured = decode_tps / vanilla.tokens_per_s
    out["measured_decode_speedup"] = measured
    if abs(measured / predicted - 1) > TOLERANCE:
        run = 1000.0 * _decode_seconds(per_prompt) / len(steps)
        out["prediction_note"] = (
            f"a cycle took {run:.2f} ms as run vs {out['cycle_ms']:.2f} ms predicted: forwards "
            f"{run - host:.2f} ms as run vs {forward / len(steps):.2f} ms from the vanilla forward as run "
            f"({vanilla.forward_ms:.2f} ms) x {shape}; host work {host:.2f} ms per cycle (vanilla "
            f"{vanilla.host_ms:.2f} ms per step)")
    return out


def lookup_prediction(lm, per_prompt: list[dict], vanilla: VanillaPace | None) -> dict:
    """Predicted vs measured decode speedup of a lookup row: each verification's K+1 rows on the
    row-cost curve, plus the row's host work per cycle."""
    steps = priceable_cycles(per_prompt, vanilla)
    if not steps:
        return {}
    curve = row_costs(lm, max(c.drafted for c in steps) + 1)
    return _priced(per_prompt, steps, [curve[c.drafted] for c in steps], vanilla, "the row-cost curve")


def tree_prediction(lm, per_prompt: list[dict], vanilla: VanillaPace | None) -> dict:
    """Predicted vs measured decode speedup of a tree row: each verification's nodes (the pending token
    and the drafted ones) on the position-cost table, plus the row's host work per cycle."""
    steps = priceable_cycles(per_prompt, vanilla)
    if not steps:
        return {}
    table = position_costs(lm, max(c.drafted for c in steps) + 1)
    return _priced(per_prompt, steps, [interpolate_cost(table, c.drafted + 1) for c in steps], vanilla,
                   "the position-cost table")


def hybrid_prediction(strategy, per_prompt: list[dict], vanilla: VanillaPace | None, context: int,
                      repeats: int = 10) -> dict:
    """Predicted vs measured decode speedup of a hybrid row (`strategy`: a Hybrid as run): its lookup
    (and draftless) cycles on the row-cost curve, its head cycles of K drafts as cycle_costs times a
    self-spec cycle of K drafts at the run's typical context (over the vanilla step timed with it),
    every cycle plus the row's host work."""
    steps = priceable_cycles(per_prompt, vanilla)
    if not steps:
        return {}
    lm = strategy.drafter.head.lm
    curve = row_costs(lm, max(c.drafted for c in steps) + 1)
    head = {}  # K -> a head cycle of K drafts in 1-row forwards
    for k in sorted({c.drafted for c in steps if c.source == HEAD}):
        timed = cycle_costs(lm, strategy.drafter, k, context=context, repeats=repeats)
        head[k] = timed["cycle_ms"] / timed["vanilla_step_ms"]
    costs = [head[c.drafted] if c.source == HEAD else curve[c.drafted] for c in steps]
    out = _priced(per_prompt, steps, costs, vanilla, "the row-cost curve and the timed head cycles")
    out["head_cycles"] = sum(c.source == HEAD for c in steps) / len(steps)
    out["cost_context"] = context
    return out

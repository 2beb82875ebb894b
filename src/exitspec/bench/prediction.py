"""The cost model next to the measurement: what self-speculation should have given, and why not.

For a self-spec row the benchmark times the parts of one cycle on this machine and model, on a warm
cache at the run's typical context (decoding/spec_costs.cycle_costs: a vanilla step, a draft pass
with and without the exit head, one verification of gamma + 1 rows), and Leviathan et al.'s formula
turns the row's measured E[accepted] into a predicted speedup over vanilla decoding:

    predicted = vanilla step x (E[accepted] + 1) / cycle

For a lookup row (drafts copied from the context: free to make) a cycle is one verification of
K + 1 rows on the full model, whose cost in vanilla steps is the runtime's measured row-cost curve
(runtime/profile.row_costs). Over the row's verifications s, each with its own K_s drafts and
a_s accepted:

    predicted = sum(a_s + 1) / sum(cost(K_s + 1))

Both are compared with the measured speedup of the decode phase (tokens over the time after the first
token, against the vanilla loop of the same runtime and temperature: prefill is no part of either
cycle). Where the two differ by more than 10%, the row says which side moved: the cycle as run
(decode time / verifications) against the timed one, and the vanilla step as run against the timed
one, so the report names the cause (a cache longer than the timed context, a step that does not
cost what it costs alone, overheads outside the model) instead of leaving a bare gap.
"""

from __future__ import annotations

from exitspec.decoding.spec_costs import cycle_costs, expected_speedup
from exitspec.runtime.profile import row_costs

TOLERANCE = 0.10


def _first_step_tokens(r: dict) -> int:
    """Tokens the first step emitted: it ends the time to the first token (decoding/driver.py)."""
    lens = r.get("accept_lengths")
    return lens[0] + 1 if lens else 1


def decode_tokens_per_s(per_prompt: list[dict]) -> float | None:
    """Tokens after the first step over the time after it, pooled over prompts."""
    tokens = sum(r["new_tokens"] - _first_step_tokens(r) for r in per_prompt)
    seconds = sum(r["time_s"] - (r["ttft_s"] or 0.0) for r in per_prompt)
    return tokens / seconds if seconds > 0 and tokens > 0 else None


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
        seconds = sum(r["time_s"] - (r["ttft_s"] or 0.0) for r in per_prompt)
        run_cycle = 1000 * seconds / verifications if verifications else float("nan")
        out["prediction_note"] = (
            f"a cycle took {run_cycle:.1f} ms as run vs {costs['cycle_ms']:.1f} ms timed alone; a vanilla step "
            f"{1000 / vanilla_decode_tps:.1f} ms as run vs {costs['vanilla_step_ms']:.1f} ms timed alone "
            f"(context {context})")
    return out


def lookup_prediction(lm, per_prompt: list[dict], vanilla_decode_tps: float | None) -> dict:
    """Predicted vs measured decode speedup of a lookup row, from each verification's own draft
    count and acceptance (the per-prompt records' draft_lengths / accept_lengths, the first
    verification left out as in decode_tokens_per_s) and the runtime's (K+1)-row step costs."""
    steps = [(k, a) for r in per_prompt
             for k, a in list(zip(r.get("draft_lengths") or [], r.get("accept_lengths") or [], strict=True))[1:]]
    if not steps or not vanilla_decode_tps:
        return {}
    curve = row_costs(lm, max(k for k, _ in steps) + 1)
    cost = sum(curve[k] for k, _ in steps)  # in 1-row steps
    predicted = sum(a + 1 for _, a in steps) / cost
    out = {"predicted_speedup": predicted, "mean_verified_rows": sum(k + 1 for k, _ in steps) / len(steps)}
    decode_tps = decode_tokens_per_s(per_prompt)
    if decode_tps is None:
        return out
    measured = decode_tps / vanilla_decode_tps
    out["measured_decode_speedup"] = measured
    if abs(measured / predicted - 1) > TOLERANCE:
        seconds = sum(r["time_s"] - (r["ttft_s"] or 0.0) for r in per_prompt)
        out["prediction_note"] = (
            f"a verification took {1000 * seconds / len(steps):.1f} ms as run vs "
            f"{1000 * cost / len(steps) / vanilla_decode_tps:.1f} ms predicted from the vanilla step as run and "
            f"the row-cost curve (mean {out['mean_verified_rows']:.2f} rows); the rest is drafting and "
            "bookkeeping outside the model")
    return out

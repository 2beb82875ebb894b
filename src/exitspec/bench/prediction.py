"""The cost model next to the measurement: what self-speculation should have given, and why not.

For a self-spec row the benchmark times the parts of one cycle on this machine and model, on a warm
cache at the run's typical context (decoding/spec_costs.cycle_costs: a vanilla step, a draft pass
with and without the exit head, one verification of gamma + 1 rows), and Leviathan et al.'s formula
turns the row's measured E[accepted] into a predicted speedup over vanilla decoding:

    predicted = vanilla step x (E[accepted] + 1) / cycle

It is compared with the measured speedup of the decode phase (tokens over the time after the first
token, against the vanilla loop of the same runtime and temperature: prefill is no part of either
cycle). Where the two differ by more than 10%, the row says which side moved: the cycle as run
(decode time / verifications) against the timed one, and the vanilla step as run against the timed
one, so the report names the cause (a cache longer than the timed context, a step that does not
cost what it costs alone, overheads outside the model) instead of leaving a bare gap.
"""

from __future__ import annotations

from exitspec.decoding.spec_costs import cycle_costs, expected_speedup

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

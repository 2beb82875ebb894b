"""MLP skipping (SEDAC-style): attention runs in every layer for every token; MLPs of the upper layers
are skipped while a probe says the token's prediction has settled.

Attention is never skipped, so every layer writes its KV for every token and the cache needs no
repair (unlike cascade): the only approximation is the missing MLP updates of a settled token's
upper layers. Lossy by design. Two probes:

- "head" (default): the exit head at `exit_layer` is confident (calibrated threshold, or the
  `threshold` option) -> skip the MLPs of layers start_layer..L-1 (start_layer >= exit_layer). The
  gate is first tried over the 4096 most frequent tokens (`precheck_vocab`, see exits.CheckedExit),
  so that unsettled tokens skip the full LM head at the probe; it can only skip fewer MLPs.
- "cosine": run layers from `start_layer` one by one; once the hidden state barely changes across a
  layer (cosine similarity of its input and output >= `threshold`, default 0.99), skip the MLPs of
  every layer above.

In a batch a layer's MLP is skipped only if every row is settled: skipping is a per-call decision
(`run_layers(skip_mlp=...)`), and running an MLP for a settled row is merely the exact computation.
The token always comes from the full final norm + LM head.

`adapt` (head probe only; SEDAC's run-time adaptation, decoding/adapt.py): at the start of each
request the probe's threshold is moved by how much harder or easier the request's own prompt reads
than the calibration prompts did, with weight `adapt` (0 = off: the calibrated threshold, exactly as
without the option). Each row keeps its own threshold (a row joining the batch adapts its own), so a
row's settled-ness is its own; whether the batch skips still needs every row settled (above).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from exitspec.decoding.adapt import (
    Adaptation,
    Reference,
    adaptation_option,
    adaptation_references,
    adaptation_targets,
    adapted_thresholds,
)
from exitspec.decoding.api import register_strategy
from exitspec.decoding.exits import (
    CheckedExit,
    Gate,
    StrategyOptionError,
    attention_share,
    check_threshold,
    default_exit_layers,
    exit_bundle,
    gate_counts,
    gates_for,
    precheck_vocabulary,
)
from exitspec.decoding.sampling import sample
from exitspec.decoding.strategy import DecodeState, StepOutput, Strategy
from exitspec.heads.base import ExitHead
from exitspec.runtime.layered import LayeredModel


class MLPSkip(Strategy):
    name = "mlp-skip"
    lossless = False

    def __init__(self, lm: LayeredModel, start_layer: int, probe: str, threshold: float,
                 head: ExitHead | None = None, gate: Gate | None = None, precheck: torch.Tensor | None = None,
                 adaptation: Adaptation | None = None, target: float | None = None,
                 reference: Reference | None = None):
        L = lm.num_layers
        if probe not in ("head", "cosine"):
            raise StrategyOptionError(f"probe must be 'head' or 'cosine', got {probe!r}")
        if not isinstance(start_layer, int) or not 0 < start_layer < L:
            raise StrategyOptionError(f"start_layer must be an integer in 1..{L - 1}, got {start_layer!r}")
        if probe == "head" and start_layer < head.layer:
            raise StrategyOptionError(f"start_layer ({start_layer}) must be >= the probe's exit_layer ({head.layer})")
        self.start, self.probe, self.threshold = start_layer, probe, threshold
        self.needs_heads = probe == "head"
        if adaptation is not None and probe != "head":
            raise StrategyOptionError("mlp-skip adapts the head probe's threshold; the cosine probe has no calibration "
                                      "to adapt: use probe=head, or drop adapt")
        self.exit = CheckedExit(head, gate, precheck) if probe == "head" else None
        self.share = attention_share(lm)
        self.adaptation, self.target, self.base_gate = adaptation, target, gate
        self.reference = reference  # the bundle's prompt reference for the probe (None: the blend)
        self.adapt_work: dict[str, float] = {}  # the adaptation passes' work so far (adapt.adapted_thresholds)

    def prepare(self, state: DecodeState) -> None:
        self.adapt_to(state.lm, state.seqs)

    def add_rows(self, state: DecodeState, n: int) -> None:
        """Joining rows adapt their own thresholds; the running rows keep theirs."""
        if self.adaptation is None:
            return
        kept = self.exit.gate.row_values
        new = self._adapted(state.lm, state.seqs[-n:])
        self.exit.gate = self.base_gate.with_rows([*kept.tolist(), *new])

    def select_rows(self, keep: list[int]) -> None:
        if self.exit is not None:
            self.exit.gate = self.exit.gate.select_rows(keep)

    def adapt_to(self, lm, prompts: list[list[int]]) -> None:
        """The probe's threshold adapted to `prompts`, one per row (decoding/adapt.py); nothing when
        adapt is off."""
        if self.adaptation is not None:
            self.exit.gate = self.base_gate.with_rows(self._adapted(lm, prompts))

    def _adapted(self, lm, prompts: list[list[int]]) -> list[float]:
        layer = self.exit.layer
        values, work = adapted_thresholds(lm, [self.exit], {layer: self.base_gate}, {layer: self.target},
                                          {layer: self.reference}, prompts, self.adaptation)
        self.adapt_work = {k: self.adapt_work.get(k, 0.0) + v for k, v in work.items()}
        return values[layer]

    def cost_counts(self) -> dict[str, float]:
        """The probe's work so far in LM-head rows (none for the cosine probe), and the adaptation
        passes' (bench/costs.py)."""
        return gate_counts([self.exit] if self.exit else []) | {f"adapt_{k}": v for k, v in self.adapt_work.items()}

    def step(self, state: DecodeState) -> StepOutput:
        lm, cache = state.lm, state.cache
        L = lm.num_layers
        x, pos = state.pending()  # (B, 1)
        h = lm.embed(x, pos)
        ctx = lm.context(h, pos)
        if self.probe == "head":
            p = self.exit.layer
            h = lm.run_layers(h, pos, cache, 0, p, ctx=ctx)
            settled = bool(self.exit.confident(h[:, -1])[0].all())
            skip = range(self.start, L) if settled else range(0)
            h = lm.run_layers(h, pos, cache, p, L, ctx=ctx, skip_mlp=set(skip))
        else:
            h = lm.run_layers(h, pos, cache, 0, self.start, ctx=ctx)
            m = self.start
            while m < L:
                out = lm.run_layers(h, pos, cache, m, m + 1, ctx=ctx)
                # 1.0 never settles (a cosine of nearly equal states can round to exactly 1).
                settled = self.threshold < 1.0 and bool((F.cosine_similarity(out, h, dim=-1) >= self.threshold).all())
                h, m = out, m + 1
                if settled:
                    break
            skip = range(m, L)
            h = lm.run_layers(h, pos, cache, m, L, ctx=ctx, skip_mlp=set(skip))
        tok = sample(lm.logits(h[:, -1]), state.sampling).tolist()
        work = L - len(skip) * (1 - self.share)
        return StepOutput(tokens=[[t] for t in tok], exit_layers=[[L] for _ in tok],
                          layers_computed=[work] * len(tok), extra={"mlp_skipped": len(skip)})

    def describe(self) -> dict:
        return {"strategy": self.name, "probe": self.probe, "start_layer": self.start,
                "exit_layer": self.exit.layer if self.exit else None,
                "threshold": (self.exit.gate.score, self.exit.gate.value) if self.exit else self.threshold,
                "precheck_vocab": self.exit.precheck_size if self.exit else None,
                **({"adapt": self.adaptation.to_dict() | {"reference": self.reference and asdict(self.reference)}}
                   if self.adaptation else {})}


def make_mlp_skip(model, probe: str = "head", exit_layer: int | None = None, start_layer: int | None = None,
                  threshold=None, score: str | None = None, precheck_vocab: int | list[int] = 4096,
                  adapt: float = 0.0, adapt_window: int | None = None, adapt_target: float | None = None,
                  **unknown) -> MLPSkip:
    """precheck_vocab: the head probe's frequent-token pre-check, size or ids (exits.CheckedExit); 0 = off.
    adapt, adapt_window, adapt_target: per-request adaptation of the head probe's threshold
    (decoding/adapt.py); adapt=0 = off."""
    if unknown:
        raise StrategyOptionError(f"mlp-skip has no option(s) {sorted(unknown)}; it takes probe, exit_layer, "
                                  "start_layer, threshold, score, precheck_vocab, adapt, adapt_window, adapt_target")
    adaptation = adaptation_option("mlp-skip", adapt, adapt_window, adapt_target)
    lm = model.lm
    if probe == "cosine":
        start = start_layer if start_layer is not None else lm.num_layers // 2
        # A cosine similarity threshold, in [0, 1] like the probabilities (1.0: never settle).
        value = 0.99 if threshold is None else check_threshold("cosine", threshold, "mlp-skip")
        return MLPSkip(lm, start, "cosine", value, adaptation=adaptation)
    layer = int(exit_layer) if exit_layer is not None else default_exit_layers(model, "mlp-skip")[0]
    bundle = exit_bundle(model, [layer])
    gate = gates_for(bundle, [layer], threshold, score, strategy="mlp-skip")[layer]
    start = start_layer if start_layer is not None else layer
    target = ref = None
    if adaptation:
        target = adaptation_targets(bundle, [layer], adaptation, "mlp-skip")[layer]
        ref = adaptation_references(bundle, {layer: gate}, {layer: target}, adaptation, "mlp-skip")[layer]
    return MLPSkip(lm, start, probe, gate.value, head=bundle.head(layer), gate=gate,
                   precheck=precheck_vocabulary(model, precheck_vocab, bundle, "mlp-skip"),
                   adaptation=adaptation, target=target, reference=ref)


register_strategy("mlp-skip", make_mlp_skip)

"""The sweep: every configuration over every prompt, timed, audited and written as it finishes.

Order within a temperature: exitspec vanilla, HF generate, then the rest. Vanilla's greedy tokens
are the reference of the lossless audit and of token agreement; the faster of the two vanillas is
the speedup baseline (per temperature, and per category for the category table). Right after
vanilla, one teacher-forced layer sweep over its generated text gives every exit layer's KL,
perplexity, top-1 agreement and draft/target overlap (results filled into each row by exit layer).

Timing protocol per configuration: `warmup` untimed generations on the first prompt, then each
prompt `repeats` times; a prompt's time is the median of its repeats, a configuration's tokens/s is
total tokens / total median time (and the median of per-prompt tokens/s is reported beside it).
By default configurations run one after the other; with `interleave = true` every configuration is
built and warmed up first, then each prompt (and repeat) is run by every configuration in turn, so
that a machine whose speed drifts over minutes (a shared VM, benchmarks/README.md) slows all of them
alike and the ratios stay fair. Memory is then the process peak of the whole timed phase.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from exitspec.bench import metrics
from exitspec.bench.aggregate import aggregate_row, category_rows, category_tps
from exitspec.bench.config import BenchConfig, RunSpec, save_config
from exitspec.bench.contenders import Contender, ExitspecContender, PeerUnavailable, Sample
from exitspec.bench.costs import cost_split
from exitspec.bench.datastore_facts import measure_datastore
from exitspec.bench.machine import PeakMemory, describe_machine, machine_line
from exitspec.bench.peers import make_peer
from exitspec.bench.prediction import (
    VanillaPace,
    hybrid_prediction,
    lookup_prediction,
    self_spec_prediction,
    tree_prediction,
    vanilla_pace,
)
from exitspec.bench.quality import layer_sweep, pool_sweeps, text_nll
from exitspec.bench.results import ResultsWriter
from exitspec.bench.routing import routing_table, token_recovery
from exitspec.decoding.api import encode_prompt
from exitspec.decoding.config import eos_ids_for
from exitspec.decoding.exits import head_cost
from exitspec.decoding.strategies.cascade import Cascade
from exitspec.decoding.strategies.hybrid import Hybrid
from exitspec.decoding.strategies.lookup import Lookup
from exitspec.decoding.strategies.tree_lookup import TreeLookup
from exitspec.decoding.strategies.vanilla import Vanilla
from exitspec.loading import attach_heads, load
from exitspec.prompts import Prompt


@dataclass
class AuditEntry:
    label: str
    prompts: int
    mismatches: list[dict] = field(default_factory=list)  # {"prompt_id", "position", "got", "vanilla"}

    @property
    def ok(self) -> bool:
        return not self.mismatches


@dataclass
class RunOutcome:
    rows: list[dict]
    audit: list[AuditEntry]
    interrupted: bool = False

    @property
    def audit_failed(self) -> list[AuditEntry]:
        return [a for a in self.audit if not a.ok]


class BenchRunner:
    def __init__(self, cfg: BenchConfig, model, prompts: list[Prompt], out: Path, *,
                 injected: dict | None = None, progress: bool = True, command: str = ""):
        self.cfg, self.model, self.prompts, self.out = cfg, model, prompts, out
        self.injected = injected or {}
        self.ids = [encode_prompt(model.tokenizer, p.text, cfg.chat) for p in prompts]
        self.eos_ids = set(eos_ids_for(model.lm.model, model.tokenizer))  # where an answer ends (EOS is ignored)
        self.specs = cfg.specs()
        self.machine = describe_machine()
        self.writer = ResultsWriter(out)
        save_config(cfg, out, {"command": command, "model_name": model.name,
                               "prompt_ids": [p.id for p in prompts]})
        self.progress = progress
        self.command = command
        L = model.lm.num_layers
        self.sweep_layers = [x for x in (cfg.quality_layers or range(1, L)) if 0 < x < L]
        self.models = {"dense": model}  # RunSpec.runtime -> loaded model (others loaded when first needed)
        self.vanilla_tokens: dict[str, list[list[int]]] = {}  # RunSpec.runtime -> exitspec vanilla, greedy
        # runtime, temperature -> the vanilla loop's decode-phase pace (bench/prediction.py)
        self.vanilla_decode: dict[tuple[str, float], VanillaPace | None] = {}
        self.ref_tokens: list[list[int]] | None = None  # exitspec vanilla at the reference temperature
        self.pending: list[tuple[RunSpec, dict, list[dict]]] = []  # baseline rows waiting for both baselines
        self.baseline: dict[float, dict] = {}  # temperature -> {"label", "tps", "by_category"}
        self.layer_rows: list[dict] = []
        self.audit: list[AuditEntry] = []
        self.rows: list[dict] = []

    # ------------------------------------------------------------------------------------------
    def run(self) -> RunOutcome:
        P, r = len(self.ids), self.cfg.repeats
        units = sum(self.cfg.warmup + P * r for _ in self.specs) + (P if self.cfg.quality else 0)
        bar = tqdm(total=units, desc="bench", unit="gen", disable=not self.progress, dynamic_ncols=True,
                   file=sys.stderr)
        self.writer.write_json("audit.json", {"status": "running"})
        if any(s.name in DATASTORE_STRATEGIES for s in self.specs):
            facts = measure_datastore(self.model, self.ids)
            if facts:
                self.writer.write_json("datastore.json", facts)
        try:
            timed = self._run_interleaved(bar) if self.cfg.interleave else {}
            for spec in self.specs:
                if not spec.is_baseline:
                    self._flush_baselines()
                bar.set_postfix_str(spec.label[:40])
                if spec in timed:
                    self._finish_spec(spec, *timed[spec])
                elif not self.cfg.interleave:
                    self._run_spec(spec, bar)
                if spec.name == "vanilla" and spec.temperature == self._ref_temperature() and self.cfg.quality \
                        and self.ref_tokens is not None and not self.layer_rows:
                    self._layer_sweep(bar)
            self._flush_baselines()
        except KeyboardInterrupt:
            bar.close()
            self._flush_baselines()
            self._write_audit(interrupted=True)
            return RunOutcome(self.rows, self.audit, interrupted=True)
        bar.close()
        self._write_audit(interrupted=False)
        return RunOutcome(self.rows, self.audit)

    def _model_for(self, spec: RunSpec):
        """The model a spec runs on: the configured one, or a copy loaded with other weights / KV cache."""
        w, key = spec.weights, spec.runtime
        if key not in self.models:
            m = load(self.model.source, dtype=None if w == "int4" else self.cfg.dtype, device=self.cfg.device,
                     weights=w, kv_cache=spec.kv_cache)
            if self.model.heads is not None and self.cfg.heads:
                attach_heads(m, self.cfg.heads)
            self.models[key] = m
        return self.models[key]

    def _ref_temperature(self) -> float:
        return 0.0 if 0.0 in self.cfg.temperatures else self.cfg.temperatures[0]

    # ------------------------------------------------------------------------------------------
    def _run_spec(self, spec: RunSpec, bar) -> None:
        cfg = self.cfg
        units = cfg.warmup + len(self.ids) * cfg.repeats
        try:
            contender = make_contender(spec, self._model_for(spec), self.injected)
        except Exception as err:  # a broken or missing contender must not end the whole sweep
            bar.update(units)
            print(f"\n[bench] skipping {spec.label}: {err}", file=sys.stderr)
            self._write(self._settings(spec, None) | {"status": failure(err)}, [], [])
            return
        samples: list[Sample] = []
        times: list[list[float]] = []
        done = 0
        try:
            with PeakMemory(str(self.model.lm.device)) as mem:
                for _ in range(cfg.warmup):
                    contender.run(self.ids[0], min(16, cfg.max_new_tokens), spec.temperature, cfg.seed)
                    bar.update(1)
                    done += 1
                for i, ids in enumerate(self.ids):
                    reps = []
                    for _ in range(cfg.repeats):
                        s = contender.run(ids, cfg.max_new_tokens, spec.temperature, cfg.seed + i)
                        reps.append(s)
                        bar.update(1)
                        done += 1
                    # Same tokens every repeat (fixed seed); the median time stands for the prompt.
                    order = sorted(range(len(reps)), key=lambda j: reps[j].total_s)
                    samples.append(reps[order[len(order) // 2]])
                    times.append([x.total_s for x in reps])
        except Exception as err:
            bar.update(max(0, units - done))
            print(f"\n[bench] {spec.label} failed: {err}", file=sys.stderr)
            self._write(self._settings(spec, contender) | {"status": f"error: {err}"}, [], [])
            return
        self._finish_spec(spec, contender, samples, times, mem)

    def _run_interleaved(self, bar) -> dict:
        """Every configuration on every prompt, round-robin: {spec: (contender, samples, times, memory)}.
        A configuration that cannot be built or fails is reported (an error row) and dropped."""
        cfg = self.cfg
        live: dict[RunSpec, Contender] = {}
        for spec in self.specs:
            bar.set_postfix_str(f"warm-up {spec.label[:32]}")
            try:
                contender = make_contender(spec, self._model_for(spec), self.injected)
                for _ in range(cfg.warmup):
                    contender.run(self.ids[0], min(16, cfg.max_new_tokens), spec.temperature, cfg.seed)
                    bar.update(1)
                live[spec] = contender
            except Exception as err:
                print(f"\n[bench] skipping {spec.label}: {err}", file=sys.stderr)
                self._write(self._settings(spec, None) | {"status": failure(err)}, [], [])
                bar.update(cfg.warmup + len(self.ids) * cfg.repeats)
        reps: dict[RunSpec, list[list[Sample]]] = {spec: [] for spec in live}
        with PeakMemory(str(self.model.lm.device)) as mem:
            for i, ids in enumerate(self.ids):
                bar.set_postfix_str(f"prompt {i + 1}/{len(self.ids)}")
                for spec in list(live):
                    reps[spec].append([])
                for _ in range(cfg.repeats):
                    for spec, contender in list(live.items()):
                        try:
                            reps[spec][i].append(contender.run(ids, cfg.max_new_tokens, spec.temperature,
                                                               cfg.seed + i))
                        except Exception as err:
                            print(f"\n[bench] {spec.label} failed: {err}", file=sys.stderr)
                            self._write(self._settings(spec, contender) | {"status": f"error: {err}"}, [], [])
                            del live[spec]
                        bar.update(1)
        out = {}
        for spec, contender in live.items():
            samples, times = [], []
            for r in reps[spec]:
                order = sorted(range(len(r)), key=lambda j: r[j].total_s)
                samples.append(r[order[len(order) // 2]])  # same tokens every repeat: the median time
                times.append([x.total_s for x in r])
            out[spec] = (contender, samples, times, mem)
        return out

    def _finish_spec(self, spec: RunSpec, contender: Contender, samples: list[Sample], times: list[list[float]],
                     mem: PeakMemory) -> None:
        cfg = self.cfg
        greedy = spec.temperature == 0.0
        rt = spec.runtime
        if spec.name == "vanilla" and greedy:
            self.vanilla_tokens[rt] = [s.tokens for s in samples]
        if spec.name == "vanilla" and rt == "dense" and spec.temperature == self._ref_temperature():
            self.ref_tokens = [s.tokens for s in samples]
        # Lossless claims hold against vanilla decoding on the same runtime; vanilla on another one
        # (int4 weights, an fp16 KV cache) is compared with the dense vanilla loop and counts as lossy.
        ref = (self.vanilla_tokens.get("dense") if spec.name == "vanilla" else self.vanilla_tokens.get(rt)) \
            if greedy else None
        lossy = not contender.lossless or (spec.name == "vanilla" and rt != "dense")
        per_prompt = []
        for i, (p, s) in enumerate(zip(self.prompts, samples, strict=True)):
            rec = {"label": spec.label, "prompt_index": i, "prompt_id": p.id, "category": p.category,
                   "prompt_tokens": len(self.ids[i]), "new_tokens": len(s.tokens), "times_s": times[i],
                   "time_s": s.total_s, "tokens_per_s": len(s.tokens) / s.total_s if s.total_s else None,
                   "ttft_s": s.ttft_s, "target_calls": s.target_calls, "drafted": s.drafted,
                   "accept_lengths": s.accept_lengths if s.accept_lengths_exact else None,
                   "draft_lengths": s.draft_lengths,
                   "mean_accepted": (sum(s.accept_lengths) / len(s.accept_lengths)) if s.accept_lengths else None,
                   "accepted": sum(s.accept_lengths) if s.accept_lengths else None,
                   "verifications": len(s.accept_lengths) if s.accept_lengths else None,
                   "steps": s.target_calls, "host_s": s.host_s, "cycle_sources": s.cycle_sources,
                   "layers_computed": s.layers_computed, "exit_hist": {str(k): v for k, v in s.exit_hist.items()},
                   "tokens": s.tokens, "text": self.model.tokenizer.decode(s.tokens, skip_special_tokens=True)}
            if ref is not None:
                rec["first_mismatch"] = metrics.first_mismatch(s.tokens, ref[i])
                rec["agreement"] = metrics.token_agreement(s.tokens, ref[i])
                reference_answer = metrics.until_eos(ref[i], self.eos_ids)
                # The final number of the answer, as GSM8K scores it; only where vanilla's answer ended
                # within the budget (a cut-off answer has no final number to agree with).
                if p.category in ANSWER_CATEGORIES and len(reference_answer) < len(ref[i]):
                    decode = self.model.tokenizer.decode
                    rec["answer_agreement"] = metrics.answer_agreement(
                        decode(metrics.until_eos(s.tokens, self.eos_ids), skip_special_tokens=True),
                        decode(reference_answer, skip_special_tokens=True))
            if cfg.quality and (lossy or spec.name == "vanilla"):
                rec["nll"], rec["nll_tokens"] = text_nll(self.model, self.ids[i], s.tokens)
            per_prompt.append(rec)
        settings = self._settings(spec, contender)
        row = (settings | aggregate_row(per_prompt, samples, cfg.bootstrap, cfg.seed)
               | self._draft_quality(spec, settings["exit_layer"]))
        row["peak_mem_mib"], row["mem_source"] = mem.peak_mib, mem.source
        if spec.name == "vanilla":
            self.vanilla_decode[(rt, spec.temperature)] = vanilla_pace(per_prompt)
        strategy = contender.factory() if isinstance(contender, ExitspecContender) else None
        pairs = [(ids, s.tokens) for ids, s in zip(self.ids, samples, strict=True)]
        if isinstance(strategy, Cascade):  # CascadeExit's routing table: tokens, agreement, perplexity per exit
            row["routing"] = routing_table(contender.model, strategy, pairs)
        if lossy and greedy and strategy is not None:  # TRR: early-exited tokens that are the full model's
            tr = token_recovery(contender.model, strategy, pairs)
            if tr is not None:
                row["trr"], row["trr_exited"] = tr["trr"], tr["exited"]
        if isinstance(strategy, Vanilla) or all(s.gates is not None for s in samples):  # where the work goes
            lm = contender.model.lm
            gates = None if isinstance(strategy, Vanilla) else {
                k: sum(s.gates.get(k, 0.0) for s in samples) for k in {k for s in samples for k in s.gates}}
            row["cost_split"] = cost_split(lm.num_layers, head_cost(lm), row["new_tokens"],
                                           sum(s.layers_computed or 0.0 for s in samples),
                                           metrics.merge_histograms(s.exit_hist for s in samples), gates)
        # The cost model's prediction, beside the measurement (bench/prediction.py).
        pace = self.vanilla_decode.get((rt, spec.temperature))
        context = round(sum(len(x) for x in self.ids) / len(self.ids) + cfg.max_new_tokens / 2)
        if spec.name == "self-spec" and hasattr(strategy, "drafter"):
            row |= self_spec_prediction(strategy, row, per_prompt, pace.tokens_per_s if pace else None, context)
        elif isinstance(strategy, Lookup):  # drafts are free: the verification rows and host work are the cost
            row |= lookup_prediction(contender.model.lm, per_prompt, pace)
        elif isinstance(strategy, TreeLookup):
            row |= tree_prediction(contender.model.lm, per_prompt, pace)
        elif isinstance(strategy, Hybrid):
            row |= hybrid_prediction(strategy, per_prompt, pace, context)
        # The lossless audit: greedy outputs of every lossless-claiming contender against vanilla's.
        row["lossless_claim"] = not lossy
        row["weights"], row["kv_cache"] = spec.weights, spec.kv_cache or "model dtype"
        if not lossy and greedy and ref is not None and spec.name != "vanilla":
            entry = AuditEntry(spec.label, len(per_prompt))
            for rec, p in zip(per_prompt, self.prompts, strict=True):
                if rec["first_mismatch"] is not None:
                    j = rec["first_mismatch"]
                    got, want = rec["tokens"], ref[rec["prompt_index"]]
                    entry.mismatches.append({"prompt_id": p.id, "position": j,
                                             "got": got[j] if j < len(got) else None,
                                             "vanilla": want[j] if j < len(want) else None})
            self.audit.append(entry)
            row["lossless_ok"] = entry.ok
            row["lossless_mismatches"] = len(entry.mismatches)
            if not entry.ok:
                m = entry.mismatches[0]
                print(f"\n[bench] LOSSLESS AUDIT FAILED: {spec.label} differs from vanilla on "
                      f"{len(entry.mismatches)}/{entry.prompts} prompts (first: prompt {m['prompt_id']}, "
                      f"token {m['position']}: {m['got']} vs vanilla {m['vanilla']})", file=sys.stderr)
        if spec.is_baseline:
            # Written once both vanillas of this temperature are measured: the faster is the baseline.
            self._note_baseline(spec, row, per_prompt)
            self.pending.append((spec, row, per_prompt))
        else:
            self._emit(spec, row, per_prompt)

    def _emit(self, spec: RunSpec, row: dict, per_prompt: list[dict]) -> None:
        base = self.baseline.get(spec.temperature)
        if base:
            row["baseline"], row["baseline_tokens_per_s"] = base["label"], base["tps"]
            row["speedup"] = metrics.speedup(row["tokens_per_s"], base["tps"])
        by_category = self.baseline.get(spec.temperature, {}).get("by_category", {})
        self._write(row, per_prompt, category_rows(spec, per_prompt, by_category))

    def _flush_baselines(self) -> None:
        pending, self.pending = self.pending, []
        for spec, row, per_prompt in pending:
            self._emit(spec, row, per_prompt)

    # ------------------------------------------------------------------------------------------
    def _settings(self, spec: RunSpec, contender: Contender | None) -> dict:
        opts = contender.describe() if contender is not None else {"name": spec.name, **spec.opts}
        opts.pop("name", None)
        if opts.get("strategy") == spec.name:
            opts.pop("strategy")
        # Settings a strategy chose itself (e.g. the bundle's recommended exit layer) count as set.
        described = RunSpec(spec.name, tuple(sorted((k, v) for k, v in opts.items()
                                                    if isinstance(v, int | float | str))))
        exit_layer = spec.exit_layer if spec.exit_layer is not None else described.exit_layer
        gamma = spec.gamma if spec.gamma is not None else described.gamma
        threshold = spec.opts.get("threshold")  # a swept scalar (threshold_sweep); per-layer dicts stay in options
        return {"label": spec.label, "name": spec.name, "options": opts, "exit_layer": exit_layer,
                "gamma": gamma, "threshold": threshold if isinstance(threshold, int | float) else None,
                "temperature": spec.temperature, "max_new_tokens": self.cfg.max_new_tokens,
                "prompts": len(self.ids), "repeats": self.cfg.repeats, "model": self.model.name,
                "heads": self.cfg.heads or "", "machine": machine_line(self.machine), "status": "ok"}

    def _draft_quality(self, spec: RunSpec, exit_layer: int | None) -> dict:
        """Overlap / TV / top-1 agreement of the draft exit vs the full model, from the layer sweep."""
        if exit_layer is None or not self.layer_rows:
            return {}
        # exitspec strategies read the attached head at that layer when the bundle has one (else the
        # logit lens, as HF's and economize's early exit always do).
        heads = self.model.heads
        has_head = heads is not None and exit_layer in getattr(heads, "layers", [])
        reading = "head" if (not spec.is_peer and has_head) else "lens"
        match = [r for r in self.layer_rows if r["layer"] == exit_layer and r["reading"] == reading]
        if not match:
            return {}
        r, t = match[0], (spec.temperature if spec.temperature > 0 else 1.0)
        ov = r.get(f"overlap_T{t:g}")
        return {"draft_reading": reading, "top1_agreement": r["top1_agreement"], "overlap": ov,
                "tv": None if ov is None else 1.0 - ov, "overlap_temperature": t}

    def _note_baseline(self, spec: RunSpec, row: dict, per_prompt: list[dict]) -> None:
        tps = row["tokens_per_s"]
        cur = self.baseline.get(spec.temperature)
        if tps is None or math.isnan(tps) or (cur and cur["tps"] >= tps):
            return
        self.baseline[spec.temperature] = {"label": spec.label, "tps": tps,
                                           "by_category": category_tps(per_prompt)}

    def _layer_sweep(self, bar) -> None:
        sweeps = []
        for ids, gen in zip(self.ids, self.ref_tokens, strict=True):
            sweeps.append(layer_sweep(self.model, ids, gen, self.sweep_layers, self.cfg.temperatures))
            bar.update(1)
        self.layer_rows = pool_sweeps(sweeps)
        self.writer.write_layers(self.layer_rows)

    def _write(self, row: dict, per_prompt: list[dict], per_category: list[dict]) -> None:
        self.rows.append(row)
        self.writer.write_row(row, per_prompt, per_category)

    def _write_audit(self, interrupted: bool) -> None:
        failed = [a.label for a in self.audit if not a.ok]
        self.writer.write_json("audit.json", {
            "status": "interrupted" if interrupted else "finished",
            "ran": bool(self.vanilla_tokens),
            "passed": not failed, "failed": failed,
            "entries": [{"label": a.label, "prompts": a.prompts, "ok": a.ok, "mismatches": a.mismatches}
                        for a in self.audit],
        })


# Strategies that draft from the attached bundle's datastore: the report says what it is and costs.
DATASTORE_STRATEGIES = ("lookup", "hybrid", "tree")

# Prompt categories whose answers end in a number to compare (GSM8K: "#### 42").
ANSWER_CATEGORIES = ("gsm8k",)


def failure(err: Exception) -> str:
    """A run's status when its contender could not be made: "skipped: why" for a peer this machine or
    model cannot run (the sweep goes on, the report says why), else "error: ..."."""
    return f"skipped: {err}" if isinstance(err, PeerUnavailable) else f"error: {err}"


def make_contender(spec: RunSpec, model, injected: dict | None = None) -> Contender:
    """The contender for a spec. `injected` maps names to strategy factories (tests, plugins)."""
    if injected and spec.name in injected:
        make = injected[spec.name]
        return ExitspecContender(spec, model, factory=lambda: make(model, **spec.strategy_opts))
    if spec.is_peer:
        if spec.runtime != "dense":
            raise ValueError(f"{spec.name} is a peer library's decoder; it runs the dense model only "
                             "(drop weights= and kv_cache=)")

        return make_peer(spec, model)
    return ExitspecContender(spec, model)

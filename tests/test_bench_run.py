"""End-to-end benchmark runs on a tiny model: files, audit, quality sweep, plots from saved results."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_loaded
from exitspec.bench.config import BenchConfig
from exitspec.bench.quality import layer_sweep, pool_sweeps
from exitspec.bench.report import finish
from exitspec.bench.results import SavedResults
from exitspec.bench.runner import BenchRunner
from helpers_bench import INJECTED, tiny_prompts


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    model = tiny_loaded("llama", layers=4)
    cfg = BenchConfig(num_prompts=3, max_new_tokens=8, repeats=2, warmup=1, bootstrap=100,
                      runs=[{"name": "hf-early-exit", "exit_layer": [1, 2]}, {"name": "cheat"}, {"name": "lossy"},
                            {"name": "no-such-strategy"}, {"name": "described"}])
    outcome = BenchRunner(cfg, model, tiny_prompts(), out, injected=INJECTED, progress=False).run()
    return out, outcome, model


def test_rows_and_per_prompt_records(tiny_run):
    out, outcome, _ = tiny_run
    res = SavedResults(out)
    labels = [r["label"] for r in res.rows]
    assert labels == ["vanilla@T0", "hf-generate@T0", "hf-early-exit[exit_layer=1]@T0",
                      "hf-early-exit[exit_layer=2]@T0", "cheat@T0", "lossy@T0", "no-such-strategy@T0",
                      "described@T0"]
    rows = {r["label"]: r for r in res.rows}
    assert "unknown strategy" in rows["no-such-strategy@T0"]["status"]
    ok = [r for r in res.rows if r["status"] == "ok"]
    assert all(r["new_tokens"] == 3 * 8 and r["tokens_per_s"] > 0 and r["machine"] for r in ok)
    # Speedups are against the faster vanilla, which therefore has speedup 1 and the other <= 1.
    base = max(rows["vanilla@T0"]["tokens_per_s"], rows["hf-generate@T0"]["tokens_per_s"])
    for r in ok:
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / base, rel=1e-4)
    assert max(rows["vanilla@T0"]["speedup"], rows["hf-generate@T0"]["speedup"]) == pytest.approx(1.0)
    assert rows["vanilla@T0"]["target_calls_per_token"] == pytest.approx(1.0)
    assert rows["vanilla@T0"]["layers_per_token"] == pytest.approx(4.0)
    ee = rows["hf-early-exit[exit_layer=2]@T0"]
    assert ee["mean_accept_length"] == pytest.approx(ee["mean_accepted"] + 1)
    assert ee["target_calls_per_token"] <= 1.0 and ee["draft_reading"] == "lens"
    assert ee["tv"] == pytest.approx(1 - ee["overlap"])
    assert len(res.prompts) == 7 * 3  # seven configurations ran, three prompts each
    described = rows["described@T0"]  # settings the strategy chose itself are recorded too
    assert (described["exit_layer"], described["gamma"], described["draft_reading"]) == (2, 3, "lens")
    assert described["overlap"] == ee["overlap"]
    rec = res.prompts[0]
    assert rec["label"] == "vanilla@T0" and len(rec["tokens"]) == 8 and len(rec["times_s"]) == 2
    cats = {(c["label"], c["category"]): c for c in res.categories}
    assert ("vanilla@T0", "chat") in cats and ("vanilla@T0", "code") in cats
    assert cats[("vanilla@T0", "chat")]["target_calls_per_token"] == pytest.approx(1.0)
    ee_chat = cats[("hf-early-exit[exit_layer=2]@T0", "chat")]
    assert ee_chat["prompts"] == 2 and ee_chat["mean_accept_length"] == pytest.approx(ee_chat["mean_accepted"] + 1)


def test_lossless_audit_catches_a_strategy_that_lies(tiny_run):
    out, outcome, _ = tiny_run
    rows = {r["label"]: r for r in SavedResults(out).rows}
    assert rows["cheat@T0"]["lossless_ok"] is False
    assert rows["cheat@T0"]["lossless_mismatches"] == 3
    assert rows["hf-generate@T0"]["lossless_ok"] is True
    assert rows["hf-early-exit[exit_layer=1]@T0"]["lossless_ok"] is True
    assert rows["lossy@T0"]["lossless_ok"] is None  # no claim, no audit ...
    assert rows["lossy@T0"]["agreement"] < 1.0  # ... but its agreement and perplexity are reported
    assert rows["lossy@T0"]["agreement_lo"] <= rows["lossy@T0"]["agreement"] <= rows["lossy@T0"]["agreement_hi"]
    assert rows["lossy@T0"]["perplexity"] > 0
    audit = json.loads((out / "audit.json").read_text())
    assert audit["passed"] is False and audit["failed"] == ["cheat@T0"]
    entry = next(e for e in audit["entries"] if e["label"] == "cheat@T0")
    assert {m["position"] for m in entry["mismatches"]} == {2}
    assert [a.label for a in outcome.audit_failed] == ["cheat@T0"]


def test_plots_and_report_come_from_saved_files_only(tiny_run):
    out, _, _ = tiny_run
    figures = finish(out)
    assert {"layer_sweep", "acceptance_sweep", "pareto"} <= set(figures)
    for name in figures:
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").is_file()
    report = (out / "report.md").read_text()
    assert "LOSSLESS AUDIT FAILED" in report and "cheat@T0" in report
    assert "![layer_sweep](layer_sweep.png)" in report
    # Redraw from the files alone into a copy of the folder (the model is not needed).
    import shutil

    copy = out.parent / "replot"
    shutil.copytree(out, copy)
    for p in copy.glob("*.png"):
        p.unlink()
    assert set(finish(copy)) == set(figures)


def test_layer_sweep_matches_hf_hidden_states():
    """The exitspec teacher-forced sweep equals the logit lens on HF's own hidden states."""
    model = tiny_loaded("llama", layers=4)
    prompt, gen = [5, 6, 7, 8], [9, 10, 11]
    sweep = layer_sweep(model, prompt, gen, [1, 2, 3], [0.0])
    with torch.inference_mode():
        hs = model.model(torch.tensor([prompt + gen]), output_hidden_states=True).hidden_states
    full = model.model.lm_head(model.model.model.norm(hs[-1]))[0, 3:6]
    for layer in (1, 2, 3):
        lens = model.model.lm_head(model.model.model.norm(hs[layer]))[0, 3:6]
        top1 = (lens.argmax(-1) == full.argmax(-1)).sum().item()
        assert sweep["lens"][layer]["top1"] == top1
        ov = torch.minimum(full.softmax(-1), lens.softmax(-1)).sum(-1).sum().item()
        assert sweep["lens"][layer]["overlap_T1"] == pytest.approx(ov, rel=1e-4)
    rows = pool_sweeps([sweep, sweep])
    assert rows[0]["positions"] == 6 and rows[0]["tv_T1"] == pytest.approx(1 - rows[0]["overlap_T1"])


def test_interrupt_keeps_finished_rows(tmp_path):
    model = tiny_loaded("llama", layers=2)
    cfg = BenchConfig(num_prompts=2, max_new_tokens=4, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "interrupt"}, {"name": "lossy"}])
    outcome = BenchRunner(cfg, model, tiny_prompts()[:2], tmp_path, injected=INJECTED, progress=False).run()
    assert outcome.interrupted
    res = SavedResults(tmp_path)
    assert [r["label"] for r in res.rows] == ["vanilla@T0", "hf-generate@T0"]  # finished before Ctrl-C
    assert len(res.prompts) == 4
    assert json.loads((tmp_path / "audit.json").read_text())["status"] == "interrupted"
    finish(tmp_path)
    assert "interrupted" in (tmp_path / "report.md").read_text()


def test_cli_on_a_saved_tiny_model_and_an_mt_bench_file(tmp_path):
    from conftest import save_tiny_model
    from exitspec.cli import main
    from helpers_bench import write_mt_bench

    model_dir = save_tiny_model(tmp_path / "tiny", layers=3)
    prompts = tmp_path / "question.jsonl"
    write_mt_bench(prompts)
    out = tmp_path / "out"
    rc = main(["bench", "--model", str(model_dir), "--prompts", str(prompts), "--split", "all",
               "--num-prompts", "3", "--max-new-tokens", "5", "--repeats", "1", "--warmup", "0", "--no-progress",
               "--strategies", "hf-early-exit", "--exit-layers", "1,2", "--out", str(out)])
    assert rc == 0
    res = SavedResults(out)
    assert [r["label"] for r in res.rows][2:] == ["hf-early-exit[exit_layer=1]@T0", "hf-early-exit[exit_layer=2]@T0"]
    assert {p["category"] for p in res.prompts} == {"writing", "math", "coding"}
    assert res.config["num_prompts"] == 3 and res.config["runs"] == [{"name": "hf-early-exit", "exit_layer": [1, 2]}]
    assert (out / "report.md").is_file() and (out / "layer_sweep.png").is_file()
    (out / "report.md").unlink()
    assert main(["bench", "--replot", str(out)]) == 0 and (out / "report.md").is_file()
    assert main(["bench", "--replot", str(tmp_path / "nothing")]) == 2  # clear error, no traceback
    bad = tmp_path / "bad.toml"
    bad.write_text("[bench]\nrepeats = 0\n")
    assert main(["bench", "--config", str(bad), "--out", str(tmp_path / "o2")]) == 2


@pytest.mark.slow
def test_real_model_peers_are_lossless(default_model, tmp_path):
    """HF generate and HF's early exit reproduce exitspec vanilla's greedy tokens on the real model."""
    from exitspec.prompts import mixed_prompts

    cfg = BenchConfig(num_prompts=1, max_new_tokens=12, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "hf-early-exit", "exit_layer": 12}])
    outcome = BenchRunner(cfg, default_model, mixed_prompts("heldout", 1)[:1], tmp_path, progress=False).run()
    rows = {r["label"]: r for r in outcome.rows}
    assert rows["hf-generate@T0"]["lossless_ok"] is True
    assert rows["hf-early-exit[exit_layer=12]@T0"]["lossless_ok"] is True
    assert rows["hf-early-exit[exit_layer=12]@T0"]["mean_accepted"] >= 0


def test_sampling_temperature_rows(tmp_path):
    """At T > 0 there is no audit or agreement, speedups use that temperature's vanillas, and the
    draft overlap is read at the run's temperature."""
    model = tiny_loaded("llama", layers=3)
    cfg = BenchConfig(num_prompts=2, max_new_tokens=5, repeats=1, warmup=0, temperatures=[0.8], bootstrap=50,
                      runs=[{"name": "hf-early-exit", "exit_layer": 1}, {"name": "lossy"}])
    outcome = BenchRunner(cfg, model, tiny_prompts()[:2], tmp_path, injected=INJECTED, progress=False).run()
    rows = {r["label"]: r for r in outcome.rows}
    assert list(rows) == ["vanilla@T0.8", "hf-generate@T0.8", "hf-early-exit[exit_layer=1]@T0.8", "lossy@T0.8"]
    assert all(r.get("lossless_ok") is None and r.get("agreement") is None for r in rows.values())
    assert rows["lossy@T0.8"]["perplexity"] > 0 and rows["lossy@T0.8"]["speedup"] > 0
    ee = rows["hf-early-exit[exit_layer=1]@T0.8"]
    assert ee["overlap_temperature"] == 0.8 and 0 < ee["overlap"] <= 1
    layers = SavedResults(tmp_path).layers
    assert {"overlap_T0.8", "overlap_T1", "tv_T0.8"} <= set(layers[0])
    assert json.loads((tmp_path / "audit.json").read_text())["ran"] is False


def test_interleaved_timing_gives_the_same_results_and_audit(tmp_path, tiny_run):
    """interleave = true runs every configuration on each prompt in turn: same tokens, same audit
    verdicts, same row set (a broken contender still becomes an error row), one process memory peak."""
    _, _, model = tiny_run
    cfg = BenchConfig(num_prompts=3, max_new_tokens=8, repeats=2, warmup=1, bootstrap=100, interleave=True,
                      runs=[{"name": "cheat"}, {"name": "lossy"}, {"name": "no-such-strategy"}])
    outcome = BenchRunner(cfg, model, tiny_prompts(), tmp_path, injected=INJECTED, progress=False).run()
    rows = {r["label"]: r for r in SavedResults(tmp_path).rows}
    assert set(rows) == {"vanilla@T0", "hf-generate@T0", "cheat@T0", "lossy@T0", "no-such-strategy@T0"}
    assert "unknown strategy" in rows["no-such-strategy@T0"]["status"]
    assert rows["cheat@T0"]["lossless_ok"] is False and rows["hf-generate@T0"]["lossless_ok"] is True
    assert [a.label for a in outcome.audit_failed] == ["cheat@T0"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert all(r["new_tokens"] == 3 * 8 and r["tokens_per_s"] > 0 for r in ok)
    assert len({r["peak_mem_mib"] for r in ok}) == 1
    seq = {r["label"]: r for r in SavedResults(tiny_run[0]).prompts if r["label"] in rows}
    inter = {r["label"]: r for r in SavedResults(tmp_path).prompts}
    assert all(inter[k]["tokens"] == seq[k]["tokens"] for k in seq)  # last prompt of each label: same tokens


def test_self_spec_rows_carry_the_cost_models_prediction_beside_the_measurement(tmp_path):
    """bench/prediction.py: the cycle's parts timed alone + the row's E[accepted] -> a predicted speedup,
    next to the measured decode-phase speedup, in results.csv and the report."""
    m = tiny_loaded("gpt2")
    cfg = BenchConfig(num_prompts=2, max_new_tokens=16, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "self-spec", "exit_layer": 5, "draft_len": 3}])
    outcome = BenchRunner(cfg, m, tiny_prompts(), tmp_path, progress=False).run()
    row = next(r for r in outcome.rows if r["name"] == "self-spec")
    assert row["cycle_ms"] > row["vanilla_step_ms"] > 0 and row["cost_context"] > 0
    # Leviathan's formula over the timed parts, at the row's own E[accepted]
    assert row["predicted_speedup"] == pytest.approx(
        row["vanilla_step_ms"] * (row["mean_accepted"] + 1) / row["cycle_ms"])
    assert row["measured_decode_speedup"] > 0
    gap = abs(row["measured_decode_speedup"] / row["predicted_speedup"] - 1)
    assert (row.get("prediction_note") is not None) == (gap > 0.10)
    finish(tmp_path)
    assert "## Cost model: predicted vs measured" in (tmp_path / "report.md").read_text()
    vanilla = next(r for r in outcome.rows if r["name"] == "vanilla")
    assert vanilla.get("predicted_speedup") is None


def test_lookup_tree_and_hybrid_rows_carry_the_cost_models_prediction(tmp_path):
    """Lookup, tree and hybrid rows: each verification priced as the vanilla forward x its cost timed
    alone + the row's host work (bench/prediction.py), predicted next to measured in the results and
    the report."""
    from exitspec.heads.bundle import HeadBundle

    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [3], "norm_lm")
    cfg = BenchConfig(num_prompts=2, max_new_tokens=24, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "lookup", "draft_len": 3}, {"name": "tree"},
                            {"name": "hybrid", "exit_layer": 3, "draft_len": 2, "draft_cost": 0.05}])
    outcome = BenchRunner(cfg, m, tiny_prompts(), tmp_path, progress=False).run()
    for name in ("lookup", "tree", "hybrid"):
        row = next(r for r in outcome.rows if r["name"] == name)
        assert row["predicted_speedup"] > 0 and row["mean_verified_rows"] >= 1.0, name
        assert 0 < row["host_ms"] < row["cycle_ms"], name
        gap = abs(row["measured_decode_speedup"] / row["predicted_speedup"] - 1)
        assert (row.get("prediction_note") is not None) == (gap > 0.10), name
    assert next(r for r in outcome.rows if r["name"] == "hybrid")["head_cycles"] is not None
    finish(tmp_path)
    assert "rows; host" in (tmp_path / "report.md").read_text().split("## Cost model: predicted vs measured")[1]


def test_cascade_rows_carry_cascadeexits_routing_table(tmp_path):
    """Teacher-forced routing of the run's own cascade outputs (bench/routing.py) reproduces the exits
    the decode took: per layer, the same token counts as the run's exit histogram."""
    from exitspec.heads.bundle import HeadBundle

    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    cfg = BenchConfig(num_prompts=3, max_new_tokens=16, repeats=1, warmup=0, quality=False,
                      runs=[{"name": "cascade", "exit_layers": "2,4", "threshold": 0.2, "score": "max_prob"}])
    outcome = BenchRunner(cfg, m, tiny_prompts(), tmp_path, progress=False).run()
    row = next(r for r in outcome.rows if r["name"] == "cascade")
    assert {k: v["tokens"] for k, v in row["routing"].items()} == row["exit_hist"]
    assert len(row["routing"]) > 1 and all(0 <= v["top1_agreement"] <= 1 for v in row["routing"].values())
    assert row["routing"][str(m.lm.num_layers)]["top1_agreement"] == 1.0  # the full model agrees with itself
    finish(tmp_path)
    assert "## Cascade routing" in (tmp_path / "report.md").read_text()

"""The sweep grid: TOML files, --run strings, expansion, baselines first, clear errors."""

from __future__ import annotations

import pytest

from exitspec.bench.config import BenchConfig, BenchConfigError, expand_grid, load_toml, parse_run


def test_expand_grid_is_the_cartesian_product_of_lists():
    assert expand_grid({"a": [1, 2], "b": 3}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert len(expand_grid({"a": [1, 2], "b": [3, 4, 5]})) == 6
    assert expand_grid({}) == [{}]
    with pytest.raises(BenchConfigError):
        expand_grid({"a": []})


def test_parse_run():
    assert parse_run("self-spec exit_layer=8,12 gamma=3") == {"name": "self-spec", "exit_layer": [8, 12], "gamma": 3}
    assert parse_run("cascade threshold=0.9 score=max_prob") == {"name": "cascade", "threshold": 0.9,
                                                                  "score": "max_prob"}
    assert parse_run("cascade exit_layers=8+16,12") == {"name": "cascade", "exit_layers": [[8, 16], 12]}
    with pytest.raises(BenchConfigError, match="key=value"):
        parse_run("self-spec 8")


def test_specs_put_both_vanillas_first_per_temperature():
    cfg = BenchConfig(temperatures=[0.0, 0.7],
                      runs=[{"name": "self-spec", "exit_layer": [4, 8], "gamma": 3}, {"name": "hf-generate"}])
    labels = [s.label for s in cfg.specs()]
    assert labels[:2] == ["vanilla@T0", "hf-generate@T0"]
    assert labels[2:4] == ["self-spec[exit_layer=4,gamma=3]@T0", "self-spec[exit_layer=8,gamma=3]@T0"]
    assert labels[4:6] == ["vanilla@T0.7", "hf-generate@T0.7"]
    assert len(labels) == len(set(labels)) == 8
    spec = cfg.specs()[2]
    assert (spec.exit_layer, spec.gamma, spec.is_peer) == (4, 3, False)
    # A list-valued option is one grid value when wrapped in a list.
    cascade = BenchConfig(runs=[{"name": "cascade", "exit_layers": [[8, 16], [12]]}]).specs()[2:]
    assert [s.opts for s in cascade] == [{"exit_layers": [8, 16]}, {"exit_layers": [12]}]


def test_load_toml(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('[bench]\nnum_prompts = 3\nmax_new_tokens = 16\n\n[[run]]\nname = "hf-early-exit"\n'
                    'exit_layer = [2, 4]\n')
    cfg = load_toml(path)
    assert (cfg.num_prompts, cfg.max_new_tokens) == (3, 16)
    assert [s.label for s in cfg.specs()][2:] == ["hf-early-exit[exit_layer=2]@T0", "hf-early-exit[exit_layer=4]@T0"]
    path.write_text("[bench]\nnum_promts = 3\n")
    with pytest.raises(BenchConfigError, match="num_promts"):
        load_toml(path)
    path.write_text("[bench\n")
    with pytest.raises(BenchConfigError, match="not valid TOML"):
        load_toml(path)
    with pytest.raises(FileNotFoundError):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(BenchConfigError, match="temperatures"):
        BenchConfig(temperatures=[-1.0]).validate()


def test_shipped_default_config_parses():
    from pathlib import Path

    cfg = load_toml(Path(__file__).resolve().parent.parent / "benchmarks" / "default.toml")
    names = {s.name for s in cfg.specs()}
    assert {"vanilla", "hf-generate", "hf-early-exit", "hf-prompt-lookup", "self-spec"} <= names
    assert cfg.num_prompts >= 20 and cfg.max_new_tokens == 128 and cfg.temperatures == [0.0]


def test_gemma3_config_runs_the_second_model_as_a_base_model_with_its_peers():
    from pathlib import Path

    cfg = load_toml(Path(__file__).resolve().parent.parent / "benchmarks" / "gemma3.toml")
    assert (cfg.model, cfg.chat, cfg.heads) == ("gemma3-270m", False, "default") and cfg.num_prompts >= 20
    specs = cfg.specs()
    assert {"vanilla", "hf-generate", "lookup", "self-spec", "hybrid", "llama.cpp"} <= {s.name for s in specs}
    assert any(s.name == "self-spec" and s.opts.get("draft_vocab") for s in specs)  # FR-Spec's reduced head
    assert {s.opts.get("spec") for s in specs if s.name == "llama.cpp"} == {None, "ngram-simple", "ngram-map-k",
                                                                           "ngram-cache"}


def test_runtime_options_pick_the_model_copy_not_the_strategy():
    """weights= and kv_cache= choose which loaded copy a spec runs on (and whose vanilla loop audits
    it); they never reach the strategy, and plain vanilla on any runtime is a baseline candidate."""
    specs = BenchConfig(runs=[{"name": "vanilla", "weights": "int4", "kv_cache": "float16"},
                              {"name": "lookup", "weights": "int4", "kv_cache": "float16", "draft_len": 2},
                              {"name": "lookup", "weights": "int4", "draft_len": 2}]).specs()
    specs = [s for s in specs if s.name != "hf-generate" and s.opts]  # baselines come first
    assert [s.runtime for s in specs] == ["int4+kv_cache=float16"] * 2 + ["int4"]
    assert specs[0].is_baseline and not specs[1].is_baseline
    assert specs[1].strategy_opts == {"draft_len": 2} and specs[1].kv_cache == "float16"
    assert BenchConfig().specs()[0].runtime == "dense"


def test_dense_baselines_off_keeps_only_the_configs_own_vanilla_runs():
    runs = [{"name": "vanilla", "weights": "int4"}, {"name": "cascade", "weights": "int4"}]
    labels = [s.label for s in BenchConfig(runs=runs, dense_baselines=False).specs()]
    assert labels == ["vanilla[weights=int4]@T0", "cascade[weights=int4]@T0"]
    assert {"vanilla@T0", "hf-generate@T0"} < {s.label for s in BenchConfig(runs=runs).specs()}
    with pytest.raises(BenchConfigError, match="vanilla"):
        BenchConfig(runs=runs[1:], dense_baselines=False).validate()


def test_eval_split_is_the_held_out_records_calibration_never_takes(tmp_path):
    import json

    from exitspec.bench.config import load_bench_prompts
    from exitspec.calibration.sequences import heldout_prompts

    path = tmp_path / "gsm8k" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"question": f"question {i}?", "answer": str(i)}) + "\n" for i in range(50)))
    cfg = BenchConfig(prompts=str(path), split="eval", num_prompts=100)
    evaluated = {p.text for p in load_bench_prompts(cfg)}
    calibrated = {p.text for p in heldout_prompts("calibrate", 100, path)}
    heldout = {p.text for p in load_bench_prompts(BenchConfig(prompts=str(path), num_prompts=100))}
    assert evaluated and calibrated and not evaluated & calibrated
    assert evaluated | calibrated == heldout
    with pytest.raises(BenchConfigError, match="eval"):
        BenchConfig(split="evaluate").validate()

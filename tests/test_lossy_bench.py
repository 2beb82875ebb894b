"""The bench's lossy-mode columns: token recovery rate, the cost split in layer-equivalents, the
threshold sweep and its speed-vs-quality plot (one tiny run shared by the tests)."""

from __future__ import annotations

import pytest

from conftest import tiny_loaded
from exitspec.bench import metrics
from exitspec.bench.config import BenchConfig, BenchConfigError, load_toml
from exitspec.bench.costs import cost_split
from exitspec.bench.report import finish
from exitspec.bench.runner import BenchRunner
from exitspec.decoding.exits import attention_share, head_cost
from exitspec.heads.bundle import HeadBundle
from helpers_bench import tiny_prompts

SWEEP = [0.2, 0.9]


@pytest.fixture(scope="module")
def lossy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lossy")
    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    cfg = BenchConfig(num_prompts=3, max_new_tokens=16, repeats=1, warmup=0, bootstrap=50, quality_layers=[2],
                      threshold_sweep=SWEEP,
                      runs=[{"name": "cascade", "exit_layers": "2,4", "score": "max_prob"},
                            {"name": "mlp-skip", "exit_layer": 2, "start_layer": 3},
                            {"name": "cascade", "exit_layers": "2,4", "threshold": 0.2, "adapt": 0.5,
                             "adapt_target": 0.5}])
    outcome = BenchRunner(cfg, m, tiny_prompts(), out, progress=False).run()
    return out, {r["label"]: r for r in outcome.rows}, m


def row(rows: dict, name: str, threshold: float, adapt: bool = False) -> dict:
    return next(r for label, r in rows.items()
                if r["name"] == name and r["threshold"] == threshold and ("adapt=" in label) == adapt)


def test_token_recovery_rate_counts_only_early_tokens():
    # tokens 0 and 2 exited early; token 0 is the full model's, token 2 is not; tokens 1, 3 came from the top
    assert metrics.token_recovery_rate([5, 6, 7, 8], [5, 1, 1, 1], [True, False, True, False]) == (1, 2)
    assert metrics.token_recovery_rate([5], [5], [False]) == (0, 0)
    with pytest.raises(ValueError, match="position for position"):
        metrics.token_recovery_rate([5, 6], [5], [True, True])


def test_trr_rows_agree_with_the_routing_table_and_the_layers_skipped(lossy_run):
    _, rows, m = lossy_run
    L = m.lm.num_layers
    cascade = row(rows, "cascade", 0.2)
    early = {k: v for k, v in cascade["routing"].items() if int(k) < L}
    assert cascade["trr_exited"] == sum(v["tokens"] for v in early.values()) > 0
    recovered = sum(v["tokens"] * v["top1_agreement"] for v in early.values())
    assert cascade["trr"] == pytest.approx(recovered / cascade["trr_exited"])
    # mlp-skip: the teacher-forced probe settles exactly the steps that skipped (their layers say how many)
    skip = row(rows, "mlp-skip", 0.2)
    saved = L * skip["new_tokens"] - skip["layers_per_token"] * skip["new_tokens"]
    assert skip["trr_exited"] * (L - 3) * (1 - attention_share(m.lm)) == pytest.approx(saved)
    assert skip["trr_exited"] > 0 and 0.0 <= skip["trr"] <= 1.0
    assert rows["vanilla@T0"].get("trr") is None  # lossless rows exit nowhere early


def test_cost_split_by_hand():
    v = cost_split(6, 2.0, 4, 24.0, {6: 4})  # vanilla: every layer, one head per token
    assert (v["path"], v["recomputed"], v["skipped"], v["gates"], v["head"], v["vs_vanilla"]) == (6, 0, 0, 0, 2, 1)
    # 3 tokens left at layer 2, one at the top; 20 layers run: 12 on their paths, 8 later (deferred)
    c = cost_split(6, 2.0, 4, 20.0, {2: 3, 6: 1}, {"precheck_heads": 0.5, "exit_heads": 3.5})
    assert (c["path"], c["recomputed"], c["skipped"]) == (3.0, 2.0, 1.0)
    assert c["gates"] == pytest.approx(4.0 * 2.0 / 4) and c["head"] == pytest.approx(2.0 / 4)
    assert c["total"] == pytest.approx(3 + 2 + 2 + 0.5) and c["vs_vanilla"] == pytest.approx(7.5 / 8)
    assert cost_split(6, 2.0, 0, 0.0, {}) is None


def test_cost_split_rows(lossy_run):
    _, rows, m = lossy_run
    L, hc = m.lm.num_layers, head_cost(m.lm)
    v = rows["vanilla@T0"]["cost_split"]
    assert v["path"] == L and v["head"] == pytest.approx(hc) and v["vs_vanilla"] == pytest.approx(1.0)
    c = row(rows, "cascade", 0.2)
    split = c["cost_split"]
    assert split["gates"] > 0 and split["path"] < L and split["adapt"] == 0
    assert split["path"] + split["recomputed"] == pytest.approx(c["layers_per_token"])
    s = row(rows, "mlp-skip", 0.2)["cost_split"]
    assert s["skipped"] > 0 and s["recomputed"] == 0 and s["head"] == pytest.approx(hc)
    adapting = row(rows, "cascade", 0.2, adapt=True)["cost_split"]
    assert adapting["adapt"] > 0  # the per-request teacher pass over the prompt window


def test_threshold_sweep_expands_only_the_lossy_runs_without_a_threshold(tmp_path):
    cfg = BenchConfig(threshold_sweep=[0.5, 0.9], runs=[{"name": "cascade"}, {"name": "mlp-skip", "exit_layer": 2},
                                                        {"name": "cascade", "threshold": 0.3}, {"name": "self-spec"}])
    labels = [s.label for s in cfg.specs()]
    assert labels == ["vanilla@T0", "hf-generate@T0", "cascade[threshold=0.5]@T0", "cascade[threshold=0.9]@T0",
                      "mlp-skip[exit_layer=2,threshold=0.5]@T0", "mlp-skip[exit_layer=2,threshold=0.9]@T0",
                      "cascade[threshold=0.3]@T0", "self-spec@T0"]
    for bad in ([], [0.5, 1.5], [True], 0.9):
        with pytest.raises(BenchConfigError, match="threshold_sweep must be"):
            BenchConfig(threshold_sweep=bad, runs=[{"name": "cascade"}]).specs()
    with pytest.raises(BenchConfigError, match="has none"):
        BenchConfig(threshold_sweep=[0.5], runs=[{"name": "self-spec"}, {"name": "cascade", "threshold": 0.3}]).specs()
    path = tmp_path / "sweep.toml"
    path.write_text('[bench]\nthreshold_sweep = [0.6, 0.8]\n\n[[run]]\nname = "mlp-skip"\n')
    assert [s.opts.get("threshold") for s in load_toml(path).specs()] == [None, None, 0.6, 0.8]


def test_report_and_threshold_pareto_plot(lossy_run):
    out, rows, _ = lossy_run
    assert {r["threshold"] for r in rows.values() if r["name"] == "mlp-skip"} == set(SWEEP)
    figures = finish(out)
    assert "threshold_pareto" in figures
    assert (out / "threshold_pareto.png").stat().st_size > 1000 and (out / "threshold_pareto.pdf").is_file()
    report = (out / "report.md").read_text()
    assert "| TRR |" in report and "## Where the work goes (layer-equivalents per token)" in report
    assert "![threshold_pareto](threshold_pareto.png)" in report


def test_gsm8k_answers_are_compared_up_to_eos_and_only_where_vanillas_answer_ended(tmp_path):
    from exitspec.bench.results import read_jsonl
    from exitspec.prompts import Prompt

    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    prompts = [Prompt("Tom has 3 apples and", "gsm8k", "a"), Prompt("A train leaves at 4 and", "gsm8k", "b")]
    cfg = BenchConfig(num_prompts=2, max_new_tokens=12, repeats=1, warmup=0, bootstrap=20, quality=False,
                      runs=[{"name": "cascade", "exit_layers": "2,4", "score": "max_prob", "threshold": 0.0}])

    def run(eos: set[int], out):
        runner = BenchRunner(cfg, m, prompts, out, progress=False)
        runner.eos_ids = eos
        runner.run()
        return runner, {(r["label"], r["prompt_id"]): r for r in read_jsonl(out / "results.jsonl")}

    first, _ = run(set(), tmp_path / "a")
    vanilla = first.vanilla_tokens["dense"]
    # An EOS only prompt a's vanilla answer holds: a's answer ends there, b's is cut off by the budget.
    eos = {vanilla[0][5]} - set(vanilla[1])
    assert eos, "pick a token of prompt a's answer that prompt b's lacks"
    _, recs = run(eos, tmp_path / "b")
    label = next(lab for lab, _ in recs if lab.startswith("cascade"))
    a, b = recs[(label, "a")], recs[(label, "b")]
    assert "answer_agreement" in a and "answer_agreement" not in b
    decode = m.tokenizer.decode
    expected = metrics.answer_agreement(decode(metrics.until_eos(a["tokens"], eos), skip_special_tokens=True),
                                        decode(metrics.until_eos(vanilla[0], eos), skip_special_tokens=True))
    assert a["answer_agreement"] == expected

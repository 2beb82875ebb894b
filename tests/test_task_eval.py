"""Task accuracy through lm-evaluation-harness (bench/tasks.py): log-likelihoods under the
distribution each mode emits from (exact for cascade under teacher forcing), generation through the
mode, and the harness itself on small local task files."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny_model, tiny_loaded
from exitspec.bench.tasks import TaskScorer
from exitspec.heads.bundle import HeadBundle
from exitspec.runtime.sequences import teacher_pass
from helpers_bench import cascade_decoded_and_routed

CONTEXT, CONTINUATION = "the cat sat on", " the mat today"


def full_model_loglikelihood(m, ctx: list[int], cont: list[int]) -> float:
    logits = teacher_pass(m.lm, torch.tensor([ctx + cont]), []).logits[0, len(ctx) - 1:-1]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(cont)[:, None]).sum())


def test_lossless_modes_score_with_the_full_models_distribution():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [2], "norm_lm")
    scorer = TaskScorer(m)
    ctx, cont = scorer._pair(CONTEXT, CONTINUATION)
    assert ctx + cont == scorer.encode(CONTEXT + CONTINUATION) and len(cont) > 3
    want = full_model_loglikelihood(m, ctx, cont)
    assert scorer.loglikelihood(CONTEXT, CONTINUATION)[0] == pytest.approx(want, rel=1e-5)
    assert TaskScorer(m, "self-spec", exit_layer=2).loglikelihood(CONTEXT, CONTINUATION)[0] == pytest.approx(
        want, rel=1e-5)
    assert scorer.loglikelihood("", CONTINUATION)[0] == scorer.loglikelihood_rolling(CONTINUATION)


def test_cascade_scores_with_the_exit_it_would_emit_from():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [3], "norm_lm")
    ids = TaskScorer(m).encode(CONTEXT + CONTINUATION)
    start = len(TaskScorer(m).encode(CONTEXT))
    opts = dict(exit_layers=[3], precheck_vocab=0)
    always = TaskScorer(m, "cascade", threshold=0.0, **opts).routed_logprobs(ids, start)  # every token exits at 3
    never = TaskScorer(m, "cascade", threshold=1.0, **opts).routed_logprobs(ids, start)  # none does
    tp = teacher_pass(m.lm, torch.tensor([ids]), [3])
    rows = slice(start - 1, len(ids) - 1)
    torch.testing.assert_close(always, torch.log_softmax(m.lm.logits(tp.hidden[3][0, rows]).float(), -1))
    torch.testing.assert_close(never, torch.log_softmax(tp.logits[0, rows].float(), -1))


def test_teacher_forced_cascade_is_exactly_what_it_decodes():
    """Greedy cascade output, re-scored by teacher forcing: every token is the argmax of the routed
    distribution at its position (deferred recomputation makes each position's states the full model's)."""
    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    _, _, gen, routed = cascade_decoded_and_routed(m, dict(exit_layers=[2, 4], threshold=0.2, score="max_prob"))
    assert routed.argmax(-1).tolist() == gen


def test_modes_without_an_exact_teacher_forced_distribution_are_refused_for_loglikelihood():
    m = tiny_loaded("llama")
    m.heads = HeadBundle.create(m.lm, [3], "norm_lm")
    with pytest.raises(ValueError, match="use generation tasks"):
        TaskScorer(m, "mlp-skip", exit_layer=3, threshold=0.5).loglikelihood(CONTEXT, CONTINUATION)
    with pytest.raises(ValueError, match="state_propagation"):
        TaskScorer(m, "cascade", exit_layers=[3], threshold=0.5, state_propagation=True).loglikelihood(
            CONTEXT, CONTINUATION)
    with pytest.raises(ValueError):  # a bad option fails before any task runs
        TaskScorer(m, "cascade", exit_layers=[3], threshold=0.5, colour=1)


def test_generation_goes_through_the_mode_and_stops_at_the_tasks_strings():
    m = tiny_loaded("llama")
    scorer = TaskScorer(m)
    free = scorer.generate_until(CONTEXT, [], 12)
    assert len(free) > 0
    stop = free[len(free) // 2]
    cut = scorer.generate_until(CONTEXT, [stop], 12)
    assert stop not in cut and free.startswith(cut)


def test_the_harness_scores_local_tasks_through_exitspec(tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (the eval extra)")
    from lm_eval.tasks import TaskManager

    from exitspec.bench.tasks import register

    register()
    folder = save_tiny_model(tmp_path / "model")
    docs = [{"question": f"q{i} the cat", "choices": [" sat", " ran", " dog"], "answer": i % 3} for i in range(4)]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, kind, extra in (("tiny_mc", "multiple_choice", 'doc_to_choice: "{{choices}}"\n'
                                                            "metric_list:\n  - metric: acc\n"),
                              ("tiny_gen", "generate_until",
                               'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
                               "metric_list:\n  - metric: exact_match\n")):
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
            f"test_split: test\noutput_type: {kind}\ndoc_to_text: \"{{{{question}}}}\"\n"
            f"doc_to_target: \"{{{{answer}}}}\"\n{extra}")
    out = lm_eval.simple_evaluate(model="exitspec", model_args=f"model={folder},strategy=vanilla",
                                  tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tasks)))
    assert 0.0 <= out["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["tiny_gen"]


def test_gsm8k_script_lm_evals_vanilla_is_plain_generation_question_by_question(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (the eval extra)")
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_eval_gsm8k.py"
    spec = importlib.util.spec_from_file_location("lm_eval_gsm8k", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    folder = save_tiny_model(tmp_path / "model", chat_template=(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"))
    data = tmp_path / "gsm8k" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"question": f"Tom has {i} cats and {i + 2} dogs. How many?",
                                        "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"}) + "\n"
                            for i in range(6)))
    out = tmp_path / "out"
    rc = mod.main(["--model", str(folder), "--weights", "dense", "--heads", "none", "--questions", str(data),
                   "--split", "all", "--limit", "3", "--max-gen-toks", "6", "--out", str(out)])
    report = (out / "report.md").read_text()
    assert rc == 0 and "identical text on 3/3" in report
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["vanilla"] for s in samples] == [s["direct_vanilla"] for s in samples]
    assert [s["reference"] for s in samples] == ["2", "4", "6"]

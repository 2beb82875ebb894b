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
    import exitspec

    m = tiny_loaded("gpt2")
    m.heads = HeadBundle.create(m.lm, [2, 4], "norm_lm")
    opts = dict(exit_layers=[2, 4], threshold=0.2, score="max_prob")
    scorer = TaskScorer(m, "cascade", **opts)
    prompt = scorer.encode("once upon a time")
    out = exitspec.generate(m, None, prompt_ids=[prompt], strategy="cascade", max_new_tokens=24, ignore_eos=True,
                            **opts)
    gen = out.token_ids[0]
    assert len(set(out.stats.exit_histogram)) > 1  # some tokens left early, some did not
    routed = scorer.routed_logprobs(prompt + gen, len(prompt))
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

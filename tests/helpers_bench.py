"""Test helpers for the benchmark suite: strategies that lie about being lossless, tiny prompt sets."""

from __future__ import annotations

from exitspec.decoding.strategies.vanilla import Vanilla
from exitspec.decoding.strategy import DecodeState, StepOutput
from exitspec.prompts import Prompt


class PerturbingVanilla(Vanilla):
    """Vanilla decoding that swaps its third token for another one, yet claims lossless=True:
    exactly the bug the benchmark's lossless audit exists to catch."""

    name = "cheat"
    lossless = True

    def __init__(self, at_step: int = 2):
        self.at_step = at_step
        self.steps = 0

    def step(self, state: DecodeState) -> StepOutput:
        out = super().step(state)
        if self.steps == self.at_step:
            out.tokens = [[(t[0] + 1) % state.lm.vocab_size] for t in out.tokens]
        self.steps += 1
        return out


class HonestLossy(PerturbingVanilla):
    """The same perturbation, declared lossy: the audit must leave it alone (agreement < 1 instead)."""

    name = "lossy"
    lossless = False


class SelfDescribed(Vanilla):
    """Vanilla that reports an exit layer it chose itself (as strategies using a bundle's recommended
    settings do): the benchmark must record it although the run did not set it."""

    name = "described"

    def describe(self) -> dict:
        return {"strategy": self.name, "exit_layer": 2, "draft_len": 3}


INJECTED = {"cheat": lambda model, **_: PerturbingVanilla(), "lossy": lambda model, **_: HonestLossy(),
            "described": lambda model, **_: SelfDescribed()}


def tiny_prompts() -> list[Prompt]:
    return [Prompt("hello world, this is", "chat", "a"), Prompt("def f(x): return", "code", "b"),
            Prompt("one two three four", "chat", "c")]


class Interrupting(Vanilla):
    """Raises KeyboardInterrupt on its first step, as Ctrl-C in the middle of a sweep would."""

    name = "interrupt"

    def step(self, state: DecodeState) -> StepOutput:
        raise KeyboardInterrupt


INJECTED["interrupt"] = lambda model, **_: Interrupting()


def write_mt_bench(path) -> None:
    """A tiny prompt file in the MT-Bench / Spec-Bench format (question_id, category, turns)."""
    import json

    recs = [{"question_id": 81 + i, "category": cat, "turns": [text, "and a follow-up"]}
            for i, (cat, text) in enumerate([("writing", "Write a poem"), ("math", "What is 2+2?"),
                                              ("coding", "def add(a, b):"), ("writing", "Tell a story")])]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")


def cascade_decoded_and_routed(m, opts: dict, new_tokens: int = 24):
    """Greedy cascade output on a fixed prompt and its teacher-forced routing through the lm-eval
    scorer: (scorer, prompt ids, generated ids, routed log-probabilities (len(gen), V)). Checks that
    the run is a real test of routing: some tokens left at an exit, some at the top."""
    import exitspec
    from exitspec.bench.tasks import TaskScorer

    scorer = TaskScorer(m, "cascade", **opts)
    prompt = scorer.encode("once upon a time")
    out = exitspec.generate(m, None, prompt_ids=[prompt], strategy="cascade", max_new_tokens=new_tokens,
                            ignore_eos=True, **opts)
    gen = out.token_ids[0]
    assert len(set(out.stats.exit_histogram)) > 1  # some tokens left early, some did not
    return scorer, prompt, gen, scorer.routed_logprobs(prompt + gen, len(prompt))

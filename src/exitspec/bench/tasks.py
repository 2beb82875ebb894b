"""Task accuracy of a decoding mode: an lm-evaluation-harness model backed by exitspec.

    exitspec lm-eval --model exitspec --model_args model=default,strategy=cascade,threshold=0.9 \
        --tasks gsm8k_local --include_path my_tasks/          # any lm_eval CLI arguments after these

The harness asks a model for two things, and both go through the chosen mode, so a lossy mode is
judged as it decodes, not as the full model:
- `generate_until` (GSM8K-style tasks): exitspec.generate with the strategy and its options, the
  task's stop strings and token budget.
- `loglikelihood` (multiple choice): the log-probability of the continuation under the distribution
  the mode would emit each token from. For the lossless strategies (vanilla, self-spec, lookup, hybrid, dssd)
  that is the full model's. For cascade it is the distribution of the shallowest confident exit at
  each position, else the full model's (bench/routing.py: teacher-forced routing, exact for
  cascade). With cascade's exit_vocab=N an exited position's distribution is the renormalised one
  over the exit's N most frequent tokens: a continuation token outside them has log-probability -inf
  there (the mode can never emit it from that exit). Modes whose states depend on earlier decisions
  (mlp-skip; cascade with state_propagation) are refused for loglikelihood with that reason; their
  generation tasks run.

`TaskScorer` holds the logic and needs no lm_eval; `register()` wraps it as lm_eval's `LM` subclass
(lm-eval is the optional `eval` extra). Task configs that read local files (a JSONL per split via
`dataset_path: json`) need no hub access at run time.
"""

from __future__ import annotations

import functools

import torch

from exitspec.bench.config import parse_scalar
from exitspec.bench.routing import route
from exitspec.decoding.api import generate, make_strategy
from exitspec.decoding.strategies.cascade import Cascade

EXTRA_HINT = "pip install 'exitspec[eval]' (lm-evaluation-harness)"
# Strategies whose emitted distribution is the full model's (lossless) or routed exactly (cascade).
FULL_MODEL = ("vanilla", "self-spec", "lookup", "hybrid", "dssd")


class TaskScorer:
    """lm-eval's questions answered through one exitspec decoding mode on a loaded model."""

    def __init__(self, model, strategy: str = "vanilla", chat: bool = False, **options):
        self.model, self.strategy, self.chat, self.options = model, strategy, bool(chat), options
        # Built once: bad options fail here, before any task runs, and every log-likelihood reuses it
        # (routing reads only its exits and gates; generation builds a fresh one, which may keep state).
        self.routing_strategy = make_strategy(strategy, model, **options)

    # --- tokens ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.chat:
            from exitspec.decoding.api import encode_prompt  # start-up: only chat-formatted tasks use it

            return encode_prompt(self.model.tokenizer, text, chat=True)
        return self.model.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's HF model splits them: trailing spaces of the
        context move to the continuation, and the continuation is what the joint encoding adds."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context) if context else []
        if not ctx:  # nothing to condition on: start from the BOS (else EOS) token
            start = self.model.tokenizer.bos_token_id
            ctx = [start if start is not None else self.model.tokenizer.eos_token_id]
            return ctx, whole[1:] if whole[:1] == ctx else whole
        return ctx, whole[len(ctx):]

    # --- the mode's distributions ------------------------------------------------------------------
    def routed_logprobs(self, ids: list[int], start: int) -> torch.Tensor:
        """(len(ids) - start, V) log-probabilities the mode emits tokens ids[start:] from (cascade with
        exit_vocab: -inf outside the exit's subset at the positions an exit takes)."""
        strategy = self.routing_strategy
        if not isinstance(strategy, Cascade) and self.strategy not in FULL_MODEL:
            raise ValueError(f"loglikelihood through {self.strategy!r} is not defined: its states depend on its "
                             f"earlier decisions; use generation tasks for it, or one of {', '.join(FULL_MODEL)}, "
                             "cascade")
        return torch.log_softmax(route(self.model, strategy, ids, start).logits, -1)

    # --- what lm-eval asks ---------------------------------------------------------------------------
    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """(log p(continuation | context), whether every continuation token is the mode's argmax)."""
        ctx, cont = self._pair(context, continuation)
        if not cont:
            return 0.0, True
        logp = self.routed_logprobs(ctx + cont, len(ctx))  # (n, V)
        target = torch.tensor(cont, device=logp.device)
        return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())

    def loglikelihood_rolling(self, text: str) -> float:
        return self.loglikelihood("", text)[0]

    def generate_until(self, context: str, until: list[str], max_tokens: int, temperature: float = 0.0,
                       seed: int | None = None) -> str:
        out = generate(self.model, None, prompt_ids=[self.encode(context)], strategy=self.strategy,
                       max_new_tokens=max_tokens, temperature=temperature, seed=seed, stop=list(until),
                       **self.options)
        return out.texts[0]


def _value(v):
    """A model_args value from lm-eval's "k=v" string: numbers and booleans as such."""
    return parse_scalar(v) if isinstance(v, str) else v


@functools.cache
def register() -> type:
    """Register and return the `exitspec` model class of lm-evaluation-harness (once per process: the
    harness's registry refuses a second class under the same name)."""
    try:
        from lm_eval.api.model import LM  # optional: the eval extra
        from lm_eval.api.registry import register_model  # optional: the eval extra
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"task evaluation needs lm-evaluation-harness: {EXTRA_HINT}") from err
    from exitspec.loading import load  # start-up: loading only when the harness builds the model

    class ExitspecLM(LM):
        """lm_eval --model exitspec --model_args model=...,heads=...,strategy=...,<strategy options>."""

        def __init__(self, model: str = "default", heads: str | None = None, weights: str | None = None,
                     strategy: str = "vanilla", chat: bool = False, max_gen_toks: int = 256, device: str = "cpu",
                     batch_size=None, **options):
            super().__init__()
            kw = {"weights": weights} if weights else {}
            loaded = load(model, heads=heads, device=device, **kw)
            self.scorer = TaskScorer(loaded, strategy, chat=_value(chat), **{k: _value(v) for k, v in options.items()})
            self.max_gen_toks = int(max_gen_toks)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return [self.scorer.loglikelihood(*r.args) for r in requests]

        def loglikelihood_rolling(self, requests) -> list[float]:
            return [self.scorer.loglikelihood_rolling(r.args[0]) for r in requests]

        def generate_until(self, requests) -> list[str]:
            out = []
            for r in requests:
                context, kw = r.args
                until = kw.get("until") or []
                temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
                out.append(self.scorer.generate_until(context, [until] if isinstance(until, str) else list(until),
                                                      int(kw.get("max_gen_toks", self.max_gen_toks)), temperature))
            return out

    register_model("exitspec")(ExitspecLM)
    return ExitspecLM

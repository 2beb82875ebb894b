"""The Python API of decoding: `generate()` returns results, `stream()` yields events.

    import exitspec
    m = exitspec.load("default")
    out = exitspec.generate(m, "Write a haiku about caches.", strategy="vanilla", max_new_tokens=64)
    print(out.texts[0], out.stats.tokens_per_s)

Prompts may be a string (wrapped as one user chat message when the tokenizer has a chat template
and chat=True), a list of chat messages, or a batch (list) of either.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from exitspec.decoding.driver import GenerateConfig, GenerationError, decode
from exitspec.decoding.events import DoneEvent, Event, GenerationStats
from exitspec.decoding.exits import StrategyOptionError
from exitspec.decoding.sampling import SamplingParams
from exitspec.decoding.strategies.vanilla import Vanilla
from exitspec.decoding.strategy import Strategy

Prompt = str | Sequence[dict]

# name -> factory(model, **options) -> Strategy. Strategy modules register themselves here.
def _make_vanilla(model) -> Strategy:
    return Vanilla()


STRATEGIES: dict[str, Callable[..., Strategy]] = {"vanilla": _make_vanilla}


class NoHeadsWarning(UserWarning):
    """A strategy that drafts or exits from heads runs with none attached (untrained logit-lens heads)."""


def register_strategy(name: str, factory: Callable[..., Strategy]) -> None:
    STRATEGIES[name] = factory


def make_strategy(name: str | Strategy, model, **options) -> Strategy:
    if isinstance(name, Strategy):
        return name
    _load_builtin_strategies()
    if name not in STRATEGIES:
        raise GenerationError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(STRATEGIES))}")
    factory = STRATEGIES[name]
    check_options(name, factory, options)
    strategy = factory(model, **(recommended_options(model, name, options) | options))
    if strategy.needs_heads and getattr(model, "heads", None) is None:
        warnings.warn(no_heads_message(name), NoHeadsWarning, stacklevel=2)
    return strategy


def no_heads_message(name: str) -> str:
    return (f"strategy {name!r} reads exit heads and none are attached, so it runs untrained logit-lens heads "
            "(norm_lm), whose drafts are rarely accepted: slower than vanilla. Attach trained heads: --heads "
            "default (the bundle shipped for the loaded model, where one is) or a folder from `exitspec train`; in "
            "Python exitspec.load(..., heads=...) / exitspec.attach_heads")


# The one rule every strategy's options follow, read from its factory's signature: an unknown name
# is refused, and an option annotated as an integer, a boolean or a string takes exactly that (8.5,
# true or [1, 2] is not an integer; nothing is rounded). Unannotated options (exit layer lists,
# thresholds, draft vocabularies) are checked by the factory itself.
_KINDS = {"int": (int,), "bool": (bool,), "str": (str,), "float": (int, float)}


def check_options(name: str, factory: Callable[..., Strategy], options: dict) -> None:
    params = list(inspect.signature(factory).parameters.values())[1:]  # after `model`
    named = {p.name: p for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(options) - set(named))
    if unknown:
        takes = f"it takes {', '.join(named)}" if named else "it takes no options"
        raise StrategyOptionError(f"{name} has no option(s) {unknown}; {takes}")
    for key, value in options.items():
        ann = named[key].annotation
        if not isinstance(ann, str):
            ann = getattr(ann, "__name__", "") if isinstance(ann, type) else ""
        kinds = [k.strip() for k in ann.split("|")] if ann else []
        if not kinds or any(k not in _KINDS and k != "None" for k in kinds):
            continue  # unannotated or structured: the factory checks it
        if value is None and "None" in kinds:
            continue
        ok = any(isinstance(value, _KINDS[k]) and (k == "bool" or not isinstance(value, bool))
                 for k in kinds if k != "None")
        if not ok:
            want = " or ".join({"int": "an integer", "bool": "true or false", "str": "a string",
                                "float": "a number"}[k] for k in kinds if k != "None")
            raise StrategyOptionError(f"{name} option {key} must be {want}, got {value!r}")


def recommended_options(model, name: str, options: dict) -> dict:
    """The attached bundle's recommended settings for `name`, as one set: used only when the caller
    names no exit layer (a recommended draft length belongs to the recommended layer)."""
    bundle = model.heads
    if bundle is None or options.get("exit_layer") is not None or options.get("exit_layers") is not None:
        return {}
    return dict(bundle.config.recommended.get(name, {}))


def _load_builtin_strategies() -> None:
    """Import the strategy modules that register themselves (kept lazy: vanilla needs none)."""
    for name in ("self_spec", "dssd", "cascade", "mlp_skip", "lookup", "hybrid", "tree_lookup"):
        mod = f"exitspec.decoding.strategies.{name}"
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


def is_batch(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return False
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
        return False  # one conversation
    return isinstance(prompts, Sequence)


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of one prompt, through the chat template when there is one and chat is on."""
    if isinstance(prompt, str):
        if chat and getattr(tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        else:
            return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not isinstance(prompt, Sequence) or not prompt or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        raise GenerationError("a prompt must be a string or a non-empty list of {'role', 'content'} messages")
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError("this tokenizer has no chat template; pass plain text prompts")
    ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


@dataclass
class GenerationResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats

    @property
    def text(self) -> str:
        return self.texts[0]


def stream(
    model,
    prompts: Prompt | Sequence[Prompt],
    *,
    strategy: str | Strategy = "vanilla",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chat: bool = True,
    ignore_eos: bool = False,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    **strategy_options,
) -> Iterator[Event]:
    """Yield TokenEvent / FinishEvent / DoneEvent for one prompt or a batch (see decoding/events.py).

    `model` is what `exitspec.load()` returns. `prompt_ids` bypasses tokenisation.
    """
    if prompt_ids is None:
        batch = list(prompts) if is_batch(prompts) else [prompts]
        prompt_ids = [encode_prompt(model.tokenizer, p, chat) for p in batch]
    config = GenerateConfig(
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=list(stop),
        ignore_eos=ignore_eos,
    )
    strat = make_strategy(strategy, model, **strategy_options)
    yield from decode(model.lm, model.tokenizer, [list(p) for p in prompt_ids], strat, config,
                      heads=model.heads)


def generate(model, prompts: Prompt | Sequence[Prompt], **kwargs) -> GenerationResult:
    """Run `stream()` to the end and return texts, token ids, finish reasons and stats."""
    done = None
    for ev in stream(model, prompts, **kwargs):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None
    return GenerationResult(texts=done.texts, token_ids=done.token_ids,
                            finish_reasons=done.finish_reasons, stats=done.stats)

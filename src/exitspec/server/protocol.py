"""Request bodies of the OpenAI API -> validated `CompletionRequest`s, and OpenAI-style errors.

Validation happens here, before a request reaches the decode worker, so every mistake a client can
make is answered with a 4xx JSON error naming the offending field, and nothing the client sends can
raise inside the worker. Fields we do not implement (tools, logprobs, penalties, n > 1, ...) are
refused rather than silently ignored: a client that asked for them would otherwise get an answer
that looks right and is not. Unknown fields are refused too, as OpenAI does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from exitspec.decoding.sampling import MAX_TEMPERATURE, SEED_MAX, SEED_MIN

# Fields accepted and deliberately ignored: they do not change what is generated.
_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
                "seed", "n", "stream", "stream_options", "exitspec", "logprobs", "top_logprobs", "tools",
                "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                "presence_penalty", "frequency_penalty", "modalities", "audio", "prediction"} | _IGNORED
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
                      "stream_options", "exitspec", "logprobs", "echo", "best_of", "suffix", "logit_bias",
                      "presence_penalty", "frequency_penalty"} | _IGNORED
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 16


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class CompletionRequest:
    """One validated request; `prompt` is still text/messages (tokenised by the app)."""

    kind: str  # "chat" or "completion"
    model: str
    prompt: str | list[dict] | list[int]  # text, chat messages, or token ids (completions only)
    max_tokens: int | None  # None: the server's default (capped by the context)
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    strategy: str | None = None  # None: the server's --strategy
    options: dict = field(default_factory=dict)  # strategy options from the "exitspec" extension


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f"the request body is not valid JSON ({err}); send a JSON object", code="invalid_json") from None
    except RecursionError:  # the parser recurses per nesting level
        raise bad("the request body nests JSON too deeply; send a flat JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    _check_strings(body)
    return body


def _check_strings(body: dict) -> None:
    """Refuse text that is not Unicode: JSON's "\\ud800" escape decodes to a lone surrogate, which no
    tokenizer can encode. Walked without recursion (the body may nest as deep as the parser allowed)."""
    todo: list[tuple[str, Any]] = [(k, v) for k, v in body.items()]
    while todo:
        path, v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise bad(f"'{path}' holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                          "text; send valid UTF-16 pairs or the characters themselves", path) from None
        elif isinstance(v, dict):
            todo += [(f"{path}.{k}", x) for k, x in v.items()]
        elif isinstance(v, list):
            todo += [(f"{path}[{i}]", x) for i, x in enumerate(v)]


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{name}' must be a number, got {v!r}", name)
    if v > hi or v < lo or (lo_open and v == lo):
        left = "(" if lo_open else "["
        raise bad(f"'{name}' must be in {left}{lo}, {hi}], got {v}", name)
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer, got {v!r}", name)
    return v


def _max_tokens(body: dict, names: tuple[str, ...]) -> int | None:
    given = {n: _int(body, n) for n in names if body.get(n) is not None}
    if len(set(given.values())) > 1:
        raise bad(f"{' and '.join(given)} disagree; send one of them", names[0])
    for name, v in given.items():
        if v <= 0:
            raise bad(f"'{name}' must be a positive integer, got {v}", name)
        return v
    return None


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return stops


def _unsupported(param: str, what: str, fix: str | None = None) -> APIError:
    return bad(f"{what} is not supported by the exitspec server; {fix or f'remove {param!r}'}", param,
               code="unsupported")


def _refuse_unsupported(body: dict, allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise bad(f"unrecognized request argument supplied: '{name}'", name, code="unknown_parameter")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise _unsupported("n", f"n={n} (several choices per request)", "send n=1, or one request per choice")
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise _unsupported("best_of", f"best_of={best_of}")
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise _unsupported(name, f"'{name}'")
    if body.get("tool_choice") not in (None, "none"):
        raise _unsupported("tool_choice", "tool calling")
    if body.get("function_call") not in (None, "none"):
        raise _unsupported("function_call", "function calling")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise _unsupported("logprobs", "logprobs")
    if body.get("echo"):
        raise _unsupported("echo", "echo")
    if body.get("suffix") is not None:
        raise _unsupported("suffix", "suffix (insertion)")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise _unsupported(name, f"a non-zero {name}")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _unsupported("response_format", "structured output (response_format other than text)")
    if body.get("modalities") not in (None, ["text"]):
        raise _unsupported("modalities", "output modalities other than text")
    for name in ("audio", "prediction"):
        if body.get(name) is not None:
            raise _unsupported(name, f"'{name}'")


def _stream_options(body: dict, stream: bool) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not stream:
        raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if not isinstance(so, dict) or set(so) - {"include_usage", "include_obfuscation"}:
        raise bad("'stream_options' must be an object with 'include_usage' (a boolean)", "stream_options")
    return bool(so.get("include_usage", False))


def _extension(body: dict) -> tuple[str | None, dict]:
    ext = body.get("exitspec")
    if ext is None:
        return None, {}
    if not isinstance(ext, dict) or set(ext) - {"strategy", "options"}:
        raise bad("'exitspec' must be an object {'strategy': name, 'options': {...}}", "exitspec")
    strategy, options = ext.get("strategy"), ext.get("options") or {}
    if strategy is not None and (not isinstance(strategy, str) or not strategy):
        raise bad("'exitspec.strategy' must be a strategy name such as 'vanilla' or 'self-spec'", "exitspec.strategy")
    if not isinstance(options, dict):
        raise bad("'exitspec.options' must be an object of strategy options", "exitspec.options")
    return strategy, options


def _common(body: dict, kind: str, prompt: Any, max_names: tuple[str, ...]) -> CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required: the id from GET /v1/models", "model", code="missing_model")
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise bad("'stream' must be a boolean", "stream")
    seed = _int(body, "seed")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise bad(f"'seed' must be an integer in [-2^63, 2^64), got {seed}", "seed")
    strategy, options = _extension(body)
    return CompletionRequest(
        kind=kind, model=model, prompt=prompt, max_tokens=_max_tokens(body, max_names),
        temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed, stop=_stop(body), stream=bool(stream),
        include_usage=_stream_options(body, bool(stream)), strategy=strategy, options=options,
    )


def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts are supported
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are "
                          "supported", f"messages[{i}].content", code="unsupported")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: dict) -> CompletionRequest:
    _refuse_unsupported(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' is required: a non-empty list of {'role', 'content'} objects", "messages",
                  code="missing_messages" if not messages else "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        if m["role"] not in _ROLES:
            raise bad(f"messages[{i}].role {m['role']!r} is not supported; use system, user or assistant",
                      f"messages[{i}].role", code="unsupported" if m["role"] in ("tool", "function") else
                      "invalid_value")
        clean.append({"role": _ROLES[m["role"]], "content": _message_text(i, m.get("content"))})
    return _common(body, "chat", clean, ("max_completion_tokens", "max_tokens"))


def parse_completion(body: dict) -> CompletionRequest:
    _refuse_unsupported(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass  # token ids
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("one prompt per request: send several requests (they are batched by the server)", "prompt",
                  code="unsupported")
    elif not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' is required: a non-empty string (or a list of token ids)", "prompt",
                  code="missing_prompt" if not prompt else "invalid_value")
    return _common(body, "completion", prompt, ("max_tokens",))

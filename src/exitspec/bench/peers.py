"""Peers: what a user would run instead of exitspec, timed on the same model and prompts.

- `hf-generate`: `model.generate`, greedy or sampled (the vanilla every speedup is measured against,
  together with exitspec's own vanilla loop).
- `hf-early-exit`: `generate(assistant_early_exit=l)`, HF's self-speculative early exit (LayerSkip
  style: the model's first l layers + its own norm and LM head draft, the full model verifies). The
  draft length is HF's default for the model's generation config (20 drafts max, cut short when the
  draft's top probability falls below 0.4): HF takes the assistant's settings from the model's own
  generation config, which we do not modify.
- `hf-prompt-lookup`: `generate(prompt_lookup_num_tokens=k)`, n-gram copying from the context.
- `hf-assisted`: `generate(assistant_model=...)` with an exit exported as a draft model.
- `llama.cpp`: its server on the same GGUF, plain or speculative (bench/llama_cpp.py).
- `economize-early-exit`: the `early_exit` drafter of the optional `economize` package (frozen
  layers, shared head), cycle length gamma + 1.

All run with EOS disabled (a copy of the generation config whose EOS list is empty), so every
contender produces exactly `max_new_tokens` tokens, like exitspec's `ignore_eos=True`, and may emit
the EOS token like it too. (`eos_token_id=None` is not enough: generate() falls back to the model's
EOS; `min_new_tokens` would force the length by suppressing EOS, so HF's greedy text would differ
from vanilla's wherever the model ends its answer.) HF reports no draft statistics,
so target calls, drafts and layer work are counted with forward hooks on the decoder layers (a draft
of an early-exit assistant never reaches the last layer); the hooks are removed after each call.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from exitspec.bench.config import RunSpec
from exitspec.bench.contenders import Contender, Sample, spread_accepts
from exitspec.bench.llama_cpp import LlamaCppServer
from exitspec.decoding.exits import exit_bundle
from exitspec.export.draft import export_draft

# HF's defaults for the assistant, applied when the model's generation config leaves them unset.
HF_DEFAULT_DRAFTS = 20
HF_DEFAULT_CONFIDENCE = 0.4


class _FirstTokenTimer:
    """A generate() streamer that notes when the first generated token arrives (the first put() is
    the prompt itself)."""

    def __init__(self):
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class _LayerCounter:
    """Forward hooks on every decoder layer while active: calls of the first and last layer, and
    token-layer applications (tokens through each layer, summed over layers)."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = list(layers)
        self.first_calls = 0
        self.last_calls = 0
        self.layer_tokens = 0
        self.handles: list = []

    def __enter__(self):
        n = len(self.layers)
        for i, m in enumerate(self.layers):
            self.handles.append(m.register_forward_hook(self._hook(i == 0, i == n - 1), with_kwargs=True))
        return self

    def _hook(self, first: bool, last: bool):
        def hook(_module, args, kwargs, _output):
            h = args[0] if args else kwargs.get("hidden_states")
            self.layer_tokens += int(h.shape[1]) if h is not None else 0
            self.first_calls += first
            self.last_calls += last
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


class HFGenerate(Contender):
    """`model.generate`: plain greedy or sampled decoding (also the base class of the HF peers)."""

    lossless = True

    def __init__(self, spec: RunSpec, model):
        super().__init__(spec, model)
        # A private copy with EOS removed; the model's own generation config stays untouched.
        self.gen_config = copy.deepcopy(model.model.generation_config)
        self.gen_config.eos_token_id = []  # an empty list: no stop token, and no fallback to the model's

    def generate_kwargs(self) -> dict:
        """Settings of the generation config (e.g. prompt_lookup_num_tokens)."""
        return {}

    def call_kwargs(self) -> dict:
        """Arguments of generate() itself that are not config settings (e.g. assistant_model)."""
        return {}

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Sample:
        hf, tok = self.model.model, self.model.tokenizer
        x = torch.tensor([ids], device=self.model.lm.device)
        # top_k=0 turns off HF's default top-k of 50, so sampling matches exitspec's plain temperature.
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 \
            else dict(do_sample=False)
        cfg = copy.deepcopy(self.gen_config)
        # An empty EOS list leaves generate() no pad fallback: name one (a tokenizer may have no pad).
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cfg.update(max_new_tokens=max_new_tokens, pad_token_id=pad,
                   **sampling, **self.generate_kwargs())
        if temperature > 0:
            torch.manual_seed(seed)
        timer = _FirstTokenTimer()
        with _LayerCounter(self.model.lm.adapter.layers) as calls, torch.inference_mode():
            t0 = time.perf_counter()
            out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg, streamer=timer,
                              **self.call_kwargs())
            _sync(x.device)
            total = time.perf_counter() - t0
        tokens = out[0, len(ids):].tolist()
        ttft = timer.first_token_at - t0 if timer.first_token_at is not None else None
        # The target's prefill of all but the last prompt token is not decoding work (exitspec counts
        # from the pending token on); an assistant's own re-prefill of the prompt is, and stays in.
        calls.layer_tokens -= self.model.lm.num_layers * (len(ids) - 1)
        return self.sample(Sample(tokens=tokens, total_s=total, ttft_s=ttft), calls)

    def sample(self, s: Sample, calls: _LayerCounter) -> Sample:
        s.target_calls = calls.last_calls
        s.layers_computed = float(calls.layer_tokens)
        s.exit_hist = {self.model.lm.num_layers: len(s.tokens)}
        return s


class HFEarlyExit(HFGenerate):
    """`generate(assistant_early_exit=l)`: HF's self-speculative early-exit decoding."""

    def __init__(self, spec: RunSpec, model):
        super().__init__(spec, model)
        L = model.lm.num_layers
        if spec.exit_layer is None or not 0 < spec.exit_layer < L:
            raise ValueError(f"hf-early-exit needs exit_layer in 1..{L - 1}, got {spec.exit_layer}")
        if set(spec.opts) - {"exit_layer"}:
            raise ValueError(f"hf-early-exit takes only exit_layer (HF takes the draft length from the model's "
                             f"generation config), got {spec.opts}")

    def generate_kwargs(self) -> dict:
        return {"assistant_early_exit": self.spec.exit_layer}

    def describe(self) -> dict:
        gc = self.model.model.generation_config
        return {**super().describe(), "num_assistant_tokens": gc.num_assistant_tokens or HF_DEFAULT_DRAFTS,
                "assistant_confidence_threshold": gc.assistant_confidence_threshold or HF_DEFAULT_CONFIDENCE}

    def sample(self, s: Sample, calls: _LayerCounter) -> Sample:
        # Every call of the last layer is a verification. The first layer runs once per verification
        # and once per draft step (the assistant's first step also re-reads the accepted tokens), so
        # drafts = first-layer calls - last-layer calls. Accepted drafts follow from the token count:
        # each verification yields its accepted drafts + 1 token.
        s = super().sample(s, calls)
        s.drafted = calls.first_calls - calls.last_calls
        s.accept_lengths = spread_accepts(max(0, len(s.tokens) - calls.last_calls), calls.last_calls)
        s.accept_lengths_exact = False
        return s


class HFPromptLookup(HFGenerate):
    """`generate(prompt_lookup_num_tokens=k)`: drafts copied from matching n-grams of the context."""

    def __init__(self, spec: RunSpec, model):
        super().__init__(spec, model)
        k = spec.opts.get("num_tokens", 10)
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"hf-prompt-lookup needs num_tokens >= 1, got {k!r}")
        self.k = k

    def generate_kwargs(self) -> dict:
        return {"prompt_lookup_num_tokens": self.k}

    def sample(self, s: Sample, calls: _LayerCounter) -> Sample:
        # No model drafts here: the number of drafts proposed is unknown, only accepted ones are.
        s = super().sample(s, calls)
        s.accept_lengths = spread_accepts(max(0, len(s.tokens) - calls.last_calls), calls.last_calls)
        s.accept_lengths_exact = False
        return s


class HFAssisted(HFGenerate):
    """`generate(assistant_model=draft)`: HF's speculative decoding with a separate draft model, here
    an exit of the attached heads exported as a standard checkpoint (export/draft.py; `draft_exit=L`,
    norm_lm where no bundle is attached) or any draft folder (`draft=PATH`). The draft proposes
    `draft_len` tokens a round (HF's constant schedule, no confidence cut), as self-spec does, so the
    two acceptance rates compare: they should match, since the draft computes the exit's logits."""

    def __init__(self, spec: RunSpec, model):
        super().__init__(spec, model)
        opts = spec.strategy_opts
        unknown = sorted(set(opts) - {"draft_exit", "draft", "draft_len"})
        if unknown or ("draft" in opts) == ("draft_exit" in opts):
            raise ValueError(f"hf-assisted takes draft_exit=L (an exit, exported) or draft=FOLDER, and draft_len; "
                             f"got {opts}")
        k = opts.get("draft_len", 4)
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"hf-assisted needs draft_len >= 1, got {k!r}")
        if "draft" in opts:
            folder = Path(opts["draft"]).expanduser()
        else:
            layer = int(opts["draft_exit"])
            self.tmp = tempfile.TemporaryDirectory(prefix="exitspec-hf-draft-")
            folder = export_draft(model, exit_bundle(model, [layer], contextual=True), layer,
                                  Path(self.tmp.name) / "draft")
        self.draft = AutoModelForCausalLM.from_pretrained(folder, dtype=model.lm.dtype).to(model.lm.device).eval()
        # The draft is ours (loaded here), so its generation config may carry the round settings.
        self.draft.generation_config.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                            assistant_confidence_threshold=0.0)
        self.draft_layers = next(m for name, m in self.draft.named_modules()
                                 if name.endswith(("layers", ".h")) and isinstance(m, torch.nn.ModuleList))

    def call_kwargs(self) -> dict:
        return {"assistant_model": self.draft}

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Sample:
        with _LayerCounter(self.draft_layers) as draft_calls:
            s = super().run(ids, max_new_tokens, temperature, seed)
        # Each draft forward proposes one token (the first of a round also re-reads what was accepted).
        s.drafted = draft_calls.first_calls
        s.layers_computed = (s.layers_computed or 0.0) + draft_calls.layer_tokens
        s.accept_lengths = spread_accepts(max(0, len(s.tokens) - s.target_calls), s.target_calls)
        s.accept_lengths_exact = False
        return s


class EconomizeEarlyExit(Contender):
    """economize's `early_exit` drafter (frozen layers 1..l, the model's own norm + head)."""

    lossless = True

    def __init__(self, spec: RunSpec, model):
        super().__init__(spec, model)
        try:
            import economize  # optional peer library
            from economize.techniques.early_exit import EarlyExitConfig  # optional peer library
        except ImportError as err:
            raise ValueError("economize-early-exit needs the optional package `economize` "
                             "(pip install economize); drop the run or install it") from err
        L = model.lm.num_layers
        if spec.exit_layer is None or not 0 < spec.exit_layer < L:
            raise ValueError(f"economize-early-exit needs exit_layer in 1..{L - 1}, got {spec.exit_layer}")
        self.gamma = spec.gamma or 4
        self.economize = economize
        # economize wraps the model without changing its modules or forward; drafts run layers 1..l.
        self.wrapped = economize.apply(model.model, EarlyExitConfig(exit_layer=spec.exit_layer, head="shared"))
        self.decoding = economize.DecodeConfig(cycle_length=self.gamma + 1)

    def run(self, ids: list[int], max_new_tokens: int, temperature: float, seed: int) -> Sample:
        eco = self.economize
        x = torch.tensor(ids, device=self.model.lm.device)
        decoding, selector = self.decoding, None
        if temperature > 0:
            decoding = eco.DecodeConfig(cycle_length=self.gamma + 1, verifier="rejection")
            selector = eco.TopPSampler(temperature=temperature, top_p=1.0, seed=seed, device=str(x.device))
        with torch.inference_mode():
            t0 = time.perf_counter()
            r = self.wrapped.decode(x, max_new_tokens, decoding=decoding, selector=selector)
            _sync(x.device)
            total = time.perf_counter() - t0
        cost = r.cost_summary()
        tokens = r.tokens.tolist()
        L = self.model.lm.num_layers
        return Sample(tokens=tokens, total_s=total, ttft_s=None, target_calls=int(cost["exact_calls"]),
                      drafted=sum(d for d, _ in r.acceptance), accept_lengths=[a for _, a in r.acceptance],
                      # Minus the prefill of all but the last prompt token, as for every contender.
                      layers_computed=float(cost["layer_tokens"] - L * (len(ids) - 1)), exit_hist={L: len(tokens)})


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times cover it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PEER_CLASSES: dict[str, type[Contender]] = {
    "hf-generate": HFGenerate,
    "hf-early-exit": HFEarlyExit,
    "hf-prompt-lookup": HFPromptLookup,
    "economize-early-exit": EconomizeEarlyExit,
    "hf-assisted": HFAssisted,
    "llama.cpp": LlamaCppServer,
}


def make_peer(spec: RunSpec, model) -> Contender:
    return PEER_CLASSES[spec.name](spec, model)

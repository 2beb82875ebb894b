"""What one generated row asks for (length, sampling, stop rules) and the error for impossible asks."""

from __future__ import annotations

from dataclasses import dataclass, field

from exitspec.decoding.sampling import MAX_TEMPERATURE, SamplingParams


class GenerationError(ValueError):
    """Impossible generation settings or input; the message says what to change."""


@dataclass
class GenerateConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    eos_token_ids: list[int] | None = None  # None: the tokenizer's / model's EOS ids
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.sampling.temperature > MAX_TEMPERATURE:
            raise GenerationError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.sampling.temperature}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")


def eos_ids_for(model, tokenizer) -> list[int]:
    """EOS ids from the model's generation config and the tokenizer, deduplicated."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in [src] if isinstance(src, int) else src:
            if i not in ids:
                ids.append(int(i))
    return ids

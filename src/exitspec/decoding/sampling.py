"""The one sampling module: logits -> distribution -> token, for every strategy.

Speculative rejection sampling needs the *same* warped distribution for target and draft that
plain sampling would use, so all strategies go through `probs()`; greedy decoding is the
one-hot limit of it (temperature 0), which makes the rejection rule reduce to "draft == argmax".

Rows of one batch may sample differently (continuous batching serves requests with their own
temperature, top_p and seed): `RowSampling` holds each row's settings and random generator, and
`probs` / `sample` / `sample_from` take it wherever they take one `SamplingParams`. Dimension 0 of
every tensor they get is then the batch row. A batch whose rows share one setting and one
generator (what `generate()` makes of a batch) takes the old single-call path, so its draws are
unchanged; otherwise each row draws from its own generator with the shapes it would have alone, so
a seeded row gives its solo output whoever shares its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

# torch.Generator.manual_seed takes [-2^63, 2^64); a seed outside fails deep inside torch
# ("Overflow when unpacking long long"), so it is refused here with the setting named.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# The temperatures generation accepts, everywhere (CLI, Python API, server): OpenAI's range. The
# math below takes any temperature (evaluation warps at a distillation temperature of 4, say).
MAX_TEMPERATURE = 2.0


class SamplingError(ValueError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature > 100:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_MIN <= self.seed <= SEED_MAX):
            raise SamplingError(f"seed must be an integer in [-2^63, 2^64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g

    def to_dict(self) -> dict:
        return asdict(self)


class RowSampling:
    """Each row's sampling settings and generator (None for greedy rows) for one batch.

    `uniform` is set when every row has the same settings and the same generator object: the
    functions below then make one call for the whole batch, as a batch of one setting always did."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None]):
        if len(params) != len(generators):
            raise ValueError("one generator per row")
        self.params, self.generators = list(params), list(generators)
        self._settle()

    @classmethod
    def shared(cls, params: SamplingParams, generator: torch.Generator | None, rows: int) -> RowSampling:
        return cls([params] * rows, [generator] * rows)

    def _settle(self) -> None:
        p0 = self.params[0] if self.params else SamplingParams()
        g0 = self.generators[0] if self.generators else None
        self.greedy = all(p.greedy for p in self.params)
        self.uniform = all(p == p0 for p in self.params) and all(g is g0 for g in self.generators)
        self.first = (p0, g0)

    def __len__(self) -> int:
        return len(self.params)

    def select(self, keep: list[int]) -> None:
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self._settle()

    def extend(self, other: RowSampling) -> None:
        self.params += other.params
        self.generators += other.generators
        self._settle()


Sampling = SamplingParams | RowSampling


def _rows(params: Sampling, generator: torch.Generator | None) -> tuple[SamplingParams, torch.Generator | None] | None:
    """(settings, generator) when one call serves every row; None when rows differ."""
    if isinstance(params, SamplingParams):
        return params, generator
    return params.first if params.uniform else None


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to logits (..., V); filtered entries become -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last dimension, (..., V) -> (...) long: the one greedy choice of every strategy.

    Why not torch's argmax: on a CPU its reduction over a vocabulary row runs unvectorised, about ten
    times slower than numpy's, and a speculative verification takes one per verified row (a lookup
    or tree cycle several, a vanilla step one). numpy's argmax returns the same index: the first
    maximum, and the first NaN where there is one, as torch's does. Every greedy path (vanilla's
    sample, verify, verify_tree, probs' one-hot) goes through here, so they cannot disagree on a tie.
    Other devices and dtypes numpy lacks (bfloat16) keep torch's."""
    if logits.device.type != "cpu" or logits.dtype not in _NUMPY_FLOATS or logits.requires_grad:
        return logits.argmax(-1)
    return torch.from_numpy(np.asarray(logits.numpy().argmax(-1)))  # a (V,) row gives a 0-d array


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def probs(logits: torch.Tensor, params: Sampling) -> torch.Tensor:
    """The distribution a token is drawn from: (..., V) float32, one-hot at the argmax if greedy.
    Per-row settings (RowSampling): (B, ..., V), rows grouped by setting."""
    one = _rows(params, None)
    if one is None:
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        groups: dict[SamplingParams, list[int]] = {}
        for i, p in enumerate(params.params):
            groups.setdefault(p, []).append(i)
        for p, idx in groups.items():
            rows = torch.tensor(idx, device=logits.device)
            out[rows] = probs(logits[rows], p)
        return out
    params = one[0]
    if params.greedy:
        out = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return out.scatter_(-1, greedy_tokens(logits).unsqueeze(-1).to(out.device), 1.0)
    return warp(logits, params).softmax(-1)


def sample(logits: torch.Tensor, params: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from logits (..., V) -> (...) long."""
    if params.greedy:
        return greedy_tokens(logits)
    return sample_from(probs(logits, params), generator if isinstance(params, SamplingParams) else params)


def sample_from(p: torch.Tensor, generator: torch.Generator | RowSampling | None) -> torch.Tensor:
    """Draw from probabilities (..., V) -> (...). With RowSampling, row b of dim 0 draws from its own
    generator (a greedy row's one-hot p needs no draw: its argmax)."""
    if isinstance(generator, RowSampling):
        if generator.uniform:
            generator = generator.first[1]
        else:
            return torch.stack([greedy_tokens(p[b]) if params.greedy else sample_from(p[b:b + 1], g)[0]
                                for b, (params, g) in enumerate(zip(generator.params, generator.generators,
                                                                    strict=True))])
    flat = p.reshape(-1, p.shape[-1])
    return torch.stack([_inverse_cdf(row, generator) for row in flat]).view(p.shape[:-1])


def _inverse_cdf(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from the probabilities p (V,): the token whose cumulative-probability interval holds
    a uniform number.

    Why not torch.multinomial: on a vocabulary of tens of thousands of tokens one draw costs a large
    share of a decode step on a CPU, over ten times a cumulative sum and a binary search
    (benchmarks/README.md, "Design measurements"). The sum is in float64 so that rounding cannot
    move mass between tokens (a token of probability 0 has an empty interval and is never drawn),
    and the draw is scaled to the sum, so an unnormalised p works too. One row at a time: torch's
    cumsum is slow along the last dimension of a 2-D tensor.
    """
    c = p.double().cumsum(0)  # (V,)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=p.device) * c[-1]
    return torch.searchsorted(c, u, right=True).clamp_(max=p.shape[0] - 1)[0]


def uniform_draws(shape: tuple[int, ...], generator: torch.Generator | RowSampling | None,
                  device: torch.device | str, limit: torch.Tensor | None = None) -> torch.Tensor:
    """U[0, 1) draws of `shape` (B, K). Per-row generators: row b draws limit[b] numbers (what it
    would draw alone, where its proposals are all the drafts there are) and 0 fills the rest
    (positions past the limit are never judged); greedy rows draw nothing."""
    if not isinstance(generator, RowSampling) or generator.uniform:
        g = generator.first[1] if isinstance(generator, RowSampling) else generator
        return torch.rand(shape, generator=g, device=device)
    out = torch.zeros(shape, device=device)
    for b, (params, g) in enumerate(zip(generator.params, generator.generators, strict=True)):
        n = shape[1] if limit is None else int(limit[b])
        if not params.greedy and n:
            out[b, :n] = torch.rand(n, generator=g, device=device)
    return out

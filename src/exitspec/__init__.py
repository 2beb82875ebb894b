"""exitspec: early-exit heads and self-speculative decoding for Hugging Face decoder LLMs."""

from exitspec.decoding.api import GenerationResult, generate, stream
from exitspec.decoding.events import DoneEvent, FinishEvent, GenerationStats, TokenEvent
from exitspec.export.draft import export_draft
from exitspec.loading import LoadedModel, ModelLoadError, attach_heads, load
from exitspec.runtime.kv_cache import KVCache
from exitspec.runtime.layered import LayeredModel

__version__ = "0.1.0"

__all__ = [
    "DoneEvent",
    "FinishEvent",
    "GenerationResult",
    "GenerationStats",
    "KVCache",
    "LayeredModel",
    "LoadedModel",
    "ModelLoadError",
    "TokenEvent",
    "attach_heads",
    "export_draft",
    "generate",
    "load",
    "stream",
]

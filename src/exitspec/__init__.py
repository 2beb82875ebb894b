"""exitspec: early-exit heads and self-speculative decoding for Hugging Face decoder LLMs."""

from exitspec.decoding.api import GenerationResult, generate, stream
from exitspec.decoding.events import DoneEvent, FinishEvent, GenerationStats, TokenEvent
from exitspec.models.loading import LoadedModel, ModelLoadError, load
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
    "generate",
    "load",
    "stream",
]

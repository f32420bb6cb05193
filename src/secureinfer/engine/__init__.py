"""The engine: the generation loop (prefill, decode, sampling, streaming) over any model runtime."""

from .generate import CausalModel, GenerationResult, Generator, TextStream
from .sampling import GenerationConfig, Sampler

__all__ = ["CausalModel", "GenerationConfig", "GenerationResult", "Generator", "Sampler", "TextStream"]

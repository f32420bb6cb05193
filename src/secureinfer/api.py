"""The Python API: `secureinfer.load(...)` returns a `SecureLM` with `generate`, `stream` and `chat`."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .engine import GenerationConfig, GenerationResult, Generator, TextStream
from .errors import InvalidRequestError
from .model import Checkpoint, Llama, load_checkpoint
from .model.tokenizer import validate_messages

Messages = Sequence[dict[str, str]]

# Schemes runnable in this build. Protected schemes register here as they land.
SCHEMES = ("plain",)


class SecureLM:
    """A loaded model under one protection scheme."""

    def __init__(self, checkpoint: Checkpoint, scheme: str):
        self.checkpoint = checkpoint
        self.scheme = scheme
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.model = Llama.from_state_dict(checkpoint.config, checkpoint.weights)
        self.generator = Generator(self.model, self.tokenizer, checkpoint.config.max_position_embeddings)

    def generate(self, prompt: str, **options) -> GenerationResult:
        """Continue `prompt` as raw text. Options: max_new_tokens, temperature, top_k, top_p, seed, stop."""
        return self.generator.generate(_require_text(prompt), GenerationConfig(**options))

    def chat(self, messages: Messages, **options) -> GenerationResult:
        """Answer a conversation (a list of {"role", "content"} dicts) through the model's chat template."""
        validate_messages(messages)
        return self.generator.generate(messages, GenerationConfig(**options))

    def stream(self, prompt: str | Messages, **options) -> TextStream:
        """Like `generate` (for a string) or `chat` (for a message list), yielding text as it is produced."""
        return self.generator.stream(prompt, GenerationConfig(**options))

    def generate_batch(self, prompts: Sequence[str], **options) -> list[GenerationResult]:
        return self.generator.generate_batch([_require_text(p) for p in prompts], GenerationConfig(**options))


def load(
    model: str | os.PathLike | None = None,
    scheme: str = "plain",
    *,
    threads: int | None = None,
    progress: bool = True,
) -> SecureLM:
    """Load `model` (a .gguf, .safetensors or transformers directory; default: the bundled SmolLM2) under `scheme`."""
    if scheme not in SCHEMES:
        raise InvalidRequestError(f"unknown scheme {scheme!r}", f"use one of: {', '.join(SCHEMES)}")
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidRequestError(f"threads={threads!r} is invalid", "use an integer >= 1")
        torch.set_num_threads(threads)
    return SecureLM(load_checkpoint(model, progress=progress), scheme)


def _require_text(prompt) -> str:
    if not isinstance(prompt, str):
        raise InvalidRequestError("the prompt is not a string", "pass text, or use chat() for a message list")
    return prompt

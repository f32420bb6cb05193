"""Generation options and next-token sampling: greedy, or temperature / top-k / top-p with an explicit seed."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InvalidRequestError


MAX_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None  # None draws a fresh seed per request
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # generate exactly max_new_tokens, as benchmarks need
    logprobs: int = 0  # report the chosen token's logprob and the top-n alternatives (0: none)

    def __post_init__(self):
        def bad(option: str, value, rule: str):
            raise InvalidRequestError(f"{option}={value!r} is invalid", f"use {rule}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if not _finite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "a number >= 0 (0 is greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 disables it)")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "a number in (0, 1]")
        if isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS:
            bad("logprobs", self.logprobs, f"an integer from 0 to {MAX_LOGPROBS}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", self.seed, "a non-negative integer")
        if not isinstance(self.stop, (str, list, tuple)):
            bad("stop", self.stop, "a string or a list of non-empty strings")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stops):
            bad("stop", self.stop, "non-empty strings")
        object.__setattr__(self, "stop", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Sampler:
    """Picks the next token from logits [B, vocab]. Holds its own RNG so runs are reproducible from `seed`."""

    def __init__(self, config: GenerationConfig):
        self.config = config
        self.seed = config.seed if config.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, logits: Tensor) -> Tensor:
        cfg = self.config
        if cfg.greedy:
            return logits.argmax(dim=-1)
        # Shift before dividing: a tiny temperature would otherwise overflow to inf and NaN the softmax.
        logits = (logits.float() - logits.max(dim=-1, keepdim=True).values) / cfg.temperature
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
            drop = (cumulative - sorted_logits.softmax(dim=-1)) >= cfg.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

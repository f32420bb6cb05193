"""Logit perturbation: noise on the distribution callers see, to starve distillation, with the argmax kept.

Mechanism: add Gaussian noise of standard deviation `scale` (in logit units, i.e. nats) to every
logit, then swap the noisy top value onto the original argmax so greedy decoding is unchanged.
The noise is keyed on the context: its seed is HMAC-SHA256(per-process secret key, the token
history), so repeating a query returns the same perturbed logprobs and averaging many answers to
one prompt removes nothing. A different context gets independent noise.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Sequence

import torch
from torch import Tensor

from ..errors import InvalidRequestError


class LogitPerturbation:
    def __init__(self, scale: float):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0 or scale == float("inf"):
            raise InvalidRequestError(f"perturbation={scale!r} is invalid", "use a finite number >= 0 (0 turns it off)")
        self.scale = float(scale)
        self._key = secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"LogitPerturbation(scale={self.scale})"

    def __call__(self, logits: Tensor, histories: Sequence[Sequence[int]]) -> Tensor:
        """logits [B, vocab] after `histories[b]` (the prompt and tokens so far) -> perturbed logits, same argmax."""
        if self.scale == 0:
            return logits
        noise = torch.stack([self._noise(history, logits.shape[-1]) for history in histories])
        noisy = logits.float() + noise
        top, noisy_top = logits.argmax(-1, keepdim=True), noisy.argmax(-1, keepdim=True)
        top_value, displaced = noisy.gather(-1, noisy_top), noisy.gather(-1, top)
        noisy.scatter_(-1, noisy_top, displaced)
        noisy.scatter_(-1, top, top_value)
        return noisy

    def _noise(self, history: Sequence[int], vocab: int) -> Tensor:
        digest = hmac.new(self._key, torch.tensor(list(history), dtype=torch.int64).numpy().tobytes(), hashlib.sha256)
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") >> 1)
        return torch.randn(vocab, generator=generator) * self.scale


__all__ = ["LogitPerturbation"]

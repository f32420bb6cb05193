"""Running prompts through a scheme the same way in every test that compares schemes."""

from __future__ import annotations

import torch
from torch import Tensor

# Five prompts for the real model, the last a chat: what "greedy tokens identical on 5 prompts" means here.
REAL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
]
REAL_CHAT = [{"role": "user", "content": "My name is Ada and I live at 12 Elm Street. Where do I live?"}]


def padded_batch(tokenizer, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """The prompts left-padded (with id 2) to one length, and each row's padding."""
    ids = [tokenizer.encode(p) for p in prompts]
    longest = max(map(len, ids))
    pad = torch.tensor([longest - len(row) for row in ids])
    return torch.tensor([[2] * int(n) + row for n, row in zip(pad, ids)]), pad


def forward_logits(lm, ids: Tensor, pad: Tensor | None = None) -> list[Tensor]:
    """Logits of a prefill (every position) and of three greedy decode steps, through the scheme's runtime."""
    runtime = lm.runtime
    cache = runtime.new_cache(ids.shape[0], ids.shape[1] + 3)
    steps = [runtime.forward(ids, cache, 0, pad, last_only=False)]
    for i in range(3):
        steps.append(runtime.forward(steps[-1][:, -1:].argmax(-1), cache, ids.shape[1] + i, pad))
    return steps


def real_greedy_run(lm, tokenizer) -> tuple[list[list[int]], Tensor]:
    """16 greedy tokens for each real prompt and the chat, and the first-step logits of the third prompt."""
    tokens = [lm.generate(p, max_new_tokens=16, ignore_eos=True).tokens for p in REAL_PROMPTS]
    tokens.append(lm.chat(REAL_CHAT, max_new_tokens=16, ignore_eos=True).tokens)
    ids = torch.tensor([tokenizer.encode(REAL_PROMPTS[2])])
    return tokens, lm.runtime.forward(ids, lm.runtime.new_cache(1, ids.shape[1]), 0)

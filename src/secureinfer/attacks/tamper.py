"""Tampering: a device that returns wrong products, and what the enclave does about it.

The adversary controls the device, so it may answer a blinded product with anything. The attack
hooks the enclave's channel (the device's replies are the only thing it can change) and, in one
product per trial, corrupts an element, doubles the result, replays an earlier result for the same
op, or zeroes it. A scheme detects a trial when generation stops with `IntegrityError`; a trial it
misses is scored by whether the text differed from the honest one (a wrong token reached the user).
Honest runs through the same hook count false alarms.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor

from ..crypto.field import P
from ..errors import IntegrityError

MODES = ("corrupt", "scale", "replay", "zero")
Alter = Callable[[str, dict, dict], dict]  # (request kind, request meta, reply tensors) -> reply tensors


def tamper_replies(lm, alter: Alter) -> None:
    """Route every device reply of `lm` through `alter`: the device, from the enclave's side of the channel."""
    channel = lm.runtime.channel
    honest = channel.request

    def request(kind, meta=None, tensors=None, while_waiting=None):
        reply_meta, reply = honest(kind, meta, tensors, while_waiting)
        return reply_meta, alter(kind, meta or {}, reply)

    channel.request = request


class ProductTamperer:
    """Alters the `target`-th blinded product of each trial in one of MODES; passes everything else."""

    def __init__(self, mode: str, seed: int):
        if mode not in MODES:
            raise ValueError(f"unknown tampering mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.rng = mode, random.Random(seed)
        self.products, self.target = 0, 0
        self.previous: dict[str, Tensor] = {}

    def arm(self, target: int) -> None:
        """Alter the `target`-th blinded product from now on (1-based); 0 alters none."""
        self.products, self.target = 0, target

    def __call__(self, kind: str, meta: dict, reply: dict) -> dict:
        if kind != "run" or not meta.get("blinded"):
            return reply
        self.products += 1
        key, y = repr(meta["ops"]), reply["y"]
        altered = self._alter(y, self.previous.get(key)) if self.products == self.target else y
        self.previous[key] = y
        return {**reply, "y": altered}

    def _alter(self, y: Tensor, earlier: Tensor | None) -> Tensor:
        if self.mode == "corrupt":
            y = y.clone()
            flat = y.view(-1)
            i = self.rng.randrange(flat.numel())
            flat[i] = (flat[i] + self.rng.randrange(1, P)) % P
            return y
        if self.mode == "scale":
            return (y * 2) % P
        if self.mode == "replay":  # an earlier answer to the same op; a fresh pad makes it wrong now
            return earlier if earlier is not None and earlier.shape == y.shape else (y + 1) % P
        return torch.zeros_like(y)


@dataclass
class TamperResult:
    scheme: str
    mode: str
    trials: int
    detected: int  # stopped by IntegrityError
    wrong_output: int  # undetected trials whose text differed from the honest text
    wrong_tokens_before_detection: int  # detected trials that had already emitted a wrong token
    honest_runs: int
    false_alarms: int  # IntegrityError on an honest run

    @property
    def detection_rate(self) -> float:
        return self.detected / self.trials if self.trials else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"detection_rate": self.detection_rate}


def run_tamper_attack(
    lm, mode: str, trials: int, prompt: str, max_new_tokens: int = 6, honest_runs: int = 10, seed: int = 0
) -> TamperResult:
    """Tamper with one blinded product in each of `trials` generations of `prompt` by `lm` (a SecureLM).

    The session goes on after a detection, as a measurement must; a deployment would end it (each
    further attempt gives the device another P^-k chance against Freivalds).
    """
    tamperer = ProductTamperer(mode, seed)
    tamper_replies(lm, tamperer)
    tamperer.arm(0)
    honest_text = lm.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True).text
    products_per_run = tamperer.products
    if not products_per_run:
        raise ValueError(f"scheme {lm.scheme!r} outsources no blinded product: there is nothing to tamper with")
    false_alarms = 0
    for _ in range(honest_runs):
        tamperer.arm(0)
        try:
            lm.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
        except IntegrityError:
            false_alarms += 1
    detected = wrong_output = wrong_before = 0
    for _ in range(trials):
        tamperer.arm(tamperer.rng.randrange(1, products_per_run + 1))
        emitted = []
        try:
            for chunk in lm.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True):
                emitted.append(chunk)
        except IntegrityError:
            detected += 1
            wrong_before += not honest_text.startswith("".join(emitted))
            continue  # a blinded scheme's device keeps no state a failed step could leave behind
        wrong_output += "".join(emitted) != honest_text
    return TamperResult(lm.scheme, mode, trials, detected, wrong_output, wrong_before, honest_runs, false_alarms)

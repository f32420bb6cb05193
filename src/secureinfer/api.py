"""The Python API: `secureinfer.load(...)` returns a `SecureLM` with `generate`, `stream` and `chat`."""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

from .channel import open_channel
from .enclave import EnclaveRuntime
from .engine import GenerationConfig, GenerationResult, Generator, TextStream
from .crypto.field import fastest_backend
from .engine.perturbation import LogitPerturbation
from .errors import InvalidRequestError
from .data import DEMO_ADAPTER
from .model import Checkpoint, load_checkpoint
from .model.adapter import load_adapter
from .model.tokenizer import validate_messages
from .plan import PRESETS, build_plan
from .plan.costs import PlanCosts, plan_costs

Messages = Sequence[dict[str, str]]
CHANNELS = ("process", "inprocess")
DEVICES = ("cpu", "cuda")


class SecureLM:
    """A loaded model under one scheme: a trusted runtime in this process, an untrusted device behind a channel."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        scheme: str = "plain",
        *,
        channel: str = "process",
        device: str = "cpu",
        record_view: str | os.PathLike | None = None,
        epc_bytes: int | None = None,
        device_timeout_s: float = 60.0,
        threads: int | None = None,
        harden: bool = True,
        adapter: str | os.PathLike | None = None,
        perturbation: float | None = None,
        verify_repetitions: int | None = None,
        pad_batch_rows: int = 32,
        pad_background: bool = True,
        seal_kv: bool | None = None,
        enclave_share: float | None = None,
    ):
        _check_choice("channel", channel, CHANNELS)
        _check_choice("device", device, DEVICES)
        self.checkpoint = checkpoint
        self.scheme = scheme
        self.config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.plan = build_plan(scheme, checkpoint.config)
        # The preset's defaults (e.g. hardened's integrity checks) unless the caller says otherwise.
        defaults = PRESETS[scheme].runtime
        perturbation = defaults.get("perturbation", 0.0) if perturbation is None else perturbation
        verify_repetitions = defaults.get("verify_repetitions", 0) if verify_repetitions is None else verify_repetitions
        seal_kv = defaults.get("seal_kv", False) if seal_kv is None else seal_kv
        self.adapter = None
        if adapter is not None:
            self.adapter = load_adapter(DEMO_ADAPTER if str(adapter) == "demo" else adapter, checkpoint.config)
            self.plan = self.plan.with_adapters(
                {name.removesuffix(".lora_a"): a.shape[0] for name, a in self.adapter.tensors.items() if name.endswith(".lora_a")}
            )
        # Threads first: the default share times the exact product routes once per process (`fastest_backend`), at
        # the torch threads of that moment, and the int8 route's fast loop serves one thread. Timed before the split,
        # at two threads, float64 won, so every caller ran at share 0 on the float64 route (~0.75x the speed).
        threads = threads or self._split_threads(channel)
        self.threads = threads  # the enclave's (and device's) torch threads; None: torch's default
        share = self._default_enclave_share(channel, device) if enclave_share is None else enclave_share
        self.plan = self.plan.with_enclave_share(share)
        open_device = functools.partial(
            open_channel, channel, device=device, record_view=record_view, timeout_s=device_timeout_s, threads=threads
        )
        self.runtime = EnclaveRuntime(
            checkpoint.config,
            checkpoint.fused_weights,
            self.plan,
            open_device,
            adapter=self.adapter.tensors if self.adapter else None,
            epc_bytes=epc_bytes,
            harden=harden,
            verify_repetitions=verify_repetitions,
            pad_batch_rows=pad_batch_rows,
            pad_background=pad_background,
            seal_kv=seal_kv,
        )
        self.perturbation = LogitPerturbation(perturbation)
        self.generator = Generator(
            self.runtime, self.tokenizer, checkpoint.config.max_position_embeddings, self.perturbation
        )

    def _default_enclave_share(self, channel: str, device: str) -> float:
        """The enclave's share of each blinded product's columns when the caller names none. A CPU device in its own
        process, on a CPU whose fastest exact route is int8 (`field.fastest_backend`), runs the same kernel as the
        enclave on as many cores (`_split_threads`) while the enclave would otherwise wait: half each, with
        integrity checks or without (measured, `hardened` with its checks batched: 13.7 tok/s at share 0, 14.4 at
        0.4, 15.0 at 0.5, 14.2 at 0.55). Every column goes to the device otherwise: a GPU outruns the enclave; an
        in-process device runs in turn with it; on a CPU without int8 dot products the enclave's int8 columns
        would be slower than the device's float copy."""
        if not self.plan.blinded_weights or channel != "process" or device != "cpu":
            return 0.0
        return 0.5 if fastest_backend() == "int8" else 0.0  # timed once per process, so asked last

    def _split_threads(self, channel: str) -> int | None:
        """Plans that cross the boundary many times a token keep both processes busy in turn: give each
        half the cores, or their thread pools fight over them (measured: 2.4 vs 9.7 tok/s on 2 cores)."""
        if channel != "process" or len(self.plan.device_segments) <= 1:
            return None
        threads = max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(threads)
        return threads

    def generate(self, prompt: str, **options) -> GenerationResult:
        """Continue `prompt` as raw text. Options: max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos."""
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

    def chat_batch(self, conversations: Sequence[Messages], **options) -> list[GenerationResult]:
        """Answer several conversations in one batch (left-padded; each row stops on its own), as `chat` would."""
        for messages in conversations:
            validate_messages(messages)
        return self.generator.generate_batch(list(conversations), GenerationConfig(**options))

    def costs(self, context: int, tokens: int = 1) -> PlanCosts:
        """The plan's analytic costs for one forward of `tokens` positions at `context` cached positions."""
        return plan_costs(self.plan, context, tokens)

    def stats(self) -> dict:
        """Measured counters since the last reset: round trips, bytes, time breakdown, enclave memory, hardening."""
        adapter = self.adapter and {
            "name": self.adapter.name,
            "sha256": self.adapter.fingerprint,
            "rank": self.adapter.rank,
            "bytes": self.adapter.nbytes,
            "held_by": self.plan.adapter_sides(),
        }
        return self.runtime.stats() | {"adapter": adapter, "perturbation": self.perturbation.scale}

    def restart_device(self) -> None:
        """Start a fresh device (after it died or hung) and re-upload its public weights; then retry the request."""
        self.runtime.restart_device()

    def close(self) -> None:
        self.runtime.close()

    def __enter__(self) -> "SecureLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    model: str | os.PathLike | None = None,
    scheme: str = "plain",
    *,
    threads: int | None = None,
    progress: bool = True,
    **runtime_options,
) -> SecureLM:
    """Load `model` (a .gguf, .safetensors or transformers directory; default: the bundled SmolLM2) under `scheme`.

    Runtime options: channel ("process" default, or "inprocess"), device ("cpu" or "cuda"),
    record_view (a directory for the device view), epc_bytes, device_timeout_s, harden,
    adapter (a PEFT LoRA directory, or "demo" for the bundled one), perturbation (logit noise std,
    0 off), and verify_repetitions (Freivalds checks per blinded product, 0 off); these two default
    to the scheme's settings (`hardened` turns them on). pad_batch_rows (pads per GEMM batch),
    pad_background (refill the pad pool in a background thread, default on), and enclave_share (the share
    of each blinded product's output columns the enclave multiplies itself while the device multiplies the
    rest; default 0.5 with a CPU device in its own process on an int8-capable CPU, else 0).
    """
    _check_choice("scheme", scheme, tuple(PRESETS))
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidRequestError(f"threads={threads!r} is invalid", "use an integer >= 1")
        torch.set_num_threads(threads)
    return SecureLM(load_checkpoint(model, progress=progress), scheme, threads=threads, **runtime_options)


def _check_choice(option: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidRequestError(f"unknown {option} {value!r}", f"use one of: {', '.join(choices)}")


def _require_text(prompt) -> str:
    if not isinstance(prompt, str):
        raise InvalidRequestError("the prompt is not a string", "pass text, or use chat() for a message list")
    return prompt

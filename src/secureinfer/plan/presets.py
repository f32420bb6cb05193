"""Named plans. Every scheme registers a builder here; later schemes only add entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InvalidRequestError
from ..model.config import ModelConfig
from ..model.ops import PROJECTIONS
from .plan import DEVICE, ENCLAVE, Plan, uniform_plan


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    build: Callable[[ModelConfig], Plan]
    runtime: dict[str, Any] = field(default_factory=dict)  # defaults for runtime options, e.g. integrity checks


PRESETS: dict[str, Preset] = {}


def register(name: str, summary: str, **runtime):
    def decorate(build: Callable[[ModelConfig], Plan]):
        PRESETS[name] = Preset(name, summary, build, runtime)
        return build

    return decorate


def build_plan(name: str, config: ModelConfig) -> Plan:
    if name not in PRESETS:
        raise InvalidRequestError(f"unknown scheme {name!r}", f"use one of: {', '.join(PRESETS)}")
    return PRESETS[name].build(config)


@register("plain", "GPU-only baseline: every model op on the device, in clear; sampling in the enclave")
def plain(config: ModelConfig) -> Plan:
    return uniform_plan("plain", config, _all_on_the_device)


def _all_on_the_device(op: str) -> tuple[str, str]:
    return (ENCLAVE if op == "sample" else DEVICE, "clear")


@register("enclave", "TEE-only baseline: every op in the enclave; the device holds and sees nothing")
def enclave(config: ModelConfig) -> Plan:
    return uniform_plan("enclave", config, lambda op: (ENCLAVE, "clear"))


@register("plain-int8", "the int8 reference: like plain, with every projection on int8 weights; what secureinfer must equal bit for bit")
def plain_int8(config: ModelConfig) -> Plan:
    def place(op: str) -> tuple[str, str]:
        if op == "sample":
            return ENCLAVE, "clear"
        return DEVICE, "int8" if op in PROJECTIONS else "clear"

    return uniform_plan("plain-int8", config, place)


@register(
    "secureinfer",
    "SecureInfer (arXiv 2510.19979), our reading: every projection on the device, blinded with one-time pads "
    "mod P; embedding, norms, RoPE, attention and KV cache, SwiGLU, residuals and sampling in the enclave",
)
def secureinfer(config: ModelConfig) -> Plan:
    return _blinded_projections("secureinfer", config)


def _blinded_projections(name: str, config: ModelConfig) -> Plan:
    return uniform_plan(name, config, lambda op: (DEVICE, "blinded") if op in PROJECTIONS else (ENCLAVE, "clear"))


@register(
    "secureinfer-enclave-qkv-ffn",
    "SecureInfer, the alternative reading: q/k/v and FFN projections in the enclave too (int8); only the "
    "output projection and LM head go to the device, blinded",
)
def secureinfer_enclave_qkv_ffn(config: ModelConfig) -> Plan:
    def place(op: str) -> tuple[str, str]:
        if op in ("o_proj", "lm_head"):
            return DEVICE, "blinded"
        return ENCLAVE, "int8" if op in PROJECTIONS else "clear"

    return uniform_plan("secureinfer-enclave-qkv-ffn", config, place)


@register(
    "hardened",
    "ours: secureinfer plus a Freivalds check on every blinded product, a KV cache sealed with AES-GCM on the "
    "device past the enclave budget, and logit perturbation on by default",
    verify_repetitions=2,
    seal_kv=True,
    perturbation=1.0,
)
def hardened(config: ModelConfig) -> Plan:
    return _blinded_projections("hardened", config)


def _head_keyed(name: str, config: ModelConfig, mode: str) -> Plan:
    return uniform_plan(name, config, _all_on_the_device, head_key=mode)


@register(
    "kvshield",
    "KV-Shield (arXiv 2409.04040), paper-literal: placed like plain, with a fresh secret permutation of head_dim "
    "per layer and KV head folded into W_q/W_k/W_v, so the device keeps a permuted KV cache; the enclave "
    "un-permutes each attention output (one more round trip per layer)",
)
def kvshield(config: ModelConfig) -> Plan:
    return _head_keyed("kvshield", config, "literal")


@register(
    "kvshield-fold",
    "KV-Shield with the inverse permutation folded into W_o: the same device view, no enclave work, no extra round trip",
)
def kvshield_fold(config: ModelConfig) -> Plan:
    return _head_keyed("kvshield-fold", config, "fold")


@register(
    "kvmix",
    "ours: secureinfer with the KV cache and attention on the device, over queries, keys and values mixed by "
    "secret invertible matrices per layer and KV head (RoPE and the mixing in the enclave; the enclave unmixes "
    "the attention output); the device sees attention scores",
)
def kvmix(config: ModelConfig) -> Plan:
    def place(op: str) -> tuple[str, str]:
        return (DEVICE, "blinded") if op in PROJECTIONS else (DEVICE if op == "attention" else ENCLAVE, "clear")

    return uniform_plan("kvmix", config, place, head_key="mixed")

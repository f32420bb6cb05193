"""Load a PEFT LoRA adapter and lay it out for our fused projections (wqkv, wo, w_gate_up, w_down).

PEFT adds `lora_B(lora_A(x)) * scaling` to each adapted `nn.Linear`. Our model fuses q/k/v and
gate/up into one product each, so per layer and fused weight we stack the A's of the adapted
modules on rows and place each B, with its scaling folded in, at that module's output rows of a
block-diagonal matrix. Then `kernels.lora_delta(x, lora_a, lora_b)` is exactly PEFT's summed delta in the
fused output layout, and one extra pair of skinny products per fused weight applies the adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from ..errors import SecureInferError
from .config import ModelConfig
from .llama import FUSED_WEIGHTS, MODULE_PARENT

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# transformers' module names, in the order their outputs sit inside our fused weights.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT writes `base_model.model.` + the module path; the `model.` after it is there for *ForCausalLM.
_KEY = re.compile(r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")

# LoRA options that change what the adapter computes beyond `B @ A * scaling` on these modules.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "megatron_config": "Megatron parallel layers (megatron_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "fan_in_fan_out": "transposed Conv1D weights (fan_in_fan_out)",
}
# These initialisations change the base weights too (or switch to a LoRA variant), so the
# adapter alone is not the whole difference from our base model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "mica")

_PLAIN_LORA_FIX = (
    "use a plain LoRA adapter, or merge it into the base model with peft's merge_and_unload(), "
    "save that model and load it as the model instead"
)
_SAME_MODEL_FIX = "use an adapter trained on this base model"


class AdapterLoadError(SecureInferError):
    """The adapter directory is missing, incomplete, corrupt, of an unsupported kind, or made for another model."""


@dataclass
class LoraAdapter:
    name: str
    source: Path
    rank: int  # PEFT's `r`: the rank of each adapted module
    targets: list[str]  # the adapted transformers modules, in TARGETS order
    scaling: float  # already folded into every lora_b
    fingerprint: str  # sha256 of adapter_model.safetensors
    # `layers.{i}.{fused}.lora_a`: [rank * adapted members, in] and `.lora_b`: [fused out, rank * adapted members],
    # float32, for every layer and each fused weight with an adapted member; absent otherwise.
    tensors: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of the fused tensors, as held in memory."""
        return sum(t.nbytes for t in self.tensors.values())

    def pair(self, layer: int, weight: str) -> tuple[Tensor, Tensor] | None:
        """(lora_a, lora_b) for one fused weight of one layer, or None when the adapter leaves it alone."""
        prefix = f"layers.{layer}.{weight}"
        if f"{prefix}.lora_a" not in self.tensors:
            return None
        return self.tensors[f"{prefix}.lora_a"], self.tensors[f"{prefix}.lora_b"]


class _Slot(NamedTuple):
    row: int  # first output row of the module inside its fused weight (see FUSED_WEIGHTS)
    out_features: int
    in_features: int


def _slots(config: ModelConfig) -> dict[str, _Slot]:
    d, f, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    return {
        "q_proj": _Slot(0, q, d),
        "k_proj": _Slot(q, kv, d),
        "v_proj": _Slot(q + kv, kv, d),
        "o_proj": _Slot(0, d, q),
        "gate_proj": _Slot(0, f, d),
        "up_proj": _Slot(f, f, d),
        "down_proj": _Slot(0, d, f),
    }


def _fused_out(config: ModelConfig) -> dict[str, int]:
    d, f = config.hidden_size, config.intermediate_size
    return {"wqkv": config.q_size + 2 * config.kv_size, "wo": d, "w_gate_up": 2 * f, "w_down": d}


def load_adapter(path: str | os.PathLike, config: ModelConfig) -> LoraAdapter:
    """Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for the model `config` describes."""
    directory = Path(path).expanduser()
    peft_config = _read_config(directory)
    rank, scaling = _rank_and_scaling(peft_config, directory)
    weights_file = directory / WEIGHTS_FILE
    modules = _read_modules(weights_file, config, rank)
    adapted = {target for _, target in modules}
    targets = [t for t in TARGETS if t in adapted]
    with open(weights_file, "rb") as f:
        fingerprint = hashlib.file_digest(f, "sha256").hexdigest()
    return LoraAdapter(
        name=directory.resolve().name,
        source=directory,
        rank=rank,
        targets=targets,
        scaling=scaling,
        fingerprint=fingerprint,
        tensors=_fuse(modules, targets, config, rank, scaling),
    )


def _read_config(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise AdapterLoadError(
            f"adapter path {directory} does not exist",
            "pass the directory peft's save_pretrained() wrote (adapter_config.json + adapter_model.safetensors)",
        )
    if not directory.is_dir():
        raise AdapterLoadError(
            f"adapter path {directory} is a file, not a directory", f"pass the directory that holds {directory.name}"
        )
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterLoadError(f"{directory} has no {CONFIG_FILE}", "save the adapter with peft's save_pretrained()")
    if not (directory / WEIGHTS_FILE).is_file():
        pickled = " (only adapter_model.bin, which secureinfer does not read)"
        raise AdapterLoadError(
            f"{directory} has no {WEIGHTS_FILE}" + (pickled if (directory / "adapter_model.bin").is_file() else ""),
            "save the adapter in safetensors format: save_pretrained(path, safe_serialization=True)",
        )
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(f"{config_file} is not valid JSON ({exc})", "save the adapter again") from exc
    if not isinstance(data, dict):
        raise AdapterLoadError(f"{config_file} is not a JSON object", "save the adapter again")
    if data.get("peft_type") != "LORA":
        raise AdapterLoadError(
            f"{directory} is a {data.get('peft_type')!r} adapter, not LoRA", "use a LoRA adapter (peft_type LORA)"
        )
    return data


def _rank_and_scaling(data: dict[str, Any], directory: Path) -> tuple[int, float]:
    for option, what in _UNSUPPORTED_OPTIONS.items():
        value = data.get(option)
        if value not in (None, False, {}, []):
            raise AdapterLoadError(f"{directory} uses {what}, which secureinfer cannot apply", _PLAIN_LORA_FIX)
    if data.get("bias", "none") != "none":
        raise AdapterLoadError(
            f"{directory} trains biases (bias={data['bias']!r}), which secureinfer cannot apply", _PLAIN_LORA_FIX
        )
    init = data.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise AdapterLoadError(
            f"{directory} was initialised with {init!r}, which also changes the base weights",
            "save it with peft's path_initial_model_for_weight_conversion to get a plain LoRA, or merge it",
        )
    rank, alpha = data.get("r"), data.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 or not isinstance(alpha, (int, float)):
        raise AdapterLoadError(
            f"{directory / CONFIG_FILE} lacks a positive integer 'r' and a numeric 'lora_alpha'", "save the adapter again"
        )
    # rsLoRA divides by sqrt(r) so the update's size does not shrink as the rank grows.
    return rank, alpha / (math.sqrt(rank) if data.get("use_rslora") else rank)


def _read_modules(weights_file: Path, config: ModelConfig, rank: int) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
    """{(layer, module): (A, B)} as float32, each checked against the model's shapes."""
    try:
        raw = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{weights_file} is not a readable safetensors file ({exc})", "save the adapter again"
        ) from exc

    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in raw.items():
        match = _KEY.fullmatch(key)
        if not match or match[3] not in TARGETS or MODULE_PARENT[match[3]] != match[2]:
            unknown.append(key)
            continue
        found.setdefault((int(match[1]), match[3]), {})[match[4]] = tensor
    if unknown:
        raise AdapterLoadError(
            f"{weights_file} holds {len(unknown)} tensors secureinfer cannot apply, e.g. {unknown[0]}",
            f"use a LoRA on {', '.join(TARGETS)} only (no embeddings, biases or extra modules)",
        )
    if not found:
        raise AdapterLoadError(f"{weights_file} holds no LoRA weights", "save the trained adapter again")

    slots = _slots(config)
    modules = {}
    for (layer, target), pair in sorted(found.items(), key=lambda item: (item[0][0], TARGETS.index(item[0][1]))):
        name = f"layers.{layer}.{target}"
        if layer >= config.num_layers:
            raise AdapterLoadError(
                f"the adapter has weights for layer {layer}, but the model has {config.num_layers} layers", _SAME_MODEL_FIX
            )
        if set(pair) != {"A", "B"}:
            raise AdapterLoadError(f"{weights_file} has lora_A or lora_B of {name} but not both", "save the adapter again")
        slot = slots[target]
        for part, rank_dim, expected in (("A", 0, (rank, slot.in_features)), ("B", 1, (slot.out_features, rank))):
            tensor = pair[part]
            if not tensor.is_floating_point():
                raise AdapterLoadError(f"{name}.lora_{part} has dtype {tensor.dtype}", "save the adapter in floating point")
            if tensor.ndim != 2 or tensor.shape[rank_dim] != rank:
                raise AdapterLoadError(
                    f"{name}.lora_{part} has shape {list(tensor.shape)}, which disagrees with r={rank} in {CONFIG_FILE}",
                    "save the adapter again",
                )
            if tuple(tensor.shape) != expected:
                raise AdapterLoadError(
                    f"{name}.lora_{part} has shape {list(tensor.shape)}, but this model (hidden {config.hidden_size}, "
                    f"{config.num_heads}/{config.num_kv_heads} heads of {config.head_dim}, intermediate "
                    f"{config.intermediate_size}) needs {list(expected)}",
                    _SAME_MODEL_FIX,
                )
        modules[(layer, target)] = (pair["A"].float(), pair["B"].float())
    return modules


def _fuse(
    modules: dict[tuple[int, str], tuple[Tensor, Tensor]],
    targets: list[str],
    config: ModelConfig,
    rank: int,
    scaling: float,
) -> dict[str, Tensor]:
    slots, fused_out = _slots(config), _fused_out(config)
    tensors = {}
    for layer in range(config.num_layers):
        for fused, members in FUSED_WEIGHTS.items():
            adapted = [m for m in members if m in targets]
            if not adapted:
                continue
            # A layer PEFT left alone (layers_to_transform) keeps zero blocks, so every layer has the same shapes.
            lora_a = torch.zeros(rank * len(adapted), slots[adapted[0]].in_features)
            lora_b = torch.zeros(fused_out[fused], rank * len(adapted))
            for j, member in enumerate(adapted):
                if (layer, member) not in modules:
                    continue
                a, b = modules[(layer, member)]
                slot, cols = slots[member], slice(j * rank, (j + 1) * rank)
                lora_a[cols] = a
                lora_b[slot.row : slot.row + slot.out_features, cols] = (b.double() * scaling).float()
            tensors[f"layers.{layer}.{fused}.lora_a"] = lora_a
            tensors[f"layers.{layer}.{fused}.lora_b"] = lora_b
    return tensors

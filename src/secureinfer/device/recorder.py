"""The device view: an opt-in dump of everything the untrusted device received, sent and held.

The attack suite reads only this. Format (docs/device-view.md): `messages.safetensors`,
`weights.safetensors`, `state.safetensors` and `manifest.json`, which is written last, so its
presence means the view is complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

FORMAT = "secureinfer-device-view"
VERSION = 1

Tensors = dict[str, Tensor]


@dataclass
class HeldState:
    """What the device holds when the view is written."""

    device: dict[str, Any]
    config: dict[str, Any] | None
    weights: Tensors  # one entry per distinct tensor; aliases name the rest
    aliases: dict[str, str]
    kv: Tensors  # "kv.k", "kv.v": [layers, batch, kv_heads, positions written, head_dim]
    kv_layers: list[int]
    values: Tensors  # the last step's value store
    step: int | None
    sealed: Tensors  # AES-GCM sealed enclave KV blocks (ciphertext and nonces) kept for the enclave


class ViewRecorder:
    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.messages: list[dict[str, Any]] = []
        self.tensors: Tensors = {}
        self.exchanges = 0
        self._request: dict[str, Any] = {}
        self._request_entry: dict[str, Any] = {}

    def record(self, direction: str, kind: str, meta: dict[str, Any], tensors: Tensors) -> None:
        """Record one message: "in" is a request, "out" the reply to the latest request (same index)."""
        if direction == "in":
            self._request = {"index": self.exchanges, "kind": kind, "step": meta.get("step"), "ops": meta.get("ops")}
            self.exchanges += 1
        index = self._request["index"]
        entry = {
            "index": index,
            "direction": direction,
            "kind": kind,
            "request": self._request["kind"],
            "step": self._request["step"],
            "ops": self._request["ops"],
            "meta": meta,
            "tensors": {},
        }
        for name, tensor in tensors.items():
            key = f"m{index:06d}.{direction}.{name}"
            self.tensors[key] = _copy(tensor)  # the device may go on writing to what it received or returned
            entry["tensors"][name] = {"key": key, **_describe(tensor)}
        if direction == "in":
            self._request_entry = entry
        self.messages.append(entry)

    def record_held(self, op: str, layer: int | None, written: Tensors) -> None:
        """Record what an op computed on the device while serving the latest request: held, never sent."""
        index = self._request["index"]
        where = "-" if layer is None else layer
        held = {"op": op, "layer": layer, "tensors": {}}
        for name, tensor in written.items():
            key = f"m{index:06d}.held.{op}.{where}.{name}"
            self.tensors[key] = _copy(tensor)
            held["tensors"][name] = {"key": key, **_describe(tensor)}
        self._request_entry.setdefault("held", []).append(held)

    def close(self, held: HeldState) -> None:
        # Copies: safetensors refuses tensors that share memory, as a step's q, k and v (views of one
        # product) may. Weights need none: each arrived in its own buffer, and aliases are left out.
        state = {key: _copy(tensor) for key, tensor in held.kv.items()}
        state.update({f"values.{name}": _copy(tensor) for name, tensor in held.values.items()})
        state.update({f"sealed.{key}": _copy(tensor) for key, tensor in held.sealed.items()})
        save_file(self.tensors, self.directory / "messages.safetensors")
        weights = {name: weight.to("cpu").contiguous() for name, weight in held.weights.items()}
        save_file(weights, self.directory / "weights.safetensors")
        save_file(state, self.directory / "state.safetensors")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "device": held.device,
            "config": held.config,
            "messages": self.messages,
            "weights": {
                "file": "weights.safetensors",
                "tensors": {name: _describe(tensor) for name, tensor in held.weights.items()},
                "aliases": held.aliases,
            },
            "state": {
                "file": "state.safetensors",
                "tensors": {key: _describe(tensor) for key, tensor in state.items()},
                "kv_layers": held.kv_layers,
                "kv_positions": held.kv["kv.k"].shape[3] if held.kv else 0,
                "values_step": held.step,
            },
        }
        staging = self.directory / "manifest.json.partial"
        staging.write_text(json.dumps(manifest, indent=1))
        staging.replace(self.directory / "manifest.json")


def _copy(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def _describe(tensor: Tensor) -> dict[str, Any]:
    return {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}

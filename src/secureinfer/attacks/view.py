"""A recorded device view (docs/device-view.md), read as the adversary reads it, and what a conversation attack returns.

The attacks read only this and public data (the base checkpoint, the tokenizer). Tensors are read lazily
from the view's safetensors files, so an attack pays only for what it touches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from ..device.recorder import FORMAT
from ..errors import InvalidRequestError
from ..model.config import ModelConfig

VIEW_FILES = ("messages.safetensors", "weights.safetensors", "state.safetensors")


@dataclass(frozen=True)
class HeldValues:
    """What one op computed on the device while serving a `run`: held in its memory, never sent."""

    op: str
    layer: int | None
    tensors: dict[str, str]  # value name -> key in messages.safetensors


@dataclass(frozen=True)
class ViewMessage:
    """One manifest entry: a request (`in`) or its reply (`out`)."""

    index: int
    direction: str
    kind: str
    request: str
    step: int | None
    ops: list[tuple[str, int | None]] | None
    meta: dict[str, Any]
    tensors: dict[str, str]  # tensor name -> key in messages.safetensors
    held: list[HeldValues]

    def runs_op(self, op: str, layer: int | None) -> bool:
        return self.ops is not None and (op, layer) in self.ops


@dataclass
class ConversationRecovery:
    """What a conversation attack recovered from a view.

    `tokens[row][index]` is the guessed token id at KV-cache index `index` of batch row `row` (None where the
    attack makes no guess: left padding, or a position it has no observation of). `distances` holds each
    guess's matching distance (the attack's own scale; small means a confident match).
    """

    attack: str
    method: str
    tokens: list[list[int | None]]
    distances: list[list[float | None]]
    used: list[str]  # the view tensors the attack read
    nothing_to_attack: str | None = None  # why the view holds nothing this attack can use
    # The device also received the conversation's token ids in clear (as under `plain`): reading them
    # needs no attack. The attacks never read them; this only says the view gives the tokens away anyway.
    clear_token_ids: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def nothing(cls, attack: str, method: str, reason: str, clear_token_ids: bool) -> "ConversationRecovery":
        return cls(attack, method, [], [], [], nothing_to_attack=reason, clear_token_ids=clear_token_ids)


class DeviceView:
    """A complete device view: its manifest, and its tensors read on demand."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest
        self._files: dict[str, Any] = {}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DeviceView":
        path = Path(directory)
        if not path.is_dir():
            raise InvalidRequestError(
                f"device view {path} does not exist or is not a directory", "pass the directory given as record_view"
            )
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise InvalidRequestError(
                f"device view {path} has no manifest.json, so it is incomplete (the device did not close cleanly)",
                "record the view again and close the session (SecureLM.close) so the device writes it",
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise InvalidRequestError(f"{manifest_path} is not valid JSON ({error})", "record the view again") from None
        if manifest.get("format") != FORMAT:
            raise InvalidRequestError(
                f"{manifest_path} is not a device view (format {manifest.get('format')!r})",
                f"pass a directory recorded with record_view (format {FORMAT!r})",
            )
        missing = [name for name in VIEW_FILES if not (path / name).is_file()]
        if missing:
            raise InvalidRequestError(f"device view {path} lacks {', '.join(missing)}", "record the view again")
        return cls(path, manifest)

    @cached_property
    def config(self) -> ModelConfig | None:
        """The model config the enclave sent with `hello` (None if it never did)."""
        data = self.manifest.get("config")
        return None if data is None else ModelConfig.from_dict(data)

    @cached_property
    def messages(self) -> list[ViewMessage]:
        return [_message(entry) for entry in self.manifest["messages"]]

    def conversation_runs(self) -> list[ViewMessage]:
        """The `run` requests since the last `new_cache`: the conversation the final KV cache belongs to."""
        runs: list[ViewMessage] = []
        for message in self.messages:
            if message.direction != "in":
                continue
            if message.kind == "new_cache":
                runs = []
            elif message.kind == "run":
                runs.append(message)
        return runs

    def message_tensor(self, key: str) -> Tensor:
        return self._file("messages.safetensors").get_tensor(key)

    @property
    def weight_names(self) -> list[str]:
        weights = self.manifest["weights"]
        return sorted([*weights["tensors"], *weights["aliases"]])

    def weight(self, name: str) -> Tensor:
        """A weight as the device held it; an alias (the tied LM head) reads the tensor it shares."""
        weights = self.manifest["weights"]
        stored = weights["aliases"].get(name, name)
        if stored not in weights["tensors"]:
            raise KeyError(f"the device held no weight {name!r}; it held {self.weight_names}")
        return self._file(weights["file"]).get_tensor(stored)

    @property
    def kv_layers(self) -> list[int]:
        """The layers whose KV cache the device held (the others in `kv.k`/`kv.v` are zeros)."""
        return list(self.manifest["state"]["kv_layers"]) if self.has_kv_cache else []

    @property
    def has_kv_cache(self) -> bool:
        state = self.manifest["state"]
        return "kv.k" in state["tensors"] and bool(state["kv_layers"]) and state["kv_positions"] > 0

    def kv_unusable(self, layer: int) -> str | None:
        """Why the view holds no activations of `layer`'s KV cache for an attack to read; None if it does."""
        if layer not in self.kv_layers:
            if self.kv_layers:
                return f"the device held the KV cache of layers {self.kv_layers}, not of layer {layer}"
            return "the device held no KV cache"
        dtype = self.manifest["state"]["tensors"]["kv.k"]["dtype"]
        if dtype not in ("float32", "float16", "bfloat16", "float64"):
            return f"the device's KV cache holds {dtype} values, not activations"
        return None

    def kv_cache(self) -> tuple[Tensor, Tensor]:
        """The final cache: keys (after RoPE) and values, each [layers, batch, kv_heads, positions, head_dim]."""
        if not self.has_kv_cache:
            raise KeyError("the device held no KV cache")
        state = self._file(self.manifest["state"]["file"])
        return state.get_tensor("kv.k"), state.get_tensor("kv.v")

    def conversation_pad(self) -> Tensor | None:
        """Left padding of each batch row in the final conversation (the runs' public `pad` meta); None if unpadded."""
        pads = {tuple(run.meta["pad"]) for run in self.conversation_runs() if run.meta.get("pad") is not None}
        if len(pads) > 1:
            raise ValueError(f"the runs of one conversation disagree on their padding: {sorted(pads)}")
        return torch.tensor(next(iter(pads))) if pads else None

    def cache_positions(self) -> Tensor:
        """RoPE position of every cache index, [batch, positions]; -1 at a row's left padding.

        Index i of row b holds position i - pad[b]: the runs that wrote the cache say so in their meta.
        """
        batch = self.manifest["state"]["tensors"]["kv.k"]["shape"][1]
        pad = self.conversation_pad()
        index = torch.arange(self.manifest["state"]["kv_positions"]).expand(batch, -1)
        if pad is not None:
            index = index - pad[:, None]
        return index.where(index >= 0, -1)

    def holds_clear_token_ids(self) -> bool:
        """Whether the device was sent token ids (`tokens`): then the conversation is readable with no attack."""
        return any("tokens" in run.tensors for run in self.conversation_runs())

    def _file(self, name: str) -> Any:
        if name not in self._files:
            self._files[name] = safe_open(self.directory / name, framework="pt")
        return self._files[name]


def _message(entry: dict[str, Any]) -> ViewMessage:
    ops = entry.get("ops")
    return ViewMessage(
        index=entry["index"],
        direction=entry["direction"],
        kind=entry["kind"],
        request=entry["request"],
        step=entry.get("step"),
        ops=None if ops is None else [(op, layer) for op, layer in ops],
        meta=entry["meta"],
        tensors={name: tensor["key"] for name, tensor in entry["tensors"].items()},
        held=[
            HeldValues(held["op"], held["layer"], {name: t["key"] for name, t in held["tensors"].items()})
            for held in entry.get("held", [])
        ],
    )

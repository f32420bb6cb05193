"""The enclave's KV cache under a memory budget: the newest positions stay in enclave memory, older
blocks are sealed with AES-GCM and kept by the device, and are opened (and authenticated) again
whenever attention reads them.

The device holds only ciphertext: it learns block sizes and when blocks are read, not their
contents. Each cache (one conversation) seals under its own fresh key, and the associated data
binds each block to its layer, first position and key/value kind, so a block dropped, altered,
moved to another position or layer, or replayed from an earlier conversation fails to open:
`IntegrityError`.
Cost: every step re-reads every sealed block of every layer (one extra round trip per layer).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..crypto.seal import SealedBlock, Sealer
from ..errors import IntegrityError
from ..model.config import ModelConfig
from .hardening import SecretMemory

# put(blocks by key) and get(keys) -> blocks by key: the device's sealed store, over the channel.
Put = Callable[[dict[str, Tensor]], None]
Get = Callable[[list[str]], dict[str, Tensor]]


class SealedKVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        max_len: int,
        resident_positions: int,
        block_positions: int,
        put: Put,
        get: Get,
        secret: SecretMemory,
    ):
        if resident_positions < block_positions:
            raise ValueError("the resident window must hold at least one block")
        self.max_len = max_len
        self.block = block_positions
        self.capacity = resident_positions
        self.sealer, self._put, self._get = Sealer(), put, get
        shape = (config.num_layers, batch, config.num_kv_heads, resident_positions, config.head_dim)
        self.k, self.v = secret.zeros(shape), secret.zeros(shape)
        self.sealed_upto = [0] * config.num_layers  # positions [0, sealed_upto) of a layer are on the device
        self.block_shape = (batch, config.num_kv_heads, block_positions, config.head_dim)

    @property
    def resident_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _key(self, layer: int, kind: str, start: int) -> str:
        return f"kv.{layer}.{kind}.{start}"

    def _opened(self, layer: int) -> dict[str, list[Tensor]]:
        """The layer's sealed key and value blocks, fetched in one round trip and opened."""
        starts = range(0, self.sealed_upto[layer], self.block)
        if not starts:
            return {"k": [], "v": []}
        keys = {kind: [self._key(layer, kind, start) for start in starts] for kind in ("k", "v")}
        stored = self._get([key + suffix for kind in keys for key in keys[kind] for suffix in (".ct", ".nonce")])
        opened: dict[str, list[Tensor]] = {}
        for kind, names in keys.items():
            opened[kind] = []
            for key, start in zip(names, starts):
                if key + ".ct" not in stored or key + ".nonce" not in stored:
                    raise IntegrityError(
                        f"the device did not return sealed KV block {key}",
                        "restart the device; the sealed part of this conversation is lost, so send the request again",
                    )
                block = SealedBlock(stored[key + ".ct"], stored[key + ".nonce"], torch.float32, self.block_shape)
                opened[kind].append(self.sealer.open(block, layer=layer, start=start, kind=kind))
        return opened

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v for positions [start, start+T) and return keys and values of every position so far."""
        end, sealed = start + k.shape[2], self.sealed_upto[layer]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        if start < sealed:
            raise ValueError(f"positions before {sealed} of layer {layer} are sealed; they cannot be rewritten")
        opened = self._opened(layer)
        keys = torch.cat([*opened["k"], self.k[layer, :, :, : start - sealed], k], dim=2)
        values = torch.cat([*opened["v"], self.v[layer, :, :, : start - sealed], v], dim=2)
        outgoing: dict[str, Tensor] = {}
        while end - sealed > self.capacity:
            for kind, full in (("k", keys), ("v", values)):
                block = self.sealer.seal(
                    full[:, :, sealed : sealed + self.block].contiguous(), layer=layer, start=sealed,
                    kind=kind,
                )  # fmt: skip
                key = self._key(layer, kind, sealed)
                outgoing.update({key + ".ct": block.ciphertext, key + ".nonce": block.nonce})
            sealed += self.block
        if outgoing:
            self._put(outgoing)
        self.k[layer, :, :, : end - sealed] = keys[:, :, sealed:end]
        self.v[layer, :, :, : end - sealed] = values[:, :, sealed:end]
        self.sealed_upto[layer] = sealed
        return keys, values

"""Sealing of enclave data parked on the untrusted device (the KV cache) with AES-256-GCM.

Why: the enclave's memory is small, so it hands blocks of its state to the device to hold. The device must
learn nothing from them and must not alter them, swap them or replay them elsewhere unnoticed: GCM gives
confidentiality and integrity, the associated data binds each block to its place (kind, layer, start
position) and form (dtype, shape), and the key is drawn per session and never leaves the Sealer, so blocks
of other sessions do not open either.

Nonces are a random 32-bit session prefix and a 64-bit counter: unique under the key by construction, with
no birthday bound as with random nonces, and sealing stops before the counter could wrap. A block does not
carry a version: if a caller seals the same (kind, layer, start) twice in one session (e.g. rewinding a
conversation), the older block also opens there, so such a caller must remember the nonce it expects or
start a new Sealer.
"""

from __future__ import annotations

import json
import operator
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from torch import Tensor

from ..errors import IntegrityError, SecureInferError

NONCE_BYTES = 12
TAG_BYTES = 16  # each block's ciphertext is its plaintext plus this tag; the nonce travels beside it
_COUNTER_LIMIT = 2**64


@dataclass(frozen=True)
class SealedBlock:
    """What the device holds: ciphertext and nonce as uint8 tensors (our wire format carries tensors) and the
    public metadata needed to rebuild the tensor; all of it is authenticated."""

    ciphertext: Tensor  # uint8 [nbytes + TAG_BYTES]
    nonce: Tensor  # uint8 [NONCE_BYTES]
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class SealStats:
    blocks_sealed: int = 0
    bytes_sealed: int = 0  # plaintext bytes; each block adds TAG_BYTES + NONCE_BYTES on the wire
    seal_s: float = 0.0
    blocks_opened: int = 0
    bytes_opened: int = 0
    open_s: float = 0.0

    def __add__(self, other: SealStats) -> SealStats:
        return SealStats(**{name: value + getattr(other, name) for name, value in vars(self).items()})


def _aad(kind: str, layer: int, start: int, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    # JSON keeps the fields apart: no kind string can forge another field's value
    fields = ["secureinfer-seal-v1", kind, operator.index(layer), operator.index(start), str(dtype), list(shape)]
    return json.dumps(fields, separators=(",", ":")).encode()


def _tampered(kind: str, layer: int, start: int) -> IntegrityError:
    return IntegrityError(
        f"the sealed {kind!r} block of layer {layer} at position {start} failed authentication: "
        "the device altered, swapped or replayed sealed enclave data",
        "restart the device; this session's sealed KV cache is lost, so the conversation must be prefilled again",
    )


def _to_uint8(data: bytes) -> Tensor:
    # filled in place rather than torch.from_numpy: an empty array would come back with stride 0, which
    # cannot be viewed as a wider dtype
    out = torch.empty(len(data), dtype=torch.uint8)
    out.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return out


class Sealer:
    """Seals tensors for one session under a fresh AES-256-GCM key that nothing outside can read."""

    def __init__(self) -> None:
        self._aead = AESGCM(AESGCM.generate_key(bit_length=256))  # the key lives only inside this object
        self._prefix = os.urandom(4)
        self._counter = 0
        self._lock = threading.Lock()  # a nonce handed out twice would break GCM entirely
        self.seal_stats = SealStats()

    def __repr__(self) -> str:
        return f"Sealer(blocks_sealed={self.seal_stats.blocks_sealed}, blocks_opened={self.seal_stats.blocks_opened})"

    def _next_nonce(self) -> bytes:
        with self._lock:
            if self._counter >= _COUNTER_LIMIT:
                raise SecureInferError(
                    "this session has sealed 2^64 blocks, as many as its key can seal with unique nonces",
                    "start a new session, which gets a fresh key",
                )
            counter = self._counter
            self._counter += 1
        return self._prefix + counter.to_bytes(8, "big")

    def seal(self, tensor: Tensor, *, layer: int, start: int, kind: str) -> SealedBlock:
        """Encrypt and authenticate `tensor` (any dtype, any device) for the place (kind, layer, start)."""
        began = time.perf_counter()
        shape = tuple(tensor.shape)
        plain = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        nonce = self._next_nonce()
        ciphertext = self._aead.encrypt(nonce, plain, _aad(kind, layer, start, tensor.dtype, shape))
        block = SealedBlock(_to_uint8(ciphertext), _to_uint8(nonce), tensor.dtype, shape)
        self.seal_stats.blocks_sealed += 1
        self.seal_stats.bytes_sealed += plain.nbytes
        self.seal_stats.seal_s += time.perf_counter() - began
        return block

    def open(self, block: SealedBlock, *, layer: int, start: int, kind: str) -> Tensor:
        """The tensor sealed for (kind, layer, start), bit for bit; IntegrityError if anything was altered."""
        began = time.perf_counter()
        wellformed = (
            all(
                isinstance(t, Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                for t in (block.ciphertext, block.nonce)
            )
            and block.nonce.numel() == NONCE_BYTES
            and isinstance(block.dtype, torch.dtype)
            and isinstance(block.shape, tuple)
            and all(isinstance(d, int) and d >= 0 for d in block.shape)
        )
        if not wellformed:
            raise _tampered(kind, layer, start)
        try:
            plain = self._aead.decrypt(
                block.nonce.contiguous().numpy(),
                block.ciphertext.contiguous().numpy(),
                _aad(kind, layer, start, block.dtype, block.shape),
            )
        except InvalidTag:
            raise _tampered(kind, layer, start) from None
        tensor = _to_uint8(plain).view(block.dtype).reshape(block.shape)
        self.seal_stats.blocks_opened += 1
        self.seal_stats.bytes_opened += len(plain)
        self.seal_stats.open_s += time.perf_counter() - began
        return tensor

"""One-time pads for blinded products: r uniform in Z_P from a CSPRNG, u = r W mod P.

Pads are precomputed per weight in batches, one integer GEMM per batch (the weight is read once for
many future tokens), and handed out row by row exactly once: a row leaves the pool when taken, so
no pad can be used twice (reuse lets the device solve for secrets; arXiv 2602.11088).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import Tensor

from .field import P, field_matmul

FIELD_BITS = P.bit_length()


def random_bytes(count: int) -> bytes:
    """`count` bytes of ChaCha20 keystream under a fresh 256-bit key from the OS CSPRNG (counter from 0).

    The same construction as Linux's own getrandom, at ~3x its speed here: pads need ~0.8 MB of randomness
    per token for SmolLM2, and reading it from os.urandom was most of the pad work. One key per call keeps
    every call's stream independent; 2^32 blocks of 64 bytes per key is far beyond any pad batch.
    """
    nonce = bytes(4) + os.urandom(12)  # 32-bit block counter at 0, then the nonce
    return Cipher(algorithms.ChaCha20(os.urandom(32), nonce), mode=None).encryptor().update(bytes(count))


def uniform_field(rows: int, cols: int) -> Tensor:
    """Uniform elements of Z_P: 35 random bits each, redrawing the 31 values >= P (rejection), so exactly
    uniform given uniform bits (here: indistinguishable from uniform, as ChaCha20's keystream is)."""
    count, parts, filled = rows * cols, [], 0
    while filled < count:
        draws = np.frombuffer(random_bytes(8 * (count - filled)), dtype=np.int64) & ((1 << FIELD_BITS) - 1)
        if (draws >= P).any():  # about once in 10^9 draws
            draws = draws[draws < P]
        parts.append(draws)
        filled += len(draws)
    values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return torch.from_numpy(values).view(rows, cols)


@dataclass
class _Batch:
    r: Tensor  # int64 [rows, in]
    u: Tensor  # int64 [rows, out]
    next_row: int = 0

    @property
    def nbytes(self) -> int:
        return (self.r.numel() + self.u.numel()) * 8

    @property
    def left(self) -> int:
        return self.r.shape[0] - self.next_row


@dataclass
class PadStats:
    generated_rows: int = 0
    used_rows: int = 0
    offline_s: float = 0.0  # all pad generation, background or not
    offline_macs: int = 0  # multiply-adds of the pad GEMMs, i.e. rows * in * out per batch
    batches: int = 0
    stalls: int = 0  # takes that found too few pads and generated them on the spot
    stall_s: float = 0.0  # the part of offline_s spent on the request's critical path


class PadPool:
    """Per-weight pools of (r, u) pads, refilled in GEMM batches; optionally by a background thread.

    With `background`, a daemon thread keeps at least `batch_rows // 2` rows ready per weight, so
    decode never waits for a pad GEMM: the thread works while the enclave waits for the device.
    A take that still finds too few rows generates them on the spot: a stall. One of a batch or more (a prefill)
    gets a batch of its own; a smaller one refills the pool.
    """

    def __init__(self, weights_t: dict[str, Tensor], batch_rows: int = 32, background: bool = False):
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be an integer >= 1, not {batch_rows!r}")
        self.weights_t = weights_t  # int8 [in, out] per weight name
        self.batch_rows = batch_rows
        self.low_water = max(1, batch_rows // 2)
        self.stats = PadStats()
        self._pools: dict[str, list[_Batch]] = {name: [] for name in weights_t}
        self._held_bytes = 0  # of every batch still pooled, spent rows included: kept, not summed per take
        self._lock = threading.Lock()
        self._wake = threading.Event()
        # Pools below low water, in the order they fell: the refill thread tops up only these, so a take
        # costs the request path no scan of every pool (121 for SmolLM2) under the GIL.
        self._low: dict[str, None] = dict.fromkeys(weights_t)
        self._closed = False
        self._thread: threading.Thread | None = None
        if background and weights_t:
            self._thread = threading.Thread(target=self._refill_loop, name="pad-refill", daemon=True)
            self._thread.start()

    def take(self, name: str, rows: int) -> tuple[Tensor, Tensor]:
        """`rows` fresh pads for weight `name`: (r [rows, in], u [rows, out]). Each row is handed out once."""
        with self._lock:
            short = self._left(name) < rows
        if short and rows >= self.batch_rows:
            # A prompt longer than the pool holds: a batch of its own, handed out whole, which leaves the pool's rows
            # to the steps after it and spares copying them in front (a 454-token prefill: 118 ms of copies).
            began = time.perf_counter()
            r, u = self._draw(name, rows)
            with self._lock:
                self.stats.used_rows += rows
                self.stats.stalls += 1
                self.stats.stall_s += time.perf_counter() - began
            return r, u
        rs, us, needed = [], [], rows
        while True:
            with self._lock:
                pool = self._pools[name]
                while needed and pool:
                    batch = pool[0]
                    end = min(batch.next_row + needed, batch.r.shape[0])
                    rs.append(batch.r[batch.next_row : end])
                    us.append(batch.u[batch.next_row : end])
                    needed -= end - batch.next_row
                    batch.next_row = end
                    if not batch.left:
                        pool.pop(0)  # spent: drop it so nothing can hand its rows out again
                        self._held_bytes -= batch.nbytes
                if not needed:
                    self.stats.used_rows += rows
                    running_low = self._left(name) < self.low_water and name not in self._low
                    if running_low:
                        self._low[name] = None
                    break
            began = time.perf_counter()
            self.refill(name, max(needed, self.batch_rows))
            with self._lock:
                self.stats.stalls += 1
                self.stats.stall_s += time.perf_counter() - began
        if running_low:
            self._wake.set()
        if len(rs) == 1:  # the usual decode step: one batch serves it, and a slice needs no copy
            return rs[0], us[0]
        return torch.cat(rs), torch.cat(us)

    def refill(self, name: str, rows: int) -> None:
        """Offline work: draw `rows` pads for `name` into its pool."""
        r, u = self._draw(name, rows)
        with self._lock:
            batch = _Batch(r, u)
            self._pools[name].append(batch)
            self._held_bytes += batch.nbytes

    def _draw(self, name: str, rows: int) -> tuple[Tensor, Tensor]:
        """`rows` pads for `name`, their products in one GEMM, counted as generated."""
        began = time.perf_counter()
        weight_t = self.weights_t[name]
        r = uniform_field(rows, weight_t.shape[0])
        u = field_matmul(r, weight_t)
        with self._lock:
            self.stats.generated_rows += rows
            self.stats.batches += 1
            self.stats.offline_macs += rows * weight_t.shape[0] * weight_t.shape[1]
            self.stats.offline_s += time.perf_counter() - began
        return r, u

    def prefill(self, rows: int) -> None:
        """Fill every weight's pool with `rows` pads ahead of use (the offline phase)."""
        for name in self.weights_t:
            self.refill(name, rows)

    def available(self, name: str) -> int:
        with self._lock:
            return self._left(name)

    def _left(self, name: str) -> int:
        return sum(batch.left for batch in self._pools[name])

    def held_bytes(self) -> int:
        with self._lock:
            return self._held_bytes

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _refill_loop(self) -> None:
        while not self._closed:
            self._wake.clear()  # before looking: a take after this point wakes the next wait
            with self._lock:
                low = list(self._low)
            if not low:
                self._wake.wait()
                continue
            for name in low:
                if self._closed:
                    return
                self.refill(name, self.batch_rows)
                with self._lock:
                    if self._left(name) >= self.low_water:
                        del self._low[name]

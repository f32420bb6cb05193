"""One-time pads for blinded products: r uniform in Z_P from the OS CSPRNG, u = r W mod P.

Pads are precomputed per weight in batches, one integer GEMM per batch (the weight is read once for
many future tokens), and handed out row by row exactly once: a row leaves the pool when taken, so
no pad can be used twice (reuse lets the device solve for secrets; arXiv 2602.11088).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .field import P, field_matmul

FIELD_BITS = P.bit_length()


def uniform_field(rows: int, cols: int) -> Tensor:
    """Exactly uniform elements of Z_P: 35 random bits each, redrawing the 31 values >= P (rejection)."""
    count = rows * cols
    out = np.empty(count, dtype=np.int64)
    filled = 0
    while filled < count:
        need = count - filled
        draws = np.frombuffer(os.urandom(8 * need), dtype=np.uint64) & np.uint64((1 << FIELD_BITS) - 1)
        draws = draws[draws < P].astype(np.int64)
        out[filled : filled + len(draws)] = draws
        filled += len(draws)
    return torch.from_numpy(out).view(rows, cols)


@dataclass
class _Batch:
    r: Tensor  # int64 [rows, in]
    u: Tensor  # int64 [rows, out]
    next_row: int = 0


@dataclass
class PadStats:
    generated_rows: int = 0
    used_rows: int = 0
    offline_s: float = 0.0
    offline_macs: int = 0  # multiply-adds of the pad GEMMs, i.e. rows * in * out per batch
    batches: int = 0


@dataclass
class PadPool:
    weights_t: dict[str, Tensor]  # int8 [in, out] per weight name
    batch_rows: int = 32  # future token rows precomputed per GEMM
    stats: PadStats = field(default_factory=PadStats)
    _pools: dict[str, list[_Batch]] = field(default_factory=dict)

    def take(self, name: str, rows: int) -> tuple[Tensor, Tensor]:
        """`rows` fresh pads for weight `name`: (r [rows, in], u [rows, out]). Each row is handed out once."""
        rs, us, needed = [], [], rows
        pool = self._pools.setdefault(name, [])
        while needed:
            if not pool:
                self.refill(name, max(needed, self.batch_rows))
            batch = pool[0]
            end = min(batch.next_row + needed, batch.r.shape[0])
            rs.append(batch.r[batch.next_row : end])
            us.append(batch.u[batch.next_row : end])
            needed -= end - batch.next_row
            batch.next_row = end
            if end == batch.r.shape[0]:
                pool.pop(0)  # spent: drop it so nothing can hand its rows out again
        self.stats.used_rows += rows
        return torch.cat(rs), torch.cat(us)

    def refill(self, name: str, rows: int) -> None:
        """Offline work: draw `rows` pads for `name` and compute their products in one GEMM."""
        began = time.perf_counter()
        weight_t = self.weights_t[name]
        r = uniform_field(rows, weight_t.shape[0])
        u = field_matmul(r, weight_t)
        self._pools.setdefault(name, []).append(_Batch(r, u))
        self.stats.generated_rows += rows
        self.stats.batches += 1
        self.stats.offline_macs += rows * weight_t.shape[0] * weight_t.shape[1]
        self.stats.offline_s += time.perf_counter() - began

    def prefill(self, rows: int) -> None:
        """Fill every weight's pool with `rows` pads ahead of use (the offline phase)."""
        for name in self.weights_t:
            self.refill(name, rows)

    def held_bytes(self) -> int:
        return sum((b.r.numel() + b.u.numel()) * 8 for pool in self._pools.values() for b in pool)

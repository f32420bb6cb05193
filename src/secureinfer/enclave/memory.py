"""Enclave memory accounting against an EPC budget, with a model of SGX paging past it.

Policy (documented in the README): the enclave never refuses to run. Every tensor it holds is
counted; when the peak exceeds the budget, the excess is modelled as paged: every forward step
touches all resident weights and the KV cache once, so each step pages the excess in again, at
~40k cycles per 4 KiB page (SGX EPC paging, DESIGN §2).
"""

from __future__ import annotations

import math

from torch import Tensor

PAGE_BYTES = 4096
CYCLES_PER_PAGE = 40_000
MIB = 1 << 20


class EnclaveMemory:
    def __init__(self, budget_bytes: int | None = None):
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError("the EPC budget must be positive")
        self.budget_bytes = budget_bytes
        self._held: dict[str, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def hold(self, name: str, tensor: Tensor) -> Tensor:
        self._set(name, tensor.numel() * tensor.element_size())
        return tensor

    def observe(self, name: str, nbytes: int) -> None:
        """Transient holdings (a step's activations): the latest size counts toward the peak."""
        self._set(name, nbytes)

    def release(self, name: str) -> None:
        self._set(name, 0)

    def held_bytes(self, prefix: str = "") -> int:
        return sum(n for name, n in self._held.items() if name.startswith(prefix))

    def _set(self, name: str, nbytes: int) -> None:
        self.current_bytes += nbytes - self._held.get(name, 0)
        if nbytes:
            self._held[name] = nbytes
        else:
            self._held.pop(name, None)
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def report(self) -> dict:
        over = 0 if self.budget_bytes is None else max(0, self.peak_bytes - self.budget_bytes)
        pages = math.ceil(over / PAGE_BYTES)
        return {
            "budget_bytes": self.budget_bytes,  # None: no limit set
            "peak_bytes": self.peak_bytes,
            "current_bytes": self.current_bytes,
            "over_budget_bytes": over,
            "paged_pages_per_step": pages,
            "paging_cycles_per_step": pages * CYCLES_PER_PAGE,
            "policy": "page" if self.budget_bytes is not None else "no limit",
        }

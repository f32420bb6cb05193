"""Arithmetic mod P on int64 tensors, and exact products of field elements with int8 weights.

P = 2^35 - 31 (prime). Why this size: a blinded activation is uniform in [0, P), and the device
multiplies it by int8 weights. Split into five 7-bit limbs, each limb row times an int8 matrix
sums at most 1536 * 127 * 127 < 2^31 per output, so `torch._int_mm` (int8 x int8 -> int32) is
exact; recombined in int64 (< 2^63), everything stays exact. The signed results we recover must
fit in (-P/2, P/2): with 17-bit activations (|x| <= 65535) and int8 weights over an inner
dimension of up to 2048, |x W| <= 2048 * 65535 * 127 < 2^34 = P/2. A float64 GEMM would also be
exact (1536 * 127 * P < 2^53) but reads 8 bytes per weight instead of 1.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

P = 2**35 - 31
LIMB_BITS = 7
LIMBS = 5  # 5 * 7 = 35 bits: every element of [0, P)
MAX_INNER_DIM = 2048  # the bound above; larger layers would need a larger P or narrower activations


def to_signed(values: Tensor) -> Tensor:
    """Field elements in [0, P) to the signed integers in (-P/2, P/2) they stand for."""
    return torch.where(values > P // 2, values - P, values)


# The float32 route: six 6-bit limbs. Every partial sum of a limb row times int8 weights is an integer of
# magnitude at most 2048 * 63 * 127 < 2^24, so float32 represents each one exactly, in any summation order.
FLOAT_LIMB_BITS = 6
FLOAT_LIMBS = 6  # 36 bits >= 35
BACKENDS = ("int8", "float32")


def _limb_products(rows: Tensor, weight_t: Tensor, backend: str) -> tuple[Tensor, int]:
    """Each limb of `rows` times the weight, stacked [limbs, n, out] as exact integers; and the limb width."""
    bits, count = (LIMB_BITS, LIMBS) if backend == "int8" else (FLOAT_LIMB_BITS, FLOAT_LIMBS)
    limbs = torch.stack([(rows >> (bits * i)) & ((1 << bits) - 1) for i in range(count)]).reshape(-1, rows.shape[-1])
    if backend == "int8":
        partial = torch._int_mm(limbs.to(torch.int8), weight_t)
    else:
        partial = limbs.to(torch.float32) @ weight_t.to(torch.float32)
    return partial.view(count, rows.shape[0], -1), bits


def field_matmul(values: Tensor, weight_t: Tensor, backend: str | None = None) -> Tensor:
    """(values @ weight_t) mod P, exact. values: int64 [n, d] in [0, P); weight_t: int8 [d, out] (or, for the
    float32 route, its float32 copy, which a caller that multiplies by it often keeps to save the conversion).

    `backend`: "int8" (torch._int_mm, reads 1 byte per weight) or "float32" (an ordinary GEMM on a float copy
    of the weight); both are exact. By default the faster on this CPU: `_int_mm` has a fast kernel only where
    the CPU has int8 dot-product instructions (AVX512-VNNI, AMX); elsewhere it runs ~30x below float32.
    """
    if values.shape[-1] > MAX_INNER_DIM:
        raise ValueError(f"inner dimension {values.shape[-1]} exceeds {MAX_INNER_DIM}, where exactness is proven")
    rows = values.reshape(-1, values.shape[-1])
    partial, bits = _limb_products(rows, weight_t, backend or fastest_backend())
    total = torch.zeros(partial.shape[1:], dtype=torch.int64)
    for i in range(partial.shape[0]):
        total += partial[i].to(torch.int64) << (bits * i)
    return (total % P).view(*values.shape[:-1], -1)


@functools.cache
def fastest_backend() -> str:
    """Time both backends once per process on a layer-sized product and keep the faster."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, P, (8, 576), generator=generator)
    weight_t = torch.randint(-127, 128, (576, 768), generator=generator, dtype=torch.int8)
    timings = {}
    for backend in BACKENDS:
        _limb_products(rows, weight_t, backend)  # warm-up
        began = time.perf_counter()
        for _ in range(2):
            _limb_products(rows, weight_t, backend)
        timings[backend] = time.perf_counter() - began
    return min(timings, key=timings.get)

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

import torch
from torch import Tensor

P = 2**35 - 31
LIMB_BITS = 7
LIMBS = 5  # 5 * 7 = 35 bits: every element of [0, P)
MAX_INNER_DIM = 2048  # the bound above; larger layers would need a larger P or narrower activations


def to_signed(values: Tensor) -> Tensor:
    """Field elements in [0, P) to the signed integers in (-P/2, P/2) they stand for."""
    return torch.where(values > P // 2, values - P, values)


def field_matmul(values: Tensor, weight_t: Tensor) -> Tensor:
    """(values @ weight_t) mod P, exact. values: int64 [n, d] in [0, P); weight_t: int8 [d, out]."""
    if values.shape[-1] > MAX_INNER_DIM:
        raise ValueError(f"inner dimension {values.shape[-1]} exceeds {MAX_INNER_DIM}, where exactness is proven")
    rows = values.reshape(-1, values.shape[-1])
    limbs = torch.stack([(rows >> (LIMB_BITS * i)) & ((1 << LIMB_BITS) - 1) for i in range(LIMBS)])
    partial = torch._int_mm(limbs.reshape(-1, rows.shape[-1]).to(torch.int8), weight_t).view(LIMBS, rows.shape[0], -1)
    total = torch.zeros(partial.shape[1:], dtype=torch.int64)
    for i in range(LIMBS):
        total += partial[i].to(torch.int64) << (LIMB_BITS * i)
    return (total % P).view(*values.shape[:-1], -1)

"""int8 weights with per-output-channel scales, fixed-point activations with per-row scales, and the
exact integer product in between. Both the clear int8 pipeline and the blinded one call these same
functions, which is why they agree bit for bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .field import P, signed_matmul

WEIGHT_QMAX = 127
ACTIVATION_QMAX = 2**16 - 1  # 17-bit signed fixed point up to an inner dimension of 2048; see field.py


@functools.cache
def activation_qmax(inner_dim: int) -> int:
    """The largest |x| for inputs of an `inner_dim`-wide product: |x W| <= inner_dim * qmax * 127 must stay
    within P // 2 for the blinded product to unpad exactly. 65535 up to 2048; 52,841 for SmolLM2-360M's
    FFN (2560); 12,288 (~15 bits) for LLaMA-2-7B's (11008)."""
    return min(ACTIVATION_QMAX, (P // 2) // (inner_dim * WEIGHT_QMAX))


@dataclass
class QuantizedWeight:
    weight_t: Tensor  # int8 [in, out]: transposed, the layout the integer GEMM reads
    scale: Tensor  # float32 [out]

    @functools.cached_property
    def scale64(self) -> Tensor:
        """`scale` in float64, the type the rescale multiplies in: converted once, not on every product."""
        return self.scale.to(torch.float64)


def quantize_weight(weight: Tensor) -> QuantizedWeight:
    """weight: float32 [out, in] -> int8 with one scale per output channel."""
    scale = (weight.abs().amax(dim=1) / WEIGHT_QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(weight / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)
    return QuantizedWeight(q.t().contiguous(), scale.float())


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """x: float32 [..., d] -> (int64 values in [-qmax, qmax], float32 scale per row [..., 1]), qmax =
    `activation_qmax(d)`."""
    qmax = activation_qmax(x.shape[-1])
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_(min=torch.finfo(torch.float32).tiny)
    return (x / scale).round_().clamp_(-qmax, qmax).to(torch.int64), scale


def dequantize_product(product: Tensor, row_scale: Tensor, weight: QuantizedWeight) -> Tensor:
    """The exact integer product back to float32: product * row scale * channel scale. A float64 `product` is
    scaled in place (every caller's is a fresh result), which spares a prefill's products a copy each."""
    return product.to(torch.float64).mul_(row_scale.to(torch.float64)).mul_(weight.scale64).float()


def int8_linear(x: Tensor, weight: QuantizedWeight) -> Tensor:
    """The clear int8 pipeline: quantize, multiply exactly, rescale."""
    q, scale = quantize_activation(x)
    return dequantize_product(signed_matmul(q, weight.weight_t), scale, weight)

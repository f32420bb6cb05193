"""The enclave's two steps around each outsourced product: blind (quantize, add the pad) and unblind (take the
pad's product off, join the enclave's own columns, rescale).

Together they are ~25 small torch ops a product, ~40 us alone and ~150 us in a decode run, where each waits on
the product before or after it. `blind_kernels.cpp` does each in one pass (see `native`), with these same
steps in torch where it cannot build. The two give the same bits (tests), so `plain-int8`, which quantizes
and rescales in torch, still matches every blinded scheme.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from .field import P, centred_difference
from .native import build
from .quant import QuantizedWeight, activation_qmax, dequantize_product, quantize_activation

KERNELS = "blind_kernels.cpp"


def native_kernels() -> ModuleType | None:
    return build(KERNELS)[0]


def _kernels(native: bool | None) -> ModuleType | None:
    """native None: the compiled kernels where they built; True: them or an error; False: the torch steps."""
    if native is False:
        return None
    kernels = native_kernels()
    if native and kernels is None:
        raise RuntimeError(f"the compiled blinding kernels are unavailable: {build(KERNELS)[1]}")
    return kernels


def blind(x: Tensor, r: Tensor, native: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x float32 [..., d] -> (q int64 [n, d], its rows' scales float32 [..., 1], q + r mod P int64 [n, d]), for
    pads r int64 [n, d] in [0, P), n rows of x. `native`: None, the compiled kernel where it built."""
    kernels = _kernels(native)
    rows = x.reshape(-1, x.shape[-1])
    if kernels is None:
        q, row_scale = quantize_activation(rows)
        return q, row_scale.view(*x.shape[:-1], 1), torch.add(q, r).remainder_(P)  # q in [-qmax, qmax]: one reduction
    qmax = activation_qmax(x.shape[-1])
    q, row_scale, padded = kernels.quantize_pad(rows.contiguous(), r.contiguous(), qmax, P, True)  # True: AVX512
    return q, row_scale.view(*x.shape[:-1], 1), padded


def unblind(
    y: Tensor, u: Tensor, own: Tensor | None, row_scale: Tensor, weight: QuantizedWeight, native: bool | None = None
) -> Tensor:
    """The device's padded product y [n, c] less u = rW, centred, then the enclave's own columns own [n, c'] (or
    None), rescaled: float32 [n, c + c']. y must already be an int64 tensor of u's shape (the caller checks what
    the device sent)."""
    kernels = _kernels(native)
    if kernels is not None:
        own = torch.empty((u.shape[0], 0), dtype=torch.float64) if own is None else own.contiguous()
        flat_scale = row_scale.reshape(-1).contiguous()
        return kernels.unpad_rescale(y.contiguous(), u.contiguous(), own, flat_scale, weight.scale64, P, True)
    product = centred_difference(y, u)
    if own is not None:  # each half converted as it is copied in: no cat of a converted copy
        joined = product.new_empty((product.shape[0], product.shape[1] + own.shape[1]), dtype=torch.float64)
        joined[:, : product.shape[1]].copy_(product)
        joined[:, product.shape[1] :].copy_(own)
        product = joined
    return dequantize_product(product, row_scale.reshape(-1, 1), weight)

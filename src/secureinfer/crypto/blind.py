"""The enclave's two steps around each outsourced product: blind (quantize, add the pad) and unblind (take the
pad's product off, join the enclave's own columns, rescale).

A decode step runs them 121 times a token on one row each, so their cost is the number of small torch ops,
not arithmetic: ~25 ops, ~40 us alone and ~150 us in a decode run, where each waits on the product before or
after it. `blind_kernels.cpp` does each step in one pass; it is compiled once per machine (torch's C++
extension build, cached) and used where it builds, with these same steps in torch otherwise. The two give the
same bits (tests), so `plain-int8`, which quantizes and rescales in torch, still matches every blinded scheme.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from .field import P, centred_difference
from .quant import QuantizedWeight, activation_qmax, dequantize_product, quantize_activation

KERNELS_SOURCE = Path(__file__).with_name("blind_kernels.cpp")
# Set to 0 to run the torch steps (to compare, or where no C++ compiler may run).
NATIVE_ENV = "SECUREINFER_NATIVE"


@functools.cache
def native_kernels() -> ModuleType | None:
    """The compiled kernels, built on first use (~25 s, then cached by torch), or None where they cannot be."""
    return _build()[0]


@functools.cache
def _build() -> tuple[ModuleType | None, str]:
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None, f"{NATIVE_ENV}=0"
    from torch.utils.cpp_extension import load

    try:
        return load("secureinfer_blind_kernels", [str(KERNELS_SOURCE)], extra_cflags=["-O3"], verbose=False), "built"
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:  # no compiler or ninja, a failed build
        return None, f"{type(error).__name__}: {error}"[:300]


def _kernels(native: bool | None) -> ModuleType | None:
    """native None: the compiled kernels where they built; True: them or an error; False: the torch steps."""
    if native is False:
        return None
    kernels = native_kernels()
    if native and kernels is None:
        raise RuntimeError(f"the compiled blinding kernels are unavailable: {_build()[1]}")
    return kernels


def native_status() -> dict:
    """Whether the blinding steps run compiled, and why not if they do not (reported in `SecureLM.stats()`)."""
    kernels, reason = _build()
    return {"native": kernels is not None, "reason": reason}


def blind(x: Tensor, r: Tensor, native: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x float32 [..., d] -> (q int64 [n, d], its rows' scales float32 [..., 1], q + r mod P int64 [n, d]), for
    pads r int64 [n, d] in [0, P), n rows of x. `native`: None, the compiled kernel where it built."""
    kernels = _kernels(native)
    rows = x.reshape(-1, x.shape[-1])
    if kernels is None:
        q, row_scale = quantize_activation(rows)
        return q, row_scale.view(*x.shape[:-1], 1), torch.add(q, r).remainder_(P)  # q in [-qmax, qmax]: one reduction
    q, row_scale, padded = kernels.quantize_pad(rows.contiguous(), r.contiguous(), activation_qmax(x.shape[-1]), P)
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
        return kernels.unpad_rescale(y.contiguous(), u.contiguous(), own, flat_scale, weight.scale64, P)
    product = centred_difference(y, u)
    if own is not None:  # each half converted as it is copied in: no cat of a converted copy
        joined = product.new_empty((product.shape[0], product.shape[1] + own.shape[1]), dtype=torch.float64)
        joined[:, : product.shape[1]].copy_(product)
        joined[:, product.shape[1] :].copy_(own)
        product = joined
    return dequantize_product(product, row_scale.reshape(-1, 1), weight)

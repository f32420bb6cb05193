"""Arithmetic mod P on int64 tensors, and exact products of field elements with int8 weights.

P = 2^35 - 31 (prime). Why this size: a blinded activation is uniform in [0, P), and the device
multiplies it by int8 weights. Split into five 7-bit limbs, each limb row times an int8 matrix
sums at most 2048 * 127 * 127 < 2^31 per output, so `torch._int_mm` (int8 x int8 -> int32) is
exact. The signed results we recover must fit in (-P/2, P/2): with 17-bit activations
(|x| <= 65535) and int8 weights over an inner dimension of up to 2048, |x W| <= 2048 * 65535 * 127
< 2^34 = P/2; wider layers quantize their inputs more coarsely (`quant.activation_qmax`), so the
bound holds at any width.

A product over an inner dimension wider than `CHUNK` = 2048 is the sum of its 2048-wide slices' products:
each slice obeys every bound below, and up to 2^9 slice results (each < 2^53) add exactly in int64 before
the one reduction mod P.

Three exact routes compute the same integers; `fastest_backend` picks one per process:
- int8: five 7-bit limbs through `torch._int_mm`, 1 byte per weight; fast only on CPUs with int8
  dot-product instructions (AVX512-VNNI, AMX), elsewhere ~30x below a float32 GEMM.
- float32: six 6-bit limbs as one float32 GEMM; each partial sum is below 2048 * 63 * 127 < 2^24.
- float64: the field element itself, centred in (-P/2, P/2), as one float64 GEMM; each partial sum
  is below 2048 * 127 * 2^34 < 2^53. One row per row instead of six: on an AVX2 CPU 2.7-7x faster
  than float32 for one row (decode) and ~2.5x for 64 (prefill).
On a CPU with AMX (this project's later machines), the int8 route is the fastest for one row: a 576 x 8192
weight in ~0.7 ms against ~1.7 ms in float64 on one thread.
The int8 route multiplies a large weight packed once for oneDNN's int8 GEMM where torch has that op
(`PackedInt8Weight`), and otherwise calls `torch._int_mm`, which repacks its weight on every call.
Every partial sum is an integer the float type holds exactly, so the result is exact in any summation
order (a BLAS may block and reorder freely; none uses Strassen-like schemes, which would not be).
"""

from __future__ import annotations

import functools
import time
from types import ModuleType
from typing import Callable

import torch
from torch import Tensor

from .native import build

P = 2**35 - 31
LIMB_BITS = 7
LIMBS = 5  # 5 * 7 = 35 bits: every element of [0, P)
CHUNK = 2048  # inner dimensions per exact product: the bounds of every route hold up to here
MAX_INNER_DIM = CHUNK * 2**9  # slice results summed in int64 before one reduction


def to_signed(values: Tensor) -> Tensor:
    """Field elements in [0, P) to the signed integers in (-P/2, P/2) they stand for."""
    return torch.where(values > P // 2, values - P, values)


def centred_difference(a: Tensor, b: Tensor) -> Tensor:
    """to_signed((a - b) mod P) for a, b in [0, P), in place on one new tensor: (a - b + P//2) mod P - P//2
    is the same integer in (-P/2, P/2), in four steps that allocate once (the enclave does this on every
    outsourced product it unpads)."""
    return (a - b).add_(P // 2).remainder_(P).sub_(P // 2)


FLOAT_LIMB_BITS = 6
FLOAT_LIMBS = 6  # 36 bits >= 35
BACKENDS = ("int8", "float32", "float64")
# A CUDA GPU takes the float routes alone: torch._int_mm there needs more than 16 rows, and a decode step's
# product has 5 (its limbs). cuBLAS's float32 and float64 GEMMs are exact on these integers as on a CPU, provided
# float32 products are not rounded to TF32 (`keep_float32_exact`).
CUDA_BACKENDS = ("float32", "float64")
# Outputs per limb from which limb products recombine by in-place Horner rather than one small float64
# product (measured crossover ~30k: 1 x 3072 13 vs 29 us; 512 x 3072 47 vs 16 ms).
HORNER_FROM = 32768
# Input elements from which the int8 route cuts limbs from bytes rather than shifting int64s: below it the
# shifts' three operations beat the bytes' ten (a decode row: 6 against ~15 us).
BYTE_LIMBS_FROM = 16384
# Inner dimensions up to which two adjacent int8 limb products fit one int32 (see _exact_product).
PAIRED_LIMBS_UP_TO = 1024
WEIGHT_DTYPES = {"int8": torch.int8, "float32": torch.float32, "float64": torch.float64}


# oneDNN's int8 GEMM reorders its weight into a blocked layout on every call unless it is handed one packed ahead,
# which torch._int_mm cannot be. The reorder shows for a large weight: SmolLM2's LM head half (576 x 24576, one
# row, one thread, out of cache as in a decode step) takes 3.7 ms through torch._int_mm and 2.4 ms packed, where
# a decoder layer's weights (<= 3 MiB) take the same time or less unpacked. So weights of PACK_FROM_BYTES or more
# are packed.
PACK_FROM_BYTES = 4 << 20
# The packed GEMM returns float32, exact while every sum stays below 2^24: 1024 * 127 * 127 < 2^24 for the 7-bit
# limbs of both routes. Wider weights are not packed (slicing them to fit cost more than the packing saved).
PACKED_MAX_INNER_DIM = 1024


class PackedInt8Weight:
    """An int8 weight [in, out], in <= PACKED_MAX_INNER_DIM, packed for oneDNN's int8 GEMM (see `product_weight`).

    It holds the same bytes as the weight, in oneDNN's own memory."""

    def __init__(self, weight_t: Tensor):
        if weight_t.shape[0] > PACKED_MAX_INNER_DIM:
            raise ValueError(f"a packed weight has at most {PACKED_MAX_INNER_DIM} inputs, not {weight_t.shape[0]}")
        self.shape = tuple(weight_t.shape)
        self.nbytes = weight_t.numel()
        self._packed = torch.ops.onednn.qlinear_prepack(weight_t.t().contiguous(), None)
        self._unit_scales = torch.ones(self.shape[1])
        self._zero_points = torch.zeros(self.shape[1], dtype=torch.int64)

    def int_mm(self, limbs: Tensor) -> Tensor:
        """limbs int8 [n, in] times the weight, as the int32 `torch._int_mm` returns; exact (PACKED_MAX_INNER_DIM)."""
        product = torch.ops.onednn.qlinear_pointwise(
            limbs, 1.0, 0, self._packed, self._unit_scales, self._zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return product.to(torch.int32)


def _int_mm(limbs: Tensor, weight: Tensor | PackedInt8Weight) -> Tensor:
    return weight.int_mm(limbs) if isinstance(weight, PackedInt8Weight) else torch._int_mm(limbs, weight)


@functools.cache
def packing_available() -> bool:
    """Whether this torch has oneDNN's packed int8 GEMM, and it gives the exact integers at its bound: odd sums
    just below +-2^24 (past it, float32 holds only even integers)."""
    weight_t = torch.full((PACKED_MAX_INNER_DIM, 2), 127, dtype=torch.int8)
    weight_t[:, 1] = -127
    weight_t[0] = torch.tensor([126, -126])
    try:
        got = PackedInt8Weight(weight_t).int_mm(torch.full((3, PACKED_MAX_INNER_DIM), 127, dtype=torch.int8))
    except (AttributeError, RuntimeError):  # no oneDNN in this build, or no int8 kernel on this CPU
        return False
    largest = PACKED_MAX_INNER_DIM * 127 * 127 - 127
    return got.tolist() == [[largest, -largest]] * 3


@functools.cache
def _limb_scales(bits: int, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each limb's shift, [count, 1, 1], and its weight 2^(bits * i) as a float64 row [1, count]."""
    shifts = torch.arange(0, bits * count, bits, dtype=torch.int64, device=device)
    return shifts.view(count, 1, 1), (2.0**shifts).to(torch.float64).view(1, count)


def _exact_product(rows: Tensor, weight_t: Tensor, backend: str) -> Tensor:
    """rows [n, d] in [0, P) times weight_t [d, out], as exact integers congruent mod P to the product."""
    if backend == "float64":
        return (to_signed(rows).to(torch.float64) @ weight_t.to(torch.float64)).to(torch.int64)
    bits, count = (LIMB_BITS, LIMBS) if backend == "int8" else (FLOAT_LIMB_BITS, FLOAT_LIMBS)
    shifts, scales = _limb_scales(bits, count, rows.device)
    if backend == "int8" and rows.numel() >= BYTE_LIMBS_FROM:
        partial = _int_mm(_limbs_from_bytes(rows), weight_t)
    else:
        limbs = ((rows.unsqueeze(0) >> shifts) & ((1 << bits) - 1)).view(-1, rows.shape[-1])
        if backend == "int8":
            partial = _int_mm(limbs.to(torch.int8), weight_t)
        else:  # exact integers below 2^24, so the int32 copy loses nothing
            partial = (limbs.to(torch.float32) @ weight_t.to(torch.float32)).to(torch.int32)
    # Recombine sum_i 2^(bits * i) * partial_i. Exact in float64 and in int64: every partial sum of it, in any
    # order, is sum_k w_k * (value_k's limbs so far, shifted), at most 2048 * 127 * P < 2^53 in magnitude.
    partial = partial.view(count, rows.shape[0], -1)
    if partial[0].numel() <= HORNER_FROM:  # a decode step: one small product beats count in-place passes
        return (scales @ partial.view(count, -1).to(torch.float64)).view(rows.shape[0], -1).to(torch.int64)
    # A prefill or pad batch: Horner in place in int64, 3x less memory than the product. Arithmetic left shifts,
    # not multiplies, which torch does not vectorize for int64 here, and each limb converted before it is added,
    # which is ~2x faster than letting add_ promote it (512 x 3072 outputs: 23 -> 14 ms in all).
    terms, step = list(partial), bits
    if backend == "int8" and weight_t.shape[0] <= PAIRED_LIMBS_UP_TO:
        # Adjacent limbs' products joined in int32 first, halving the int64 passes (512 x 576 by 1536 columns:
        # Horner 5.3 -> 2.6 ms): |p_i + 2^7 p_(i+1)| <= 1024 * 127 * 127 * (1 + 2^7) < 2^31.
        terms = [torch.add(terms[i], terms[i + 1], alpha=1 << bits) for i in range(0, count - 1, 2)] + terms[-1:]
        step = 2 * bits
    total = terms[-1].to(torch.int64)
    for term in reversed(terms[:-1]):
        total.bitwise_left_shift_(step).add_(term.to(torch.int64))
    return total


def _limbs_from_bytes(rows: Tensor, count: int = LIMBS, signed_top: bool = False) -> Tensor:
    """The `count` 7-bit limbs of rows [n, d] in [0, P) as int8 [count n, d], limb-major, cut from the low bytes of
    each little-endian int64 (P < 2^35 < 2^40): limb k is the top k bits of byte k-1 below the low 7-k bits of
    byte k. Every pass touches one byte per element where shifting the int64s touches eight, and the 8x smaller
    temporaries page-fault 8x less (a prefill's limbs: 512 x 1536 inputs in ~3 ms instead of 7-15 ms).
    With `signed_top` (signed rows, |v| < 2^16, three limbs) the top limb keeps every bit of its byte k: it is
    the low byte of v >> 14 in two's complement, which is that value (in [-4, 3]) as a signed int8."""
    n, d = rows.shape
    planes = rows.contiguous().view(torch.uint8).view(n * d, 8)[:, :count].t().contiguous()
    limbs = torch.empty(count, n * d, dtype=torch.uint8, device=rows.device)
    torch.bitwise_and(planes[0], (1 << LIMB_BITS) - 1, out=limbs[0])
    for k in range(1, count):
        low_bits = LIMB_BITS - k  # taken from byte k, above the k bits left in byte k - 1
        high = planes[k] if signed_top and k == count - 1 else planes[k] & ((1 << low_bits) - 1)
        torch.bitwise_or(planes[k - 1] >> (8 - k), high << k, out=limbs[k])
    return limbs.view(torch.int8).view(count * n, d)


SIGNED_LIMBS = 3  # a signed activation |x| < 2^16: two low limbs and a signed top limb, |top| <= 2^(16 - 2 * bits)


FIELD_KERNELS = "field_kernels.cpp"


def _compiled_route(values: Tensor, weight_t: Tensor | PackedInt8Weight, backend: str | None) -> ModuleType | None:
    """The int8 route compiled (`field_kernels.cpp`), where it built: for a decode step's few rows one call instead
    of ~15 small torch ops, for a prefill's many one pass to cut the limbs and one to recombine them instead of
    ~12 (the device's part of a 454-token prefill: 650-764 -> 372-437 ms). A packed weight or a wider product
    takes the torch steps."""
    if values.shape[-1] > CHUNK or not isinstance(weight_t, Tensor):
        return None
    if weight_t.dtype != torch.int8 or weight_t.device.type != "cpu" or (backend or fastest_backend()) != "int8":
        return None
    return build(FIELD_KERNELS)[0]


def signed_matmul(values: Tensor, weight_t: Tensor | PackedInt8Weight, backend: str | None = None) -> Tensor:
    """values @ weight_t exactly, as float64, for int64 values with |v| < 2^16 (quantized activations in the clear).

    The field product's routes on three limbs instead of five, and no reduction mod P: limbs (v >> bits*i) & mask
    for the two low ones and v >> 2*bits, signed, for the top one (|top| <= 4 for int8, 16 for float32), so every
    bound of the module docstring holds, and the float64 recombination, below 2^16 * 2048 * 127 < 2^53, is exact.
    """
    if (kernels := _compiled_route(values, weight_t, backend)) is not None:
        rows = values.reshape(-1, values.shape[-1]).contiguous()
        return kernels.signed_product(rows, weight_t, SIGNED_LIMBS, True).view(*values.shape[:-1], -1)  # AVX512
    return _sliced(_signed_product, values, weight_t, backend).view(*values.shape[:-1], -1)


def _signed_product(rows: Tensor, weight_t: Tensor, backend: str) -> Tensor:
    if backend == "float64":
        return rows.to(torch.float64) @ weight_t.to(torch.float64)
    if backend == "int8" and rows.numel() >= BYTE_LIMBS_FROM:
        # A prefill: limbs cut from bytes, and the two high limbs' products joined in int32 first, where they fit:
        # |p1 + 2^7 p2| <= 2048 * 127 * (127 + 2^7 * 4) < 2^31. 512 x 576 by 480 columns: 5.5 -> 1.9 ms.
        limbs = _limbs_from_bytes(rows, SIGNED_LIMBS, signed_top=True)
        partial = _int_mm(limbs, weight_t).view(SIGNED_LIMBS, rows.shape[0], -1)
        high = torch.add(partial[1], partial[2], alpha=1 << LIMB_BITS)
        return torch.add(partial[0].to(torch.float64), high.to(torch.float64), alpha=1 << LIMB_BITS)
    bits = LIMB_BITS if backend == "int8" else FLOAT_LIMB_BITS
    shifts, masks, scales = _signed_limb_scales(bits, rows.device)
    limbs = ((rows.unsqueeze(0) >> shifts) & masks).view(-1, rows.shape[-1])
    if backend == "int8":
        partial = _int_mm(limbs.to(torch.int8), weight_t)
    else:  # exact integers below 2^24, as in the field product
        partial = limbs.to(torch.float32) @ weight_t.to(torch.float32)
    partial = partial.view(SIGNED_LIMBS, rows.shape[0], -1)
    if partial[0].numel() <= HORNER_FROM:
        return (scales @ partial.view(SIGNED_LIMBS, -1).to(torch.float64)).view(rows.shape[0], -1)
    total = partial[SIGNED_LIMBS - 1].to(torch.float64)
    for i in reversed(range(SIGNED_LIMBS - 1)):
        total.mul_(1 << bits).add_(partial[i].to(torch.float64))
    return total


@functools.cache
def _signed_limb_scales(bits: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Each signed limb's shift and mask, [3, 1, 1] (the top limb keeps its sign: mask -1), and its weight [1, 3]."""
    shifts = torch.arange(0, bits * SIGNED_LIMBS, bits, dtype=torch.int64, device=device)
    masks = torch.tensor([(1 << bits) - 1] * (SIGNED_LIMBS - 1) + [-1], dtype=torch.int64, device=device)
    return shifts.view(-1, 1, 1), masks.view(-1, 1, 1), (2.0**shifts).to(torch.float64).view(1, -1)


def dot_loop_serves_few_rows() -> bool:
    """Whether one or two rows here run `field_kernels.cpp`'s own AVX512-VNNI loop: it built, the CPU has the
    instructions, and torch runs one thread (each side of a blinded scheme does). That loop reads a weight laid out
    [out, in] faster than oneDNN's packed GEMM reads a packed one (the LM head's 576 x 24,576 half, one row, out of
    cache: ~1.0 against 1.4-2.6 ms), so such a weight is then not packed."""
    kernels = build(FIELD_KERNELS)[0]
    return kernels is not None and torch.get_num_threads() == 1 and kernels.dot_product_instructions()


def out_in_layout(weight_t: Tensor) -> Tensor:
    """The same int8 weight [in, out], laid out [out, in] in memory (a transposed view): the compiled kernel's VNNI
    loop reads only this layout."""
    return weight_t.t().contiguous().t()


def product_weight(weight_t: Tensor, backend: str | None = None) -> Tensor | PackedInt8Weight:
    """An int8 weight [in, out] as the backend's product reads it fastest, for a caller that keeps it.

    The float routes read a copy in their float type. The int8 route reads it packed (`PackedInt8Weight`) where
    oneDNN can pack it, unless the compiled kernel's own loop serves a decode step here; else the same int8
    values laid out [out, in] in memory (a transposed view), which that loop reads, and on which `torch._int_mm`
    runs ~1.6x faster for a few rows (the 576 x 49152 LM head: 3.6 against 5.9 ms).
    """
    backend = backend or fastest_backend(weight_t.device.type)
    if backend == "int8":
        packs = (
            weight_t.numel() >= PACK_FROM_BYTES
            and weight_t.shape[0] <= PACKED_MAX_INNER_DIM
            and weight_t.device.type == "cpu"  # oneDNN packs for the CPU's kernel alone
            and not dot_loop_serves_few_rows()
            and packing_available()
        )
        return PackedInt8Weight(weight_t) if packs else out_in_layout(weight_t)
    return weight_t.to(WEIGHT_DTYPES[backend])


def field_matmul(values: Tensor, weight_t: Tensor | PackedInt8Weight, backend: str | None = None) -> Tensor:
    """(values @ weight_t) mod P, exact. values: int64 [n, d] in [0, P); weight_t: int8 [d, out], or the copy
    `product_weight` makes for the backend, which a caller that multiplies by it often keeps to save converting
    the weight on every call.

    `backend`: "int8", "float32" or "float64" (see the module docstring); by default the fastest on this CPU.
    """
    if (kernels := _compiled_route(values, weight_t, backend)) is not None:
        rows = values.reshape(-1, values.shape[-1]).contiguous()
        return kernels.field_product(rows, weight_t, LIMBS, P, True).view(*values.shape[:-1], -1)  # AVX512
    return _sliced(_exact_product, values, weight_t, backend).remainder_(P).view(*values.shape[:-1], -1)


def _sliced(
    product: Callable[[Tensor, Tensor, str], Tensor], values: Tensor, weight_t: Tensor | PackedInt8Weight, backend: str | None
) -> Tensor:
    """`product` of values [..., d] as rows [n, d] with weight_t [d, out], summed over CHUNK-wide slices of d."""
    inner = values.shape[-1]
    if inner > MAX_INNER_DIM:
        raise ValueError(f"inner dimension {inner} exceeds {MAX_INNER_DIM}, where exactness is proven")
    rows = values.reshape(-1, inner)
    backend = backend or fastest_backend(rows.device.type)
    if inner <= CHUNK:  # every layer of most small models, and every packed weight: no slicing on the decode path
        return product(rows, weight_t, backend)
    total = product(rows[:, :CHUNK], weight_t[:CHUNK], backend)
    for start in range(CHUNK, inner, CHUNK):
        total += product(rows[:, start : start + CHUNK], weight_t[start : start + CHUNK], backend)
    return total


def fastest_backend(device_type: str = "cpu") -> str:
    """The exact route that runs a decode step's product fastest on `device_type`, timed once per process (at the
    torch threads of the first call) and device type."""
    return _fastest_backend_on(device_type)  # one cache entry per device type, however the caller names it


@functools.cache
def _fastest_backend_on(device_type: str) -> str:
    """Time every backend on one row (a decode step, whose latency is what the product's speed decides) times a
    weight as wide as a large layer, laid out as `product_weight` keeps it, so that it does not sit in a core's
    cache any more than a decode step's weights do; keep the fastest. A CUDA GPU chooses among `CUDA_BACKENDS`.

    Batches (a prefill, a pad batch) run on the same route: on AVX2 without int8 dot products, float64 wins
    both; with VNNI/AMX, int8 wins one row by ~2x, and 32 rows went to float64 by ~1.5x before many-row
    products recombined by Horner (offline pad work, not re-timed since).
    """
    device = torch.device(device_type)
    generator = torch.Generator().manual_seed(0)
    weight_t = torch.randint(-127, 128, (576, 8192), generator=generator, dtype=torch.int8).to(device)
    row = torch.randint(0, P, (1, 576), generator=generator).to(device)
    finish = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # kernels run asynchronously there
    timings = {}
    for backend in CUDA_BACKENDS if device.type == "cuda" else BACKENDS:
        weight = product_weight(weight_t, backend)
        field_matmul(row, weight, backend)  # warm-up
        runs = []
        for _ in range(5):
            finish()
            began = time.perf_counter()
            field_matmul(row, weight, backend)
            finish()
            runs.append(time.perf_counter() - began)
        timings[backend] = min(runs)  # the least disturbed run on a shared machine
    return min(timings, key=timings.get)


def keep_float32_exact() -> None:
    """Keep CUDA's float32 products in full float32: TF32 keeps 10 mantissa bits, which would round the float32
    route's integer sums (up to 2^24). torch's default already is full float32; this holds it against a caller's
    `torch.set_float32_matmul_precision`."""
    torch.backends.cuda.matmul.fp32_precision = "ieee"

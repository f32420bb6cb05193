"""Freivalds check of the device's blinded products: y = v W mod P verified in O(rows * (in + out)).

Why: blinding hides x from the device but does not stop it from returning a wrong y, which the enclave
would unpad into a wrong activation and carry on with. Recomputing v W costs as much as not outsourcing;
projecting both sides onto a secret random s costs only a vector per row and repetition.

Soundness. Each FreivaldsCheck draws its own secret s uniform in Z_P^{out x k} (k = repetitions) from the
OS CSPRNG and keeps ws = W s mod P. A row y passes iff y s = v ws (mod P) in all k columns. If
y != v W mod P, the difference e = y - v W is a nonzero vector of Z_P^out; for a uniform column s_j, e . s_j
is uniform over Z_P (P is prime: pick i with e_i != 0; e_i s_ij alone is uniform and independent of the
other terms), so the wrong row passes a column with probability exactly 1/P and all k independent columns
with probability P^-k ~ 2^(-35 k). A batch with several wrong rows passes less often still. This needs s
independent of everything the device sees: s never leaves the enclave, correct products pass for every s
and so reveal nothing about it, and a new FreivaldsCheck (one per session) draws a new s. `check` raises
on the first failure so the session ends there, and the bound holds for the whole session; a caller that
kept going after failures would give the device about one more P^-k chance per attempt.

Exactness. Both sides are one product: [y | v] @ [s ; -ws] = y s - v ws, which must vanish mod P. Products
of two field elements (< 2^35 each) overflow int64, and float64 sums are exact only below 2^53, so both
operands are split into an 18-bit low and a 17-bit high limb: a limb product is < 2^36 and a sum over
out + in <= 2^17 of them is < 2^53, so every partial sum of the float64 product is an exactly representable
integer, whatever the summation order. The limb products recombine in int64 by two Horner steps, each
value < 2^35 * 2^18 + 2^53 < 2^63. ws itself comes from torch._int_mm on W and 7-bit limbs of s
(int8 x int8 -> int32): |sum| <= out * 128 * 127 < 2^31. Hence in + out <= MAX_TERMS = 2^17: a 4096 ->
32,000 LM head and an 11,008 -> 4,096 FFN (LLaMA-2-7B) both fit, and so does a 2,048 -> 128k head.

Speed. float64 limbs rather than int64: torch's int64 matmul has no BLAS kernel on CPU and was ~10x slower
for a 576 -> 49152 row (1.5 ms against 0.15 ms). The check runs in numpy on zero-copy views because it is
~20 small operations per product, and at one token per call torch's per-operation overhead made it ~1.5x
slower. Measured for one row (median, one core): 576 -> 1536 takes ~35 us against ~115 us for the product,
576 -> 49152 ~0.15-0.2 ms against ~3-4 ms; for 64 rows the check's passes over y weigh more (20-40%).

Cost. Per row and repetition, in + out field multiply-adds (4 float64 limb products each) against in * out
for the product itself; `macs(rows)` counts them in the unit of PadStats.offline_macs. Construction reads W
once (in * out * 5k int8 multiply-adds). Storage: s and ws, (in + out) * k int64, and their limbs, (in + out) *
2k float64 (`nbytes`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import IntegrityError
from .field import LIMB_BITS, LIMBS, P
from .native import build
from .pads import uniform_field

CHECK_KERNELS = "check_kernels.cpp"

MAX_TERMS = 2**17  # in + out, for the float64 limb products' bound
SPLIT_BITS = 18  # low limb; the high limb holds the other 35 - 18 = 17 bits of a field element
_LOW_MASK = (1 << SPLIT_BITS) - 1


def _split(values: np.ndarray) -> np.ndarray:
    """int64 [n, k] in [0, P) -> float64 [n, 2k]: the low limbs of every column, then the high limbs."""
    return np.concatenate([values & _LOW_MASK, values >> SPLIT_BITS], axis=1).astype(np.float64)


def _project(operands: list[np.ndarray], limbs_t: np.ndarray) -> np.ndarray:
    """([a_1 | a_2 | ...] @ B) mod P, exact. a_i: int64 [rows, n_i] in [0, P), together n <= 2^17 columns;
    limbs_t: `_split(B).T`, contiguous, for B int64 [n, k]."""
    return _reduce(_limb_products(operands, limbs_t))


def _limb_products(operands: list[np.ndarray], limbs_t: np.ndarray) -> np.ndarray:
    """float64 [operand limb, row, B limb, column] = [2, rows, 2, k]: the four limb products of `_project`, each
    an exact integer below 2^36 * n; products over different B add exactly while all their n sum to <= 2^17."""
    rows, n = operands[0].shape[0], sum(a.shape[1] for a in operands)
    split = np.empty((2, rows, n))
    col = 0
    for a in operands:  # written straight into the limb buffer: no concatenated copy of y and v
        np.bitwise_and(a, _LOW_MASK, out=split[0, :, col : col + a.shape[1]], casting="unsafe")
        np.right_shift(a, SPLIT_BITS, out=split[1, :, col : col + a.shape[1]], casting="unsafe")
        col += a.shape[1]
    # einsum rather than a BLAS GEMM: this skinny product is memory-bound and one thread runs it about as fast,
    # without waking numpy's BLAS pool (deaf to the enclave's torch thread budget) or paying torch's OpenMP
    # barrier, which cost milliseconds per call when the cores were busy
    product = np.einsum("rn,cn->rc", split.reshape(2 * rows, n), limbs_t, optimize=False)
    return product.reshape(2, rows, 2, limbs_t.shape[0] // 2)


def _reduce(products: np.ndarray) -> np.ndarray:
    """The limb products recombined by two Horner steps in int64 (each value < 2^35 * 2^18 + 2^53 < 2^63), mod P."""
    p = products.astype(np.int64)
    upper = (((p[1, :, 1] % P) << SPLIT_BITS) + p[0, :, 1] + p[1, :, 0]) % P
    return ((upper << SPLIT_BITS) + p[0, :, 0]) % P


def verify_products(products: list[tuple["FreivaldsCheck", Tensor, Tensor]]) -> bool:
    """Whether y = v W mod P holds for every (check, v, y): all checked at once, one reduction per group.

    For products j = 1..m with their own secret s_j, the sum over j of y_j s_j - v_j (W_j s_j) vanishes mod P
    when every y_j is right. If some are wrong, with errors e_j (fixed by what the device saw, so independent
    of every s_j), the sum is sum_j e_j s_j, and a nonzero e_j makes its term, and so the sum, uniform over Z_P:
    it passes each column with probability 1/P, as a single check does. So a batch is as sound as checking
    its products one by one, and never fails a right one. Products are grouped while they have the same rows
    and their in + out sum to at most MAX_TERMS, which keeps the summed limb products exact. Why: each check
    is ~20 numpy operations whatever its size, ~100 us in a decode step, so one per layer costs a quarter.
    A malformed y (wrong dtype, shape or range) fails the batch; `FreivaldsCheck.check` then names it.

    Where `check_kernels.cpp` built, each run of products with the same rows and repetitions is one call that
    sums the same products in 128-bit integers, exactly, instead (for any in + out).
    """
    if (kernels := build(CHECK_KERNELS)[0]) is not None:
        return _vanish_compiled(kernels, products)
    group: list[np.ndarray] = []
    terms = rows = 0
    for check, v, y in products:
        vn = _input_rows(v, check.in_features)
        yn = _product_rows(y, v.shape[:-1], check.out_features)
        if yn is None or (yn.size and not (yn.min() >= 0 and yn.max() < P)):
            return False
        size = check.in_features + check.out_features
        if group and (terms + size > MAX_TERMS or len(vn) != rows):
            if not _group_vanishes(group):
                return False
            group, terms = [], 0
        group.append(_limb_products([yn, vn], check._limbs_t))
        terms, rows = terms + size, len(vn)
    return not group or _group_vanishes(group)


def _vanish_compiled(kernels, products: list[tuple["FreivaldsCheck", Tensor, Tensor]]) -> bool:
    groups: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = []  # (vs, ys, stacked), same rows and repetitions
    for check, v, y in products:
        _require_input_shape(v, check.in_features)
        if not _has_product_shape(y, v.shape[:-1], check.out_features):
            return False
        rows = v.reshape(-1, check.in_features).contiguous()
        if not groups or (groups[-1][0][0].shape[0], groups[-1][2][0].shape[1]) != (rows.shape[0], check.repetitions):
            groups.append(([], [], []))
        for items, value in zip(groups[-1], (rows, y.reshape(rows.shape[0], -1).contiguous(), check.stacked)):
            items.append(value)
    try:
        return all(kernels.products_vanish(vs, ys, stacked, P) for vs, ys, stacked in groups)
    except RuntimeError as error:  # the kernel refuses a v outside [0, P): a caller's bug, as in _input_rows
        raise ValueError(str(error).splitlines()[0]) from None


def _group_vanishes(limb_products: list[np.ndarray]) -> bool:
    return not _reduce(sum(limb_products[1:], limb_products[0])).any()


def _require_input_shape(v: Tensor, width: int) -> None:
    if v.dtype != torch.int64 or v.dim() < 1 or v.shape[-1] != width:
        raise ValueError(f"v must be int64 [..., {width}], got {v.dtype} {tuple(v.shape)}")


def _has_product_shape(y, lead: tuple, width: int) -> bool:
    """Whether the device's y has the type and shape of the product of v [*lead, in]: int64 [*lead, width]."""
    return isinstance(y, Tensor) and y.dtype == torch.int64 and y.shape == (*lead, width)


def _input_rows(v: Tensor, width: int) -> np.ndarray:
    """The enclave's padded input v [..., width] as int64 numpy rows; anything but field elements is a caller's bug."""
    _require_input_shape(v, width)
    rows = v.cpu().reshape(-1, width).numpy()
    if rows.size and not (rows.min() >= 0 and rows.max() < P):
        raise ValueError("v must hold field elements in [0, P)")
    return rows


def _product_rows(y, lead: tuple, width: int) -> np.ndarray | None:
    """The device's y as int64 numpy rows [n, width], or None if its type or shape is not that of v's product."""
    if not _has_product_shape(y, lead, width):
        return None
    return y.cpu().reshape(-1, width).numpy()


class FreivaldsCheck:
    """Verifies y = v @ weight_t mod P for one int8 weight [in, out] with a per-session secret projection."""

    def __init__(self, weight_t: Tensor, repetitions: int = 2):
        if weight_t.dtype != torch.int8 or weight_t.dim() != 2:
            raise ValueError(f"weight_t must be 2-D int8 [in, out], got {weight_t.dtype} {tuple(weight_t.shape)}")
        in_features, out_features = weight_t.shape
        if not (in_features >= 1 and out_features >= 1 and in_features + out_features <= MAX_TERMS):
            raise ValueError(
                f"weight [in={in_features}, out={out_features}] is outside in + out <= {MAX_TERMS}, "
                "where the check is proven exact"
            )
        if repetitions < 1:
            raise ValueError(f"repetitions must be at least 1, got {repetitions}")
        self.in_features, self.out_features, self.repetitions = in_features, out_features, repetitions
        s = uniform_field(out_features, repetitions)
        s7 = torch.cat([(s >> (LIMB_BITS * i)) & ((1 << LIMB_BITS) - 1) for i in range(LIMBS)], dim=1).to(torch.int8)
        partial = torch._int_mm(weight_t, s7).view(in_features, LIMBS, repetitions)
        ws = torch.zeros(in_features, repetitions, dtype=torch.int64)
        for i in reversed(range(LIMBS)):
            ws = ((ws << LIMB_BITS) + partial[:, i]) % P
        # [s ; -ws]: one product then yields y s - v ws for the stacked row [y | v]
        self.stacked = torch.cat([s, (P - ws) % P]).contiguous()  # int64 [out + in, k], as the compiled check reads it
        self._limbs_t = np.ascontiguousarray(_split(self.stacked.numpy()).T)

    def verify_rows(self, v: Tensor, y: Tensor) -> Tensor:
        """Per row of v [..., in] (int64 in [0, P)): whether the device's y [..., out] is v @ W mod P.

        A y of the wrong dtype or shape fails every row; a row with an element outside [0, P) fails even if
        congruent, since the exactness argument (and the enclave's unpadding) assume reduced values.
        """
        vn = _input_rows(v, self.in_features)
        lead = v.shape[:-1]
        yn = _product_rows(y, lead, self.out_features)
        if yn is None:
            return torch.zeros(lead, dtype=torch.bool)
        in_range = np.ones(len(yn), dtype=bool)
        if yn.size and not (yn.min() >= 0 and yn.max() < P):
            in_range = (yn.min(axis=1) >= 0) & (yn.max(axis=1) < P)
            yn = np.where(in_range[:, None], yn, 0)  # keep the arithmetic exact; those rows fail anyway
        ok = (_project([yn, vn], self._limbs_t) == 0).all(axis=1) & in_range
        return torch.from_numpy(ok).view(lead)

    def verify(self, v: Tensor, y: Tensor) -> bool:
        """Whether every row of y is the product of the same row of v with W (mod P)."""
        return bool(self.verify_rows(v, y).all())

    def check(self, v: Tensor, y: Tensor, what: str) -> None:
        """`verify`, raising IntegrityError naming `what` (e.g. the weight) when any row is wrong."""
        ok = self.verify_rows(v, y)
        if not bool(ok.all()):
            raise IntegrityError(
                f"the device returned a wrong product for {what} "
                f"({int((~ok).sum())} of {ok.numel()} rows failed the Freivalds check)",
                "restart the device, or replace it if this happens again",
            )

    def macs(self, rows: int) -> int:
        """Field multiply-adds to verify `rows` rows, comparable with rows * in * out for the product."""
        return rows * (self.in_features + self.out_features) * self.repetitions

    @property
    def nbytes(self) -> int:
        """Memory held for this weight: s and W s, as integers and as limbs."""
        return self.stacked.nbytes + self._limbs_t.nbytes

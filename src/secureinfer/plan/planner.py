"""The partition planner: score op placements by what they leak, what they cost and whether they fit the EPC.

`plan_partition(config, epc_bytes, protect)` enumerates placements at the level of op kinds (every
layer alike), drops those that leak a protected asset to the device, costs the rest with the
analytic cost model (`costs.plan_costs`) turned into modelled seconds per decode token by a
`CostModel`, and chooses the fastest one that fits the enclave budget. The named presets are
scored on the same table.

Leakage is scored per asset, from what reaches the device (see `plan_leakage`):

- `conversation`, in bits per generated token: 0 when the device only ever sees one-time-padded
  values (blinded products); otherwise log2(vocab_size), the entropy of one token id. That is an
  upper bound (the device cannot learn more about a token than the token holds) and it is the
  estimate we use for any value the device holds in clear (int8 counts as clear), because every
  activation of the forward is a function of the tokens and attacks invert them (DESIGN §4).
- `adapters`, in bits exposed in total (not per token: once the device holds an adapter, or can
  regress it from clear inputs and outputs, all of it is gone, and amortising that over tokens
  would understate it): the float32 size of every exposed adapter, rank * (in + out) * 32 bits.
- Transforms whose leakage only an attack can measure (e.g. a permutation) are scored from
  `MEASURED_LEAKAGE`, filled by the attack suite. It is empty now: a plan that uses such a
  transform gets "not measured" (None), which never counts as zero.

The search space per decode step (group order of a candidate's name, `auto-<misc>-<attention>-<5 projections>`):

- misc: embed, both RMSNorms, RoPE, both residual adds, SwiGLU and the final norm, together: E or D;
- attention with its KV cache: E or D;
- each projection kind (qkv_proj, o_proj, gate_up_proj, down_proj, lm_head): E (enclave, float32),
  E8 (enclave, int8), D (device, float32), D8 (device, int8) or DB (device, blinded);
- sampling always runs in the enclave.

That is 2 * 2 * 5^5 = 12,500 layouts. Three exact reductions keep a run to a few seconds:
(1) D and D8 differ only in device time (same leakage, traffic and enclave memory), so only the
faster of the two under the cost model is kept; (2) a blinded projection needs its input from and
its output back to the enclave (the enclave pads and unpads), so layouts that put its neighbour
ops on the device are dropped; (3) layouts are costed on 1- and 2-layer copies of the model and
extrapolated (every layer after the first repeats the same segments, so each figure is affine in
the layer count); the rows shown are re-costed on the full model and checked equal.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Iterable, Mapping

from ..enclave.memory import CYCLES_PER_PAGE, MIB, PAGE_BYTES
from ..errors import InvalidRequestError, SecureInferError
from ..model.config import ModelConfig
from ..model.ops import OPS, PROJECTIONS, weight_names
from .costs import FLOAT_BYTES, PlanCosts, blinded_columns, op_flops, outsourced, plan_costs, weight_shape
from .plan import DEVICE, ENCLAVE, Placement, Plan, op_sequence
from .presets import PRESETS, build_plan

ASSETS = ("adapters", "conversation")
# The attack suite's hook: transform -> asset -> measured leakage in the asset's unit (UNITS).
# Device ops under a transform listed here are scored from it; clear/int8 (entropy bound) and
# blinded (0, information-theoretically) are scored analytically and never looked up. Only the
# conversation entry is read today: an adapter the device holds, under any transform, is exposed.
MEASURED_LEAKAGE: dict[str, dict[str, float]] = {}
CLEAR_TRANSFORMS = ("clear", "int8")  # what the device holds under these is the value itself
FIELD_ELEMENT_BYTES = 8  # pads r and u are int64 field elements (crypto/pads.py)
DEFAULT_ADAPTER_RANK = 8
TABLE_ROWS = 10  # candidates shown (and re-costed on the full plan) besides the chosen one and the presets


# --- the cost model --------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Seconds per decode token from the analytic per-token costs.

    Decode at batch 1 is a dependency chain, so the enclave's work, the device's work and the
    boundary crossings add up; the one overlap is the enclave's share of each blinded product (`breakdown`). The defaults were measured on this project's
    machine (2-core AMD EPYC at 2.6 GHz, torch CPU kernels; the "device" is a CPU too, so it is no
    faster than the enclave): README's `secureinfer bench` figures, cross-checked by timing the
    SmolLM2 layer shapes (576x960, 576x576, 576x3072, 1536x576) here. `CostModel.calibrate()`
    re-measures the compute rates on the machine it runs on. For a real accelerator, pass its rates.
    """

    # float32 GEMV, FLOP/s (2 per multiply-add). README bench: `enclave` 41.5 ms and `plain`
    # 44.8 ms of compute for ~0.27 GFLOP per token (2 threads): ~6e9. Also used for elementwise ops.
    enclave_flops_per_s: float = 6.0e9
    device_flops_per_s: float = 6.0e9
    # int8 projections (clear int8 on either side, and blinded ones on the device) run as five 7-bit
    # limb products with int8 GEMMs (crypto/field.py); counted in the FLOPs of the logical product.
    # README bench: `secureinfer`'s device does 0.27 GFLOP of them in 37 ms (1 thread): ~7e9.
    enclave_int8_flops_per_s: float = 7.0e9
    device_int8_flops_per_s: float = 7.0e9
    # Offline pads u = r W mod P, computed by the enclave one GEMM per batch of rows: the weight is
    # read once per batch. README bench: 8.8 ms per token for 0.27 GFLOP (batches of 32): ~3e10.
    pad_flops_per_s: float = 3.0e10
    # Enclave work per blinded product besides the product: quantize, pad, unpad, map to signed,
    # rescale (crypto/quant.py). The arithmetic alone times at 45-95 us on a 1536-wide row here
    # (`calibrate`); README's bench books ~0.25 ms of enclave time per product, bookkeeping included.
    blinded_overhead_s: float = 1.0e-4
    # A Freivalds check of one blinded product (presets that verify, e.g. `hardened`): 22-48 us
    # for a 576 -> 1536 row with 2 repetitions (crypto/freivalds.py).
    freivalds_check_s: float = 3.5e-5
    # One request/response over the AF_UNIX process channel, payload aside: ~0.2 ms measured
    # (README: 0.15-0.3 ms for a 2 KiB request).
    round_trip_s: float = 2.0e-4
    # Payload bytes through the channel, both ways: README bench: `secureinfer` moves 3.76 MB per
    # token in 32.2 ms of transfer, ~24 ms of which are 121 round trips: ~4e8 B/s.
    bandwidth_bytes_per_s: float = 4.0e8
    # SGX paging past the EPC (enclave/memory.py: CYCLES_PER_PAGE per PAGE_BYTES page, every page
    # over the budget touched every step) at this clock (this machine's: 2.6 GHz).
    clock_hz: float = 2.6e9
    # Pads held in the enclave per blinded weight: the runtime's batch (api.py pad_batch_rows=32).
    pad_batch_rows: int = 32
    # A sustained decode must make a token's pads somewhere; count them in the total (they are
    # still shown apart). False models pads made ahead of time, off the request path.
    count_offline_pads: bool = True
    source: str = "defaults measured on the project's 2-core machine (README bench, layer-shape timings)"

    def __post_init__(self):
        rates = ("enclave_flops_per_s", "device_flops_per_s", "enclave_int8_flops_per_s", "device_int8_flops_per_s",
                 "pad_flops_per_s", "bandwidth_bytes_per_s", "clock_hz")  # fmt: skip
        for name in rates:
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be positive")
        if min(self.round_trip_s, self.blinded_overhead_s, self.freivalds_check_s, self.pad_batch_rows) < 0:
            raise ValueError("CostModel times and pad_batch_rows cannot be negative")

    def with_device_speedup(self, factor: float) -> "CostModel":
        """The same model with a device `factor` times faster at compute (e.g. a GPU against these CPU figures)."""
        return dataclasses.replace(
            self,
            device_flops_per_s=self.device_flops_per_s * factor,
            device_int8_flops_per_s=self.device_int8_flops_per_s * factor,
            source=f"{self.source}; device compute x{factor:g}",
        )

    def pad_pool_bytes(self, costs: "TokenCosts") -> int:
        """Enclave memory of the pad pool: pad_batch_rows rows of (r, u) per blinded weight, int64."""
        return self.pad_batch_rows * costs.blinded_row_elements * FIELD_ELEMENT_BYTES

    def enclave_resident_bytes(self, costs: "TokenCosts") -> int:
        """What the enclave holds across steps: weights, KV cache (costs.py) and the pad pool."""
        return costs.costs.enclave_resident_bytes + self.pad_pool_bytes(costs)

    def paged_pages(self, costs: "TokenCosts", epc_bytes: int | None) -> int:
        over = 0 if epc_bytes is None else max(0, self.enclave_resident_bytes(costs) - epc_bytes)
        return math.ceil(over / PAGE_BYTES)

    def breakdown(self, costs: "TokenCosts", epc_bytes: int | None, verified: bool = False) -> dict[str, float]:
        """Seconds per decode token, by where they go (`verified`: every blinded product is Freivalds-checked).

        Under an enclave share, the enclave multiplies its own columns of each blinded product while the device
        multiplies the rest and the trip is under way; only the part of its columns' time past that window adds.
        Every blinded product is split at the same share, so the window is taken over all of them at once.
        """
        c = costs.costs
        own_columns = costs.enclave_own_column_flops / self.enclave_int8_flops_per_s
        device_window = costs.pad_flops / self.device_int8_flops_per_s + costs.blinded_products * self.round_trip_s
        return {
            "enclave_compute": (c.enclave_flops - costs.enclave_int8_flops) / self.enclave_flops_per_s
            + (costs.enclave_int8_flops - costs.enclave_own_column_flops) / self.enclave_int8_flops_per_s,
            "enclave_own_columns": max(0.0, own_columns - device_window),
            "device_compute": (c.device_flops - costs.device_int8_flops) / self.device_flops_per_s
            + costs.device_int8_flops / self.device_int8_flops_per_s,
            "blinding": costs.blinded_products * self.blinded_overhead_s,
            "integrity_checks": costs.blinded_products * self.freivalds_check_s if verified else 0.0,
            "round_trips": c.round_trips * self.round_trip_s,
            "transfer": (c.bytes_to_device + c.bytes_from_device) / self.bandwidth_bytes_per_s,
            "paging": self.paged_pages(costs, epc_bytes) * CYCLES_PER_PAGE / self.clock_hz,
            "offline_pads": costs.pad_flops / self.pad_flops_per_s if self.count_offline_pads else 0.0,
        }

    def modelled_seconds(self, costs: "TokenCosts", epc_bytes: int | None, verified: bool = False) -> float:
        """Modelled seconds per decode token (at the context `costs` was computed for)."""
        return sum(self.breakdown(costs, epc_bytes, verified).values())

    @classmethod
    def calibrate(cls, hidden: int = 576, intermediate: int = 1536, layers: int = 8, **overrides) -> "CostModel":
        """Measure the compute rates on this machine with torch's current thread count (~2 s).

        Times `layers` copies of one LLaMA layer's projection shapes (distinct weights, so they are
        read from memory as in decode): float32 GEMV, the clear int8 pipeline, a batch of pads and
        the blinding overhead. Both sides get the same rates (the device is a CPU here). The channel
        and paging figures keep their defaults unless given in `overrides`.
        """
        import torch

        from ..crypto.field import P, field_matmul, to_signed
        from ..crypto.pads import uniform_field
        from ..crypto.quant import dequantize_product, quantize_activation, quantize_weight

        shapes = [(hidden, 2 * hidden), (hidden, hidden), (hidden, 2 * intermediate), (intermediate, hidden)]
        flops = layers * sum(2 * i * o for i, o in shapes)
        generator = torch.Generator().manual_seed(0)
        weights = [[torch.randn(o, i, generator=generator) for i, o in shapes] for _ in range(layers)]
        quantized = [[quantize_weight(w) for w in ws] for ws in weights]
        rows = [torch.randn(1, i, generator=generator) for i, _ in shapes]
        rows_batch = overrides.get("pad_batch_rows", cls.pad_batch_rows)
        pads = [uniform_field(rows_batch, i) for i, _ in shapes]

        def best_of(fn, repeats: int = 3) -> float:
            fn()  # warm up
            times = []
            for _ in range(repeats):
                began = time.perf_counter()
                fn()
                times.append(time.perf_counter() - began)
            return min(times)

        def fp32():
            for ws in weights:
                for x, w in zip(rows, ws):
                    torch.nn.functional.linear(x, w)

        def int8():
            for qs in quantized:
                for x, q in zip(rows, qs):
                    a, s = quantize_activation(x)
                    dequantize_product(to_signed(field_matmul(a % P, q.weight_t)), s, q)

        def pad_batch():
            for qs in quantized:
                for r, q in zip(pads, qs):
                    field_matmul(r, q.weight_t)

        widest, q_widest = rows[-1], quantized[0][-1]
        r = pads[-1][:1]
        u = field_matmul(r, q_widest.weight_t)

        def overhead():
            for _ in range(20):
                a, s = quantize_activation(widest)
                (a % P + r) % P
                dequantize_product(to_signed((u - u) % P), s, q_widest)

        fp32_rate = flops / best_of(fp32)
        int8_rate = flops / best_of(int8)
        measured = dict(
            enclave_flops_per_s=fp32_rate,
            device_flops_per_s=fp32_rate,
            enclave_int8_flops_per_s=int8_rate,
            device_int8_flops_per_s=int8_rate,
            pad_flops_per_s=flops * rows_batch / best_of(pad_batch, 1),
            blinded_overhead_s=best_of(overhead) / 20,
            source=f"calibrated on this machine ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{time.strftime('%Y-%m-%d %H:%M')}); channel and paging figures: defaults",
        )
        return cls(**(measured | overrides))


@dataclass(frozen=True)
class TokenCosts:
    """A plan's analytic per-token costs (`costs.plan_costs`) with the splits the cost model needs."""

    costs: PlanCosts
    enclave_int8_flops: int  # the part of costs.enclave_flops done as int8 limb products
    enclave_own_column_flops: int  # the part of those that is the enclave's share of blinded products
    device_int8_flops: int  # the part of costs.device_flops done as int8 limb products (int8 and blinded)
    blinded_products: int  # blinded projections per token: each costs the enclave a quantize/pad/unpad/rescale
    pad_flops: int  # offline: the enclave's pads u = r W for those products (as many FLOPs as their device part)
    blinded_row_elements: int  # sum over blinded weights of (in + device columns): one row of (r, u) pads each

    @classmethod
    def of(cls, plan: Plan, context: int) -> "TokenCosts":
        """For one decode token at `context` cached positions."""
        int8 = {ENCLAVE: 0, DEVICE: 0}
        own_columns = blinded = pad_flops = row_elements = 0
        for p in plan.placements:
            if p.transform not in ("int8", "blinded"):
                continue
            flops = op_flops(p.op, plan.config, context)
            if p.transform != "blinded":
                int8[p.side] += flops
                continue
            on_device = outsourced(plan, p.op, p.layer, flops)
            int8[DEVICE] += on_device
            int8[ENCLAVE] += flops - on_device
            own_columns += flops - on_device
            blinded += 1
            pad_flops += on_device
            columns, _ = blinded_columns(plan, p.op, p.layer)
            row_elements += weight_shape(weight_names(p.op, p.layer)[0], plan.config)[1] + columns
        return cls(plan_costs(plan, context), int8[ENCLAVE], own_columns, int8[DEVICE], blinded, pad_flops, row_elements)

    def to_dict(self) -> dict:
        return self.costs.to_dict() | {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "costs"}


_EXTRAPOLATED = ("enclave_flops", "device_flops", "round_trips", "bytes_to_device", "bytes_from_device",
                 "enclave_weight_bytes", "enclave_kv_bytes", "device_weight_bytes", "device_kv_bytes")  # fmt: skip


def _extrapolate(one: TokenCosts, two: TokenCosts, layers: int, scheme: str) -> TokenCosts:
    """A uniform plan's costs on `layers` layers from its costs on 1 and 2: every figure is affine in
    the layer count (layer 0 starts from the embedding's state; every later layer from the same
    end-of-layer state, since each layer rewrites every value it reads)."""

    def affine(a: int, b: int) -> int:
        return a + (layers - 1) * (b - a)

    costs = dataclasses.replace(
        one.costs, scheme=scheme, **{k: affine(getattr(one.costs, k), getattr(two.costs, k)) for k in _EXTRAPOLATED}
    )
    extra = {
        f.name: affine(getattr(one, f.name), getattr(two, f.name)) for f in dataclasses.fields(TokenCosts) if f.name != "costs"
    }
    return TokenCosts(costs, **extra)


# --- leakage ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leakage:
    asset: str
    bits: float | None  # None: a transform with no measured figure yet (never counts as zero)
    unit: str
    sources: tuple[str, ...] = ()  # what reaches the device, in words

    @property
    def zero(self) -> bool:
        return self.bits == 0

    def to_dict(self) -> dict:
        return {"asset": self.asset, "bits": self.bits, "unit": self.unit, "sources": list(self.sources)}


UNITS = {"conversation": "bits/token", "adapters": "bits exposed"}


def _device_views(plan: Plan):
    """Track every version of every value: which ones the device holds in clear, who wrote each, who reads it.

    Returns (seen, io, writer, readers): `seen` the (value, version) pairs the device held in clear
    (read or written by a device op whose transform is clear or int8); `io[i]` the (reads, writes)
    versions of placement i; `writer`/`readers` the placement indices around each version.
    """
    version: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    io, writer, readers = [], {}, {}
    for i, p in enumerate(plan.placements):
        spec = OPS[p.op]
        clear_on_device = p.side == DEVICE and p.transform in CLEAR_TRANSFORMS
        ins = [(v, version.get(v, 0)) for v in spec.reads]
        for item in ins:
            readers.setdefault(item, []).append(i)
        outs = []
        for v in spec.writes:
            version[v] = version.get(v, 0) + 1
            outs.append((v, version[v]))
            writer[(v, version[v])] = i
        if clear_on_device:
            seen.update(ins)
            seen.update(outs)
        io.append((ins, outs))
    return seen, io, writer, readers


def misplaced_blinding(plan: Plan) -> list[str]:
    """Blinded projections whose input comes from, or whose output goes to, a device op.

    The enclave quantizes and pads a blinded product's input and unpads its output. `Plan` refuses an
    input the device computed; an output a device op reads goes back to the device in clear after
    unpadding, which makes blinding pure cost. The planner skips both.
    """
    _, io, writer, readers = _device_views(plan)
    problems = []
    for i, p in enumerate(plan.placements):
        if p.transform != "blinded":
            continue
        ins, outs = io[i]
        neighbours = [writer[v] for v in ins if v in writer] + [j for v in outs for j in readers.get(v, [])]
        if any(plan.placements[j].side == DEVICE for j in neighbours):
            problems.append(f"{p.op}@{p.layer}")
    return problems


def adapter_bits(name: str, rank: int, config: ModelConfig) -> int:
    rows, cols = weight_shape(name, config)
    return rank * (rows + cols) * FLOAT_BYTES * 8


def plan_leakage(plan: Plan) -> dict[str, Leakage]:
    """What the device learns about each asset under `plan` (its adapters as given by `plan.adapters`).

    conversation (bits per token): log2(vocab_size) if the device holds any value of the forward in
    clear (every activation derives from the tokens; int8 is still clear) or runs attention on its
    KV cache; 0 if it only sees blinded values; for other transforms, MEASURED_LEAKAGE.
    adapters (bits exposed): every adapter the device stores (its lora_a/lora_b), and every adapted
    projection whose input and output the device both holds in clear (it can regress W + BA), at
    its full float32 size. No adapters in the plan: 0.
    """
    conversation, held, regressed = _leakage_parts(plan)
    return {"adapters": _adapter_leakage(plan.config, plan.adapters, held, regressed), "conversation": conversation}


def _leakage_parts(plan: Plan) -> tuple[Leakage, set[str], set[str]]:
    """The conversation's Leakage, and the adapted weights exposed (held, regressed)."""
    config = plan.config
    views = _device_views(plan)
    seen = views[0]
    token_bits = math.log2(config.vocab_size)

    # conversation
    kv_layers = len(plan.attention_layers_on(DEVICE))
    sources = [f"in clear: {', '.join(sorted({v for v, _ in seen}))}"] if seen else []
    sources += [f"the KV cache of {kv_layers} layers"] if kv_layers else []
    contributions = [token_bits] if sources else []
    analytic = (*CLEAR_TRANSFORMS, "blinded")
    other = sorted({p.transform for p in plan.placements if p.side == DEVICE and p.transform not in analytic})
    unmeasured = []
    for transform in other:
        measured = MEASURED_LEAKAGE.get(transform, {}).get("conversation")
        if measured is None:
            unmeasured.append(transform)
        else:
            contributions.append(measured)
            sources.append(f"{transform} values: {measured:.3g} bits/token (measured)")
    if unmeasured:
        sources.append(f"not measured yet: {', '.join(unmeasured)} (run the attack suite)")
        conversation = Leakage("conversation", None, UNITS["conversation"], tuple(sources))
    else:
        # A token holds log2(V) bits, whatever the number of views of it the device gets.
        conversation = Leakage("conversation", min(token_bits, sum(contributions)), UNITS["conversation"], tuple(sources))

    held, regressed = adapter_exposure(plan, views)
    return conversation, held, regressed


def adapter_exposure(plan: Plan, views=None) -> tuple[set[str], set[str]]:
    """(adapted weights whose adapter the device stores, others whose input and output it holds in clear)."""
    seen, io, _, _ = views or _device_views(plan)
    held = {n.rsplit(".", 1)[0] for n in plan.stored_weights(DEVICE) if n.endswith(".lora_a")}
    regressed = set()
    for i, p in enumerate(plan.placements):
        names = [n for n in weight_names(p.op, p.layer) if n in plan.adapters] if p.op in PROJECTIONS else []
        ins, outs = io[i]
        if names and all(v in seen for v in ins) and any(v in seen for v in outs):
            regressed.update(names)
    return held, regressed - held


def _adapter_leakage(config: ModelConfig, ranks: Mapping[str, int], held: set[str], regressed: set[str]) -> Leakage:
    bits = sum(adapter_bits(n, ranks[n], config) for n in held | regressed)
    sources = tuple(
        f"{label}: {_count_by_kind(names)}"
        for label, names in (("held by the device", held), ("regressable from clear inputs and outputs", regressed))
        if names
    )
    return Leakage("adapters", bits, UNITS["adapters"], sources)


def _count_by_kind(names: Iterable[str]) -> str:
    kinds: dict[str, int] = {}
    for n in sorted(names):
        kind = n.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{c}" if c > 1 else k for k, c in kinds.items())


# --- the search space ------------------------------------------------------------------------

OPTIONS = {  # code -> (side, transform), in preference order for ties
    "E": (ENCLAVE, "clear"),
    "E8": (ENCLAVE, "int8"),
    "D": (DEVICE, "clear"),
    "D8": (DEVICE, "int8"),
    "DB": (DEVICE, "blinded"),
}
LABELS = {"E": "enclave", "E8": "enclave int8", "D": "device", "D8": "device int8", "DB": "device blinded"}
MISC_OPS = ("embed", "attn_norm", "rope", "attn_residual", "ffn_norm", "swiglu", "ffn_residual", "final_norm")
SHORT = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down", "lm_head": "lm_head"}


@dataclass(frozen=True)
class Layout:
    """A placement by op kind, the same in every layer. Its name, `auto-<misc>-<attention>-<qkv>-<o>-
    <gate_up>-<down>-<lm_head>` in the codes of OPTIONS, turns back into it with `Layout.parse`."""

    misc: str  # "E" or "D": embed, norms, RoPE, residuals, SwiGLU, final norm
    attention: str  # "E" or "D": attention and its KV cache
    projections: tuple[str, ...]  # one code of OPTIONS per PROJECTIONS entry

    def __post_init__(self):
        if self.misc not in ("E", "D") or self.attention not in ("E", "D"):
            raise ValueError("misc ops and attention go to E (enclave) or D (device)")
        if len(self.projections) != len(PROJECTIONS) or not set(self.projections) <= set(OPTIONS):
            raise ValueError(f"one of {', '.join(OPTIONS)} per projection {PROJECTIONS}")

    @property
    def name(self) -> str:
        return "-".join(("auto", self.misc, self.attention, *self.projections))

    @classmethod
    def parse(cls, name: str) -> "Layout":
        parts = name.split("-")
        if len(parts) != 3 + len(PROJECTIONS) or parts[0] != "auto":
            raise InvalidRequestError(f"{name!r} is not a planner placement", "use a name like auto-E-E-DB-DB-DB-DB-DB")
        try:
            return cls(parts[1], parts[2], tuple(parts[3:]))
        except ValueError as err:
            problem = f"{name!r} is not a planner placement: {err}"
            raise InvalidRequestError(problem, "use a name from `secureinfer plan`") from None

    def code_of(self, op: str) -> str:
        if op == "sample":
            return "E"
        if op == "attention":
            return self.attention
        if op in PROJECTIONS:
            return self.projections[PROJECTIONS.index(op)]
        return self.misc

    def plan(self, config: ModelConfig, adapters: Mapping[str, int] | None = None, enclave_share: float = 0.0) -> Plan:
        placements = tuple(Placement(op, layer, *OPTIONS[self.code_of(op)]) for op, layer in op_sequence(config))
        return Plan(self.name, config, placements, dict(adapters or {}), enclave_share=enclave_share)

    @property
    def exposure_class(self) -> tuple[str, ...]:
        """What leakage and blinding validity depend on: the side of each group, and which products are blinded."""
        return (self.misc, self.attention, *(code.replace("8", "") for code in self.projections))

    @property
    def summary(self) -> str:
        groups: dict[str, list[str]] = {}
        groups.setdefault(self.misc, []).append("embed/norms/rope/residuals/swiglu")
        groups.setdefault(self.attention, []).append("attention+KV")
        for op, code in zip(PROJECTIONS, self.projections):
            groups.setdefault(code, []).append(SHORT[op])
        return "; ".join(f"{LABELS[code]}: {', '.join(groups[code])}" for code in OPTIONS if code in groups)


def plan_from_name(name: str, config: ModelConfig, enclave_share: float = 0.0) -> Plan:
    """A preset's plan, or a planner placement's (`auto-...`), without adapters."""
    plan = Layout.parse(name).plan(config) if name.startswith("auto-") else build_plan(name, config)
    return plan.with_enclave_share(enclave_share)


def default_adapter_ranks(config: ModelConfig, rank: int = DEFAULT_ADAPTER_RANK) -> dict[str, int]:
    """A rank-`rank` adapter on every layer projection (q/k/v, o, gate/up, down), as PEFT's
    `target_modules="all-linear"` places them (it leaves the output layer out)."""
    targets = [op for op in PROJECTIONS if op != "lm_head"]
    return {n: rank for layer in range(config.num_layers) for op in targets for n in weight_names(op, layer)}


# --- results -----------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    summary: str
    preset: bool
    config: ModelConfig
    costs: TokenCosts
    breakdown: dict[str, float]  # seconds per decode token
    resident_bytes: int  # enclave: weights + KV cache + pad pool
    pad_pool_bytes: int
    fits: bool
    leakage: dict[str, Leakage]
    protect: tuple[str, ...]
    exact: bool  # figures from the full plan (else extrapolated from 1- and 2-layer copies)
    layout: Layout | None = None
    enclave_share: float = 0.0  # of each blinded product's columns, as costed

    @property
    def seconds(self) -> float:
        return sum(self.breakdown.values())

    @property
    def zero_leakage(self) -> bool:
        """No leakage of a protected asset."""
        return all(self.leakage[a].zero for a in self.protect)

    @property
    def sort_key(self) -> tuple:
        # Exact ties go to the smaller enclave, then fewer round trips, then the name.
        return (self.seconds, self.resident_bytes, self.costs.costs.round_trips, self.name)

    @cached_property
    def plan(self) -> Plan:
        """The placement as a runnable Plan, without adapters: add a real one with `plan.with_adapters`."""
        return plan_from_name(self.name, self.config, self.enclave_share)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": "preset" if self.preset else "candidate",
            "summary": self.summary,
            "modelled_ms_per_token": self.seconds * 1e3,
            "breakdown_ms": {k: v * 1e3 for k, v in self.breakdown.items()},
            "costs": self.costs.to_dict(),
            "enclave_resident_bytes": self.resident_bytes,
            "pad_pool_bytes": self.pad_pool_bytes,
            "fits": self.fits,
            "zero_leakage": self.zero_leakage,
            "leakage": {a: leak.to_dict() for a, leak in self.leakage.items()},
            "exact": self.exact,
        }

    def compact(self) -> dict:
        return {
            "name": self.name,
            "modelled_ms_per_token": self.seconds * 1e3,
            "enclave_resident_bytes": self.resident_bytes,
            "round_trips": self.costs.costs.round_trips,
            "fits": self.fits,
            "leakage_bits": {a: leak.bits for a, leak in self.leakage.items()},
        }


@dataclass
class PlannerResult:
    config: ModelConfig
    epc_bytes: int | None
    protect: tuple[str, ...]
    context: int
    adapter_ranks: dict[str, int]
    adapters_assumed: bool  # no adapter was given: a hypothetical one on every layer projection
    cost_model: CostModel
    candidates: list[Candidate]  # every costed placement with zero leakage of the protected assets, fastest first
    presets: list[Candidate]  # every preset, in PRESETS order
    chosen: Candidate | None  # the fastest candidate that fits; None: nothing fits
    counts: dict[str, int]
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def rows(self, top: int = TABLE_ROWS) -> list[Candidate]:
        """The table's rows: the `top` fastest candidates, the chosen one and every preset, fastest first."""
        rows = {c.name: c for c in self.candidates[:top]}
        if self.chosen is not None:
            rows[self.chosen.name] = self.chosen
        rows |= {p.name: p for p in self.presets}
        return sorted(rows.values(), key=lambda c: c.sort_key)

    def to_json(self, top: int = TABLE_ROWS) -> dict:
        return {
            "model": self.config.to_dict(),
            "epc_bytes": self.epc_bytes,
            "protect": list(self.protect),
            "context": self.context,
            "adapters": {
                "assumed": self.adapters_assumed,
                "count": len(self.adapter_ranks),
                "ranks": sorted(set(self.adapter_ranks.values())),
                "bits": sum(adapter_bits(n, r, self.config) for n, r in self.adapter_ranks.items()),
            },
            "cost_model": asdict(self.cost_model),
            "measured_leakage": MEASURED_LEAKAGE,
            "counts": self.counts,
            "elapsed_s": self.elapsed_s,
            "notes": self.notes,
            "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "rows": [c.to_dict() | {"chosen": c is self.chosen} for c in self.rows(top)],
            "candidates": [c.compact() for c in self.candidates],
        }


class NoPlacementFits(SecureInferError):
    """No placement keeps the protected assets from the device within the EPC. `result` has the table."""

    def __init__(self, problem: str, fix: str, result: PlannerResult):
        super().__init__(problem, fix)
        self.result = result


# --- the planner -------------------------------------------------------------------------------


def plan_partition(
    config: ModelConfig,
    epc_bytes: int | None,
    protect: Iterable[str],
    context: int = 512,
    adapter_ranks: Mapping[str, int] | int | None = None,
    cost_model: CostModel | None = None,
    enclave_share: float = 0.0,
) -> PlannerResult:
    """Choose the fastest modelled placement that leaks no protected asset and fits `epc_bytes`.

    protect: a subset of ASSETS. epc_bytes: the enclave budget (None: no limit). context: cached
    positions of the decode step costed. adapter_ranks: the adapter's {weight name: rank} (e.g. a
    loaded adapter's), or an int (that rank on every layer projection), or None (rank 8 on every
    layer projection): without an adapter, `adapters` could not leak. cost_model: CostModel() if None.
    enclave_share: the share of each blinded product's columns the enclave multiplies itself, in every
    placement and preset costed (the runtime's `enclave_share`).
    Raises NoPlacementFits (a SecureInferError; `.result` holds the table) when nothing fits.
    """
    began = time.perf_counter()
    protect = tuple(sorted(set(protect)))
    if unknown := set(protect) - set(ASSETS):
        raise InvalidRequestError(f"cannot protect {', '.join(sorted(unknown))}", f"protect some of: {', '.join(ASSETS)}")
    if epc_bytes is not None and epc_bytes <= 0:
        raise InvalidRequestError(f"an enclave budget of {epc_bytes} bytes", "give a positive size, e.g. 96MiB")
    if context < 1:
        raise InvalidRequestError(f"a context of {context} positions", "cost a decode step with at least 1 cached position")
    model = cost_model or CostModel()
    assumed = adapter_ranks is None or isinstance(adapter_ranks, int)
    if assumed:
        rank = DEFAULT_ADAPTER_RANK if adapter_ranks is None else adapter_ranks
        if rank < 1:
            raise InvalidRequestError(f"an adapter rank of {rank}", "give a rank of at least 1")
        ranks = default_adapter_ranks(config, rank)
    else:
        ranks = dict(adapter_ranks)
        projected = {n for layer in range(config.num_layers) for op in PROJECTIONS for n in weight_names(op, layer)}
        if unknown := set(ranks) - projected - {"lm_head"}:
            raise InvalidRequestError(
                f"adapters on weights that are not projections: {sorted(unknown)[:3]}",
                "adapt wqkv, wo, w_gate_up, w_down or lm_head weights",
            )

    def score(name, summary, preset, costs, leakage, exact, layout=None, verified=False) -> Candidate:
        resident = model.enclave_resident_bytes(costs)
        return Candidate(
            name, summary, preset, config, costs, model.breakdown(costs, epc_bytes, verified), resident,
            model.pad_pool_bytes(costs), epc_bytes is None or resident <= epc_bytes, leakage, protect, exact, layout,
            enclave_share,
        )  # fmt: skip

    def full(layout: Layout) -> Candidate:
        plan = layout.plan(config, ranks, enclave_share)
        return score(layout.name, layout.summary, False, TokenCosts.of(plan, context), plan_leakage(plan), True, layout)

    # 1. Enumerate; keep the faster of D/D8 per projection; drop blinded ops next to device ops.
    device_clear = "D8" if model.device_int8_flops_per_s > model.device_flops_per_s else "D"
    codes = [c for c in OPTIONS if c not in ("D", "D8") or c == device_clear]
    kept = 2 * 2 * len(codes) ** len(PROJECTIONS)
    counts = {"layouts": 2 * 2 * len(OPTIONS) ** len(PROJECTIONS)}
    counts["pruned_dominated"] = counts["layouts"] - kept
    one_layer = dataclasses.replace(config, num_layers=1)
    layouts, misplaced = [], {}
    for misc, attention, *projections in itertools.product("ED", "ED", *[codes] * len(PROJECTIONS)):
        layout = Layout(misc, attention, tuple(projections))
        key = layout.exposure_class
        if key not in misplaced:
            try:
                misplaced[key] = bool(misplaced_blinding(layout.plan(one_layer)))
            except ValueError:  # Plan refuses a blinded product fed by the device
                misplaced[key] = True
        if not misplaced[key]:
            layouts.append(layout)
    counts["misplaced_blinding"] = kept - len(layouts)

    # 2. Leakage, before any costing, on a 1-layer copy with a rank-1 adapter per adapted kind:
    # every layer leaks alike, so the full model's exposed adapters are those of the exposed kinds.
    proxy_adapters = {_proxy_name(n): 1 for n in ranks}

    def leakage_of(layout: Layout) -> dict[str, Leakage]:
        plan = layout.plan(one_layer, proxy_adapters)
        conversation, held, regressed = _leakage_parts(plan)
        held, regressed = ({n for n in ranks if _proxy_name(n) in names} for names in (held, regressed))
        return {"adapters": _adapter_leakage(config, ranks, held, regressed), "conversation": conversation}

    by_class: dict[tuple, dict[str, Leakage]] = {}
    leaks = {}
    for layout in layouts:  # E and E8 (D and D8) leak alike
        if layout.exposure_class not in by_class:
            by_class[layout.exposure_class] = leakage_of(layout)
        leaks[layout] = by_class[layout.exposure_class]
    survivors = [layout for layout in layouts if all(leaks[layout][a].zero for a in protect)]
    counts["leaking"] = len(layouts) - len(survivors)

    # 3. Cost the survivors: adapter-free 1- and 2-layer copies extrapolated, plus the adapters' exact
    # share; sort; choose. The rows shown and the choice are re-costed on the full plan and checked.
    proxies = {n: dataclasses.replace(config, num_layers=n) for n in (1, 2)}
    totals = _adapter_totals(ranks, config)

    def estimate(layout: Layout) -> Candidate:
        if config.num_layers <= 2:
            costs = TokenCosts.of(layout.plan(config, ranks, enclave_share), context)
        else:
            one, two = (TokenCosts.of(layout.plan(proxies[n], enclave_share=enclave_share), context) for n in (1, 2))
            costs = _plus_adapters(_extrapolate(one, two, config.num_layers, layout.name), layout, totals)
        return score(layout.name, layout.summary, False, costs, leaks[layout], False, layout)

    candidates = sorted((estimate(layout) for layout in survivors), key=lambda c: c.sort_key)
    counts["costed"] = len(candidates)
    counts["fit"] = sum(c.fits for c in candidates)
    chosen = next((c for c in candidates if c.fits), None)
    for i, candidate in enumerate(candidates):
        if (i < TABLE_ROWS or candidate is chosen) and not candidate.exact:
            candidates[i] = _checked(candidate, full(candidate.layout))
            chosen = candidates[i] if candidate is chosen else chosen

    presets = []
    for name, preset in PRESETS.items():
        plan = preset.build(config).with_adapters(ranks).with_enclave_share(enclave_share)
        verified = bool(preset.runtime.get("verify_repetitions"))
        layout = layout_of(plan)
        summary = layout.summary if layout else preset.summary
        if verified:
            summary += "; Freivalds checks"
        costs = TokenCosts.of(plan, context)
        presets.append(score(name, summary, True, costs, plan_leakage(plan), True, verified=verified))

    notes = []
    if assumed:
        size = sum(adapter_bits(n, r, config) for n, r in ranks.items()) / 8 / MIB
        notes.append(
            f"No adapter given: scored with a hypothetical rank-{rank} adapter on every layer projection "
            f"({len(ranks)} weights, {size:.1f} MiB)."
        )
    if enclave_share:
        notes.append(
            f"Every blinded product is split: the enclave multiplies {enclave_share:.0%} of its columns itself, "
            "beside the device's part."
        )
    if not model.count_offline_pads:
        notes.append("Offline pad generation is left out of the modelled time.")
    result = PlannerResult(
        config, epc_bytes, protect, context, ranks, assumed, model, candidates, presets, chosen, counts, notes=notes
    )
    result.elapsed_s = time.perf_counter() - began
    if chosen is None:
        smallest = min(candidates, key=lambda c: (c.resident_bytes, c.sort_key))
        raise NoPlacementFits(
            f"no placement that keeps the {' and the '.join(protect)} from the device fits an enclave budget of "
            f"{epc_bytes / MIB:,.1f} MiB: the smallest ({smallest.name}: {smallest.summary}) holds "
            f"{smallest.resident_bytes / MIB:,.1f} MiB at a {context}-token context",
            f"raise --epc to at least {math.ceil(smallest.resident_bytes / MIB)}MiB, or protect less",
            result,
        )
    return result


def _proxy_name(name: str) -> str:
    """A weight's counterpart in layer 0 (non-layer weights stand for themselves)."""
    return f"layers.0.{name.rsplit('.', 1)[-1]}" if name.startswith("layers.") else name


def _adapter_totals(ranks: Mapping[str, int], config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Per projection op: (FLOPs per token, float32 bytes) of all its adapters (as costs.py counts them)."""
    op_of = {w: op for op in PROJECTIONS for w in OPS[op].weights}
    totals = {op: (0, 0) for op in PROJECTIONS}
    for name, rank in ranks.items():
        op = op_of[name.rsplit(".", 1)[-1]]
        rows, cols = weight_shape(name, config)
        flops, stored = totals[op]
        totals[op] = (flops + 2 * rank * (rows + cols) + rows, stored + rank * (rows + cols) * FLOAT_BYTES)
    return totals


def _plus_adapters(costs: TokenCosts, layout: Layout, totals: Mapping[str, tuple[int, int]]) -> TokenCosts:
    """Add the adapters' FLOPs and tensors to the side that holds them (as costs.py and Plan.adapter_side do)."""
    flops = {ENCLAVE: 0, DEVICE: 0}
    stored = {ENCLAVE: 0, DEVICE: 0}
    for op, (op_flops_, op_bytes) in totals.items():
        side, transform = OPTIONS[layout.code_of(op)]
        side = ENCLAVE if transform == "blinded" else side
        flops[side] += op_flops_
        stored[side] += op_bytes
    c = costs.costs
    return dataclasses.replace(
        costs,
        costs=dataclasses.replace(
            c,
            enclave_flops=c.enclave_flops + flops[ENCLAVE],
            device_flops=c.device_flops + flops[DEVICE],
            enclave_weight_bytes=c.enclave_weight_bytes + stored[ENCLAVE],
            device_weight_bytes=c.device_weight_bytes + stored[DEVICE],
        ),
    )


def layout_of(plan: Plan) -> Layout | None:
    """The Layout a plan follows, if it is one (uniform over layers, misc ops together, in clear)."""
    codes = {op: set() for op in OPS}
    for p in plan.placements:
        codes[p.op].add(next(code for code, placement in OPTIONS.items() if placement == (p.side, p.transform)))
    if any(len(c) != 1 for c in codes.values()) or codes["sample"] != {"E"}:
        return None
    misc = {c for op in MISC_OPS for c in codes[op]}
    if len(misc) != 1 or not misc <= {"E", "D"} or not codes["attention"] <= {"E", "D"}:
        return None
    return Layout(misc.pop(), *codes["attention"], tuple(codes[op].pop() for op in PROJECTIONS))


def _checked(estimate: Candidate, exact: Candidate) -> Candidate:
    """The full plan's figures, after checking that the estimate from the small copies agrees."""
    if estimate.costs != exact.costs:
        raise RuntimeError(f"planner bug: extrapolated costs of {estimate.name} differ from its full plan's")
    if {a: leak.bits for a, leak in estimate.leakage.items()} != {a: leak.bits for a, leak in exact.leakage.items()}:
        raise RuntimeError(f"planner bug: leakage of {estimate.name} on a 1-layer copy differs from its full plan's")
    return exact


# --- output ------------------------------------------------------------------------------------


def _bits(leak: Leakage) -> str:
    if leak.bits is None:
        return "not measured"
    if leak.bits == 0:
        return "0"
    return f"{leak.bits:.1f}" if leak.bits < 1000 else f"{leak.bits:.3g}"


def planner_table(result: PlannerResult, top: int = TABLE_ROWS) -> str:
    """Markdown: a header, one row per shown placement (top candidates, the chosen one, every preset), the verdict."""
    mib = MIB
    budget = "no limit" if result.epc_bytes is None else f"{result.epc_bytes / mib:,.1f} MiB"
    protect = ", ".join(result.protect) or "nothing"
    counts = result.counts
    lines = [
        f"Enclave budget {budget}; protecting {protect}; one decode token at a {result.context}-token context.",
        f"Searched {counts['layouts']:,} placements: {counts['pruned_dominated']:,} dominated (device float32 vs int8), "
        f"{counts['misplaced_blinding']:,} with a blinded product next to device ops, {counts['leaking']:,} leaking a "
        f"protected asset; {counts['costed']:,} costed, {counts['fit']:,} fit. {result.elapsed_s:.1f} s.",
        f"Cost model: {result.cost_model.source}.",
        *result.notes,
        "",
        "| | placement | what runs where | ms/token | enclave MFLOP | device MFLOP | round trips | KB to / from device "
        "| enclave MiB | fits | conversation bits/token | adapter bits exposed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows(top):
        c = row.costs.costs
        mark = "**chosen**" if row is result.chosen else ("preset" if row.preset else "")
        leak = {
            a: _bits(row.leakage[a]) + (" **(protected)**" if a in result.protect and not row.leakage[a].zero else "")
            for a in ASSETS
        }
        lines.append(
            f"| {mark} | `{row.name}` | {row.summary} | {row.seconds * 1e3:,.2f} | {c.enclave_flops / 1e6:,.1f} "
            f"| {c.device_flops / 1e6:,.1f} | {c.round_trips} "
            f"| {c.bytes_to_device / 1e3:,.1f} / {c.bytes_from_device / 1e3:,.1f} "
            f"| {row.resident_bytes / mib:,.1f} | {'yes' if row.fits else 'no'} | {leak['conversation']} | {leak['adapters']} |"
        )
    lines.append("")
    if result.chosen is None:
        lines.append("Chosen: nothing fits the budget (see the error).")
    else:
        ch = result.chosen
        lines.append(
            f"Chosen: `{ch.name}` ({ch.summary}): {ch.seconds * 1e3:,.2f} ms/token modelled, "
            f"{ch.resident_bytes / mib:,.1f} MiB in the enclave."
        )
        paper = next((p for p in result.presets if p.name == "secureinfer"), None)
        if paper is not None:
            verdict = "fits" if paper.fits else "does not fit"
            leaks = [a for a in result.protect if not paper.leakage[a].zero]
            lines.append(
                f"The paper's preset `secureinfer`: {paper.seconds * 1e3:,.2f} ms/token, {verdict}"
                + (f", leaks {', '.join(leaks)}" if leaks else ", no leakage of the protected assets")
                + f" ({paper.seconds / ch.seconds:.2f}x the chosen placement's time)."
            )
    return "\n".join(lines)

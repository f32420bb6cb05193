"""A plan places every op of the model on one side of the trust boundary, and derives what must cross it.

Plans are data: a tuple of placements, one per op instance (embed, 11 ops per layer, final norm,
LM head, sample). Consecutive ops on one side form a segment; each device segment is one round
trip. The transfer schedule (which values go to the device before a segment and which come back
after it) follows from tracking where the latest version of every value lives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

from ..errors import InvalidRequestError
from ..model.config import ModelConfig
from ..model.ops import LAYER_OPS, OPS, PROJECTIONS, weight_names

ENCLAVE, DEVICE = "enclave", "device"
SIDES = (ENCLAVE, DEVICE)
# clear: float32, as is. int8: the projection runs on int8 weights (per-channel scales) and 17-bit
# fixed-point activations, exactly. blinded: the same int8 product, on the device, on activations
# one-time padded in Z_P; the enclave quantizes, pads, unpads and rescales.
TRANSFORMS = ("clear", "int8", "blinded")
# The engine only samples from the last position, so from the final norm on only that position is computed.
LAST_POSITION_OPS = ("final_norm", "lm_head", "sample")
LAST_POSITION_WEIGHTS = frozenset(name for op in LAST_POSITION_OPS for name in weight_names(op, None))  # the LM head's
HEAD_KEY_MODES = ("literal", "fold", "mixed")


@dataclass(frozen=True)
class Placement:
    op: str
    layer: int | None
    side: str
    transform: str = "clear"  # how a device op's inputs and weights are transformed; enclave ops: "clear"


@dataclass
class Segment:
    side: str
    transform: str = "clear"
    ops: list[tuple[str, int | None]] = field(default_factory=list)
    sends: list[str] = field(default_factory=list)  # values the enclave sends before a device segment
    returns: list[str] = field(default_factory=list)  # values the device sends back after it
    last_position: set[str] = field(default_factory=set)  # transferred values that hold only the last position
    keyed_attention: int | None = None  # head_key literal/mixed: the layer whose attention output the enclave un-keys


def op_sequence(config: ModelConfig) -> list[tuple[str, int | None]]:
    """Every op instance of one forward pass, in execution order."""
    layers = [(op, i) for i in range(config.num_layers) for op in LAYER_OPS]
    return [("embed", None), *layers, ("final_norm", None), ("lm_head", None), ("sample", None)]


@dataclass(frozen=True)
class Plan:
    name: str
    config: ModelConfig
    placements: tuple[Placement, ...]
    # LoRA adapters: weight name -> total rank. The adapter sits with whichever side finishes the
    # projection: the enclave for blinded ones (it unpads there), else the side that runs it.
    adapters: Mapping[str, int] = field(default_factory=dict)
    # A secret per-(layer, KV head) key on what the device's attention sees. KV-Shield permutes head_dim in
    # the device's attention weights: "literal", the enclave un-permutes each attention output (one more
    # round trip per layer); "fold", the inverse is folded into W_o and the enclave does nothing. "mixed"
    # (ours): the enclave mixes q/k/v by secret matrices before the device's attention, and unmixes its
    # output (crypto/kv_mixing.py). None: no key.
    head_key: str | None = None
    # The share of each blinded product's output columns the enclave multiplies itself, in the clear, while the
    # device multiplies the rest on the padded input (`device_columns`). The device's view only narrows: it holds
    # fewer columns of a public weight and returns fewer padded outputs, and the enclave makes pads only for its
    # columns. Worth it where the enclave would otherwise sit idle through the product, as with a CPU device.
    enclave_share: float = 0.0

    def __post_init__(self):
        if [(p.op, p.layer) for p in self.placements] != op_sequence(self.config):
            raise ValueError(f"plan {self.name!r} does not place every op of the model exactly once, in order")
        for p in self.placements:
            if p.side not in SIDES:
                raise ValueError(f"{p.op}@{p.layer}: unknown side {p.side!r}")
            if p.transform not in TRANSFORMS:
                raise InvalidRequestError(
                    f"plan {self.name!r} asks for transform {p.transform!r}, which this build lacks",
                    f"use one of {', '.join(TRANSFORMS)}",
                )
        if self.placements[-1].side != ENCLAVE:
            raise ValueError("sampling runs in the enclave: the generation loop and its RNG are trusted state")
        for p in self.placements:
            if p.transform != "clear" and p.op not in PROJECTIONS:
                raise ValueError(f"{p.op}: only the projections {PROJECTIONS} can be {p.transform}")
            if p.transform == "blinded" and p.side != DEVICE:
                raise ValueError(f"{p.op}@{p.layer}: blinding protects what goes to the device; place it there")
        for segment in self.segments:
            if segment.transform == "blinded" and len(segment.ops) != 1:
                raise ValueError(f"blinded {segment.ops[0][0]} shares a device segment: the enclave must unpad between ops")
        if self.head_key is not None:
            self._validate_head_key()
        share = self.enclave_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise InvalidRequestError(
                f"enclave_share={share!r} is invalid",
                "use a number from 0 (the device multiplies every column) up to, but not including, 1",
            )
        projected = {name for p in self.placements if p.op in PROJECTIONS for name in weight_names(p.op, p.layer)}
        if unknown := set(self.adapters) - projected:
            raise ValueError(f"adapters name weights that are not projections: {sorted(unknown)}")

    def _validate_head_key(self) -> None:
        if self.head_key not in HEAD_KEY_MODES:
            raise ValueError(f"head_key {self.head_key!r}: use one of {HEAD_KEY_MODES}")
        for p in self.placements:
            if p.op == "attention" and (p.side, p.transform) != (DEVICE, "clear"):
                raise ValueError(f"a head key protects the device's attention: attention@{p.layer} must run there")
            if self.head_key == "mixed":
                if (p.op == "rope" and p.side != ENCLAVE) or (p.op == "qkv_proj" and p.side == DEVICE and p.transform != "blinded"):
                    raise ValueError(f"mixed keys are applied in the enclave: {p.op}@{p.layer} must leave q, k, v there")
                continue
            keyed = ("qkv_proj", "rope") + (("o_proj",) if self.head_key == "fold" else ())
            if p.op in keyed and (p.side, p.transform) != (DEVICE, "clear"):
                raise ValueError(f"a head key is folded into device weights: {p.op}@{p.layer} must run on the device, in clear")

    def with_adapters(self, ranks: Mapping[str, int]) -> "Plan":
        return dataclasses.replace(self, adapters=dict(ranks))

    def with_enclave_share(self, share: float) -> "Plan":
        return dataclasses.replace(self, enclave_share=share)

    def device_columns(self, columns: int) -> int:
        """How many of a blinded product's `columns` outputs the device computes: the first ones, at least one."""
        return max(1, columns - int(columns * self.enclave_share))

    def adapter_side(self, p: Placement) -> str:
        return ENCLAVE if p.transform == "blinded" else p.side

    def adapter_sides(self) -> list[str]:
        """The sides that hold some of the adapter's tensors (a protected adapter: the enclave only)."""
        return [side for side in SIDES if any(n.endswith(".lora_a") for n in self.stored_weights(side))]

    def stored_weights(self, side: str) -> list[str]:
        """The weight tensors `side` holds: `name` (float32), `name.q` (int8, transposed), `name.scale`,
        and a LoRA adapter's `name.lora_a` and `name.lora_b`.

        A blinded projection's int8 weight sits on the device; the enclave keeps it too (to compute
        its pads, u = r W) with the scales (to rescale), so both appear on the enclave's list.
        """
        stored = []
        for p in self.placements:
            if self.adapter_side(p) == side:
                adapted = [name for name in weight_names(p.op, p.layer) if name in self.adapters]
                stored += [f"{name}.{part}" for name in adapted for part in ("lora_a", "lora_b")]
            if p.transform == "blinded":  # always on the device (validated), and mirrored in the enclave
                suffixes = (".q",) if side == DEVICE else (".q", ".scale")
            elif p.side != side:
                continue
            else:
                suffixes = (".q", ".scale") if p.transform == "int8" else ("",)
            stored += [name + suffix for name in weight_names(p.op, p.layer) for suffix in suffixes]
        return list(dict.fromkeys(stored))

    @cached_property
    def blinded_weights(self) -> list[str]:
        """The weights of the blinded projections, in execution order."""
        return [weight_names(p.op, p.layer)[0] for p in self.placements if p.transform == "blinded"]

    def attention_layers_on(self, side: str) -> list[int]:
        return [p.layer for p in self.placements if p.op == "attention" and p.side == side]

    @cached_property
    def segments(self) -> list[Segment]:
        """Group ops into same-side segments and schedule the transfers between them (sampling excluded)."""
        where: dict[str, set[str]] = {"tokens": {ENCLAVE}}
        written_by: dict[str, str] = {}
        segments: list[Segment] = []
        last_device: Segment | None = None
        for p in self.placements[:-1]:
            blinded = p.transform == "blinded"
            closed = segments and (segments[-1].transform == "blinded" or segments[-1].keyed_attention is not None)
            if not segments or segments[-1].side != p.side or blinded or closed:
                segments.append(Segment(p.side, "blinded" if blinded else "clear"))
                last_device = segments[-1] if p.side == DEVICE else last_device
            segment = segments[-1]
            spec = OPS[p.op]
            if blinded:
                self._schedule_blinded(p, segment, where, written_by)
                continue
            for value in spec.reads:
                if p.side in where[value]:
                    continue
                carrier = segment if p.side == DEVICE else last_device
                (carrier.sends if p.side == DEVICE else carrier.returns).append(value)
                if written_by.get(value) in LAST_POSITION_OPS:
                    carrier.last_position.add(value)
                where[value].add(p.side)
            for value in spec.writes:
                where[value] = {p.side}
                written_by[value] = p.op
            segment.ops.append((p.op, p.layer))
            if self.head_key in ("literal", "mixed") and p.op == "attention":
                segment.returns.append("a")  # the enclave puts it back in model order; the device then needs it again
                segment.keyed_attention = p.layer
                where["a"] = {ENCLAVE}
        if ENCLAVE not in where["logits"]:
            last_device.returns.append("logits")  # the sampler in the enclave needs them
            last_device.last_position.add("logits")
        return segments

    @staticmethod
    def _schedule_blinded(p: Placement, segment: Segment, where: dict, written_by: dict) -> None:
        """A blinded product's input comes from the enclave (which pads it) and its output goes back there
        (which unpads it): the device ends up holding neither in clear, whatever its neighbours are."""
        spec = OPS[p.op]
        if held_elsewhere := [value for value in spec.reads if ENCLAVE not in where[value]]:
            raise ValueError(
                f"blinded {p.op}@{p.layer} reads {held_elsewhere}, which only the device holds in clear: "
                "the enclave must compute a blinded product's input"
            )
        segment.sends.extend(spec.reads)
        segment.returns.extend(spec.writes)
        segment.last_position.update(v for v in spec.reads if written_by.get(v) in LAST_POSITION_OPS)
        if p.op in LAST_POSITION_OPS:
            segment.last_position.update(spec.writes)
        for value in spec.writes:
            where[value] = {ENCLAVE}
            written_by[value] = p.op
        segment.ops.append((p.op, p.layer))

    @property
    def device_segments(self) -> list[Segment]:
        return [s for s in self.segments if s.side == DEVICE]

    def describe(self) -> list[dict]:
        """One row per op kind: where its instances run (layers collapsed)."""
        rows: dict[str, dict] = {}
        for p in self.placements:
            row = rows.setdefault(p.op, {"op": p.op, "sides": {}, "transform": set()})
            row["sides"].setdefault(p.side, []).append(p.layer)
            row["transform"].add(p.transform)
        return [
            {
                "op": row["op"],
                "placement": " + ".join(
                    side if layers == [None] or len(layers) == self.config.num_layers else f"{side} (layers {layers})"
                    for side, layers in row["sides"].items()
                ),
                "transform": "/".join(sorted(row["transform"])),
            }
            for row in rows.values()
        ]


def uniform_plan(name: str, config: ModelConfig, side_of_op, head_key: str | None = None) -> Plan:
    """A plan whose placement depends only on the op kind: `side_of_op(op) -> (side, transform)`."""
    placements = []
    for op, layer in op_sequence(config):
        side, transform = side_of_op(op)
        placements.append(Placement(op, layer, side, transform))
    return Plan(name, config, tuple(placements), head_key=head_key)

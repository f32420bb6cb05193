"""Analytic per-token costs of a plan: FLOPs on each side, round trips, bytes each way, resident memory.

Figures are for one decode step (one new token, batch 1) at a given number of cached positions,
or for a prefill of `tokens` positions; the channel's counters measure the same quantities at run
time, and a test holds the two equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model.config import ModelConfig
from ..model.ops import PROJECTIONS, weight_names
from .plan import DEVICE, ENCLAVE, LAST_POSITION_OPS, Plan, Segment

FLOAT_BYTES = 4


def value_width(name: str, config: ModelConfig) -> int:
    """Elements per token of a value (logits count once per sequence in decode; see costs)."""
    return {
        "tokens": 1,
        "x": config.hidden_size,
        "h": config.hidden_size,
        "q": config.q_size,
        "k": config.kv_size,
        "v": config.kv_size,
        "a": config.q_size,
        "o": config.hidden_size,
        "gu": 2 * config.intermediate_size,
        "m": config.intermediate_size,
        "dn": config.hidden_size,
        "logits": config.vocab_size,
        "token": 1,
    }[name]


def value_itemsize(name: str) -> int:
    return 8 if name in ("tokens", "token") else 4  # int64 ids, float32 activations


def op_flops(op: str, config: ModelConfig, context: int) -> int:
    """FLOPs for one token at `context` cached positions: 2 per multiply-add, ~1 per elementwise step."""
    d, f, heads, hd = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    return {
        "embed": 0,
        "attn_norm": 4 * d,
        "qkv_proj": 2 * d * (config.q_size + 2 * config.kv_size),
        "rope": 3 * (config.q_size + config.kv_size),
        "attention": 4 * heads * hd * context + 5 * heads * context,
        "o_proj": 2 * config.q_size * d,
        "attn_residual": d,
        "ffn_norm": 4 * d,
        "gate_up_proj": 2 * d * 2 * f,
        "swiglu": 5 * f,
        "down_proj": 2 * f * d,
        "ffn_residual": d,
        "final_norm": 4 * d,
        "lm_head": 2 * d * config.vocab_size,
        "sample": config.vocab_size,
    }[op]


@dataclass(frozen=True)
class PlanCosts:
    scheme: str
    context: int  # positions attended to by the new token
    tokens: int  # positions processed in this forward (1 for decode)
    enclave_flops: int
    device_flops: int
    round_trips: int
    bytes_to_device: int
    bytes_from_device: int
    enclave_weight_bytes: int
    enclave_kv_bytes: int
    device_weight_bytes: int
    device_kv_bytes: int

    @property
    def enclave_resident_bytes(self) -> int:
        return self.enclave_weight_bytes + self.enclave_kv_bytes

    def to_dict(self) -> dict:
        return asdict(self) | {"enclave_resident_bytes": self.enclave_resident_bytes}


def weight_shape(name: str, config: ModelConfig) -> tuple[int, int]:
    """(rows, columns) of a float32 weight, [out, in] for projections; norms are [1, d]."""
    d, f = config.hidden_size, config.intermediate_size
    return {
        "embed": (config.vocab_size, d),
        "lm_head": (config.vocab_size, d),
        "final_norm": (1, d),
        "attn_norm": (1, d),
        "ffn_norm": (1, d),
        "wqkv": (config.q_size + 2 * config.kv_size, d),
        "wo": (d, config.q_size),
        "w_gate_up": (2 * f, d),
        "w_down": (d, f),
    }[name.rsplit(".", 1)[-1]]


def blinded_columns(plan: Plan, op: str, layer: int | None) -> tuple[int, int]:
    """(the device's columns, all columns) of a blinded projection's output, under the plan's enclave share."""
    (name,) = weight_names(op, layer)
    columns = weight_shape(name, plan.config)[0]
    return plan.device_columns(columns), columns


def outsourced(plan: Plan, op: str, layer: int | None, amount: int) -> int:
    """The device's part of `amount` (FLOPs, bytes) of a blinded product, which scales with its output columns."""
    device, columns = blinded_columns(plan, op, layer)
    return amount * device // columns


def stored_bytes(stored: str, plan: Plan, side: str = ENCLAVE) -> int:
    """Bytes of a stored weight tensor on `side`: `name` float32, `name.q` int8, `name.scale` float32 per
    output, a LoRA adapter's `name.lora_a` [rank, in] and `name.lora_b` [out, rank] float32. A blinded
    projection's `name.q` on the device has only the device's columns."""
    config = plan.config
    base, _, suffix = stored.rpartition(".")
    if suffix in ("lora_a", "lora_b"):
        rows, cols = weight_shape(base, config)
        return plan.adapters[base] * (cols if suffix == "lora_a" else rows) * FLOAT_BYTES
    if suffix == "q":
        rows, cols = weight_shape(base, config)
        if side == DEVICE and base in plan.blinded_weights:
            rows = plan.device_columns(rows)
        return rows * cols
    if suffix == "scale":
        return weight_shape(base, config)[0] * FLOAT_BYTES
    rows, cols = weight_shape(stored, config)
    return rows * cols * FLOAT_BYTES


def resident_weight_bytes(plan: Plan, side: str) -> int:
    names = plan.stored_weights(side)
    if plan.config.tie_word_embeddings and "embed" in names and "lm_head" in names:
        names.remove("lm_head")  # one tensor serves both
    return sum(stored_bytes(n, plan, side) for n in names)


def kv_bytes(config: ModelConfig, layers: int, positions: int) -> int:
    return 2 * layers * config.kv_size * positions * FLOAT_BYTES


def transfer_bytes(values: list[str], segment: Segment, config: ModelConfig, tokens: int) -> int:
    # Blinded values cross as int64 field elements: 8 bytes each, whatever they stand for.
    itemsize = (lambda v: 8) if segment.transform == "blinded" else value_itemsize
    return sum(value_width(v, config) * itemsize(v) * (1 if v in segment.last_position else tokens) for v in values)


def returned_bytes(plan: Plan, segment: Segment, tokens: int) -> int:
    """What the device sends back after `segment`: for a blinded product, only its columns of the output."""
    total = transfer_bytes(segment.returns, segment, plan.config, tokens)
    if segment.transform != "blinded":
        return total
    ((op, layer),) = segment.ops
    return outsourced(plan, op, layer, total)


def adapter_flops(plan: Plan, p) -> int:
    """A LoRA adapter's two thin products and the add, per position."""
    total = 0
    for name in weight_names(p.op, p.layer) if p.op in PROJECTIONS else ():
        if name in plan.adapters:
            rows, cols = weight_shape(name, plan.config)
            total += 2 * plan.adapters[name] * (rows + cols) + rows
    return total


def plan_costs(plan: Plan, context: int, tokens: int = 1) -> PlanCosts:
    config = plan.config
    flops = {ENCLAVE: 0, DEVICE: 0}
    for p in plan.placements:
        positions = 1 if p.op in LAST_POSITION_OPS else tokens
        work = op_flops(p.op, config, context) * positions
        on_side = outsourced(plan, p.op, p.layer, work) if p.transform == "blinded" else work
        flops[p.side] += on_side
        flops[ENCLAVE] += work - on_side  # the enclave's own columns of a blinded product
        flops[plan.adapter_side(p)] += adapter_flops(plan, p) * positions
    device_segments = plan.device_segments
    return PlanCosts(
        scheme=plan.name,
        context=context,
        tokens=tokens,
        enclave_flops=flops[ENCLAVE],
        device_flops=flops[DEVICE],
        round_trips=len(device_segments),
        bytes_to_device=sum(transfer_bytes(s.sends, s, config, tokens) for s in device_segments),
        bytes_from_device=sum(returned_bytes(plan, s, tokens) for s in device_segments),
        enclave_weight_bytes=resident_weight_bytes(plan, ENCLAVE),
        enclave_kv_bytes=kv_bytes(config, len(plan.attention_layers_on(ENCLAVE)), context),
        device_weight_bytes=resident_weight_bytes(plan, DEVICE),
        device_kv_bytes=kv_bytes(config, len(plan.attention_layers_on(DEVICE)), context),
    )

"""The op catalogue: every op of a LLaMA forward, with the values it reads and writes and the weights it needs.

Values are named slots (`x` is the residual stream, `h` a normed copy, ...). A plan places each op;
the transfer schedule follows from which side last wrote each value an op reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig


@dataclass(frozen=True)
class OpSpec:
    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    weights: tuple[str, ...] = ()  # weight names; per-layer ones are prefixed `layers.{i}.`
    per_layer: bool = True
    stateful: bool = False  # keeps state across steps where it runs (the KV cache)


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("embed", ("tokens",), ("x",), ("embed",), per_layer=False),
        OpSpec("attn_norm", ("x",), ("h",), ("attn_norm",)),
        OpSpec("qkv_proj", ("h",), ("q", "k", "v"), ("wqkv",)),
        OpSpec("rope", ("q", "k"), ("q", "k")),
        OpSpec("attention", ("q", "k", "v"), ("a",), stateful=True),
        OpSpec("o_proj", ("a",), ("o",), ("wo",)),
        OpSpec("attn_residual", ("x", "o"), ("x",)),
        OpSpec("ffn_norm", ("x",), ("h",), ("ffn_norm",)),
        OpSpec("gate_up_proj", ("h",), ("gu",), ("w_gate_up",)),
        OpSpec("swiglu", ("gu",), ("m",)),
        OpSpec("down_proj", ("m",), ("dn",), ("w_down",)),
        OpSpec("ffn_residual", ("x", "dn"), ("x",)),
        OpSpec("final_norm", ("x",), ("h",), ("final_norm",), per_layer=False),
        OpSpec("lm_head", ("h",), ("logits",), ("lm_head",), per_layer=False),
        OpSpec("sample", ("logits",), ("token",), per_layer=False),
    )
}
LAYER_OPS = tuple(name for name, spec in OPS.items() if spec.per_layer)
# The dense products with a public weight: the ops that can run quantized ("int8") or blinded.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def weight_names(op: str, layer: int | None) -> list[str]:
    prefix = f"layers.{layer}." if OPS[op].per_layer else ""
    return [prefix + w for w in OPS[op].weights]


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

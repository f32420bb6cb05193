"""The op catalogue: every op of a LLaMA forward, with the values it reads and writes and the weights it needs.

Values are named slots (`x` is the residual stream, `h` a normed copy, ...). `kernels` runs each op; a plan
(`plan`) places each op, and the transfer schedule follows from which side last wrote each value an op reads.
"""

from __future__ import annotations

from dataclasses import dataclass


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

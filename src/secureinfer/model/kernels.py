"""The op kernels both sides run: op name -> a function over named values, weights and the KV cache.

The same code runs in the enclave and on the device, so a plan can move any op across the
boundary without changing its numerics. The composition matches `llama.Llama.forward` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..crypto.field import field_matmul
from ..crypto.quant import QuantizedWeight, int8_linear
from .config import ModelConfig
from .ops import OPS, weight_names
from .llama import KVCache, LayerWeights, LlamaWeights, apply_rope, attention_mask, rms_norm, rotate_pairs, swiglu


@dataclass
class StepContext:
    """Everything about one forward call that every op may need; derived from public step metadata."""

    config: ModelConfig
    start: int
    batch: int
    length: int
    pad: Tensor | None
    positions: Tensor  # [1 or B, length]: each token's RoPE position (left padding shifts a row's)
    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    causal: bool
    last_only: bool

    @classmethod
    def create(
        cls, config: ModelConfig, rope: tuple[Tensor, Tensor], start: int, batch: int, length: int,
        pad: Tensor | None, last_only: bool,
    ) -> "StepContext":
        pos = torch.arange(start, start + length).unsqueeze(0)
        if pad is not None:
            pos = (pos - pad[:, None]).clamp(min=0)
        mask = None if (pad is None and (length == 1 or start == 0)) else attention_mask(start, length, pad)
        causal = mask is None and length > 1
        return cls(config, start, batch, length, pad, pos, rope[0][pos], rope[1][pos], mask, causal, last_only)


Values = dict[str, Tensor]
Weights = Mapping[str, Tensor]


def flat_weights(weights: LlamaWeights) -> dict[str, Tensor]:
    """LlamaWeights under the names the op catalogue uses (`embed`, `layers.3.wqkv`, ...)."""
    out = {"embed": weights.embed, "final_norm": weights.final_norm, "lm_head": weights.lm_head}
    for i, layer in enumerate(weights.layers):
        out.update({f"layers.{i}.{name}": getattr(layer, name) for name in LayerWeights.__dataclass_fields__})
    return out


def _heads(t: Tensor, ctx: StepContext, n: int) -> Tensor:
    return t.view(ctx.batch, ctx.length, n, ctx.config.head_dim).transpose(1, 2)


def _flat(t: Tensor, ctx: StepContext) -> Tensor:
    return t.transpose(1, 2).reshape(ctx.batch, ctx.length, -1)


def project(x: Tensor, weights: Weights, name: str) -> Tensor:
    """x @ W.T in float32, or through the int8 pipeline when the side holds the weight quantized."""
    if f"{name}.q" in weights:
        product = int8_linear(x, QuantizedWeight(weights[f"{name}.q"], weights[f"{name}.scale"]))
    else:
        product = F.linear(x, weights[name])
    return with_adapter(product, x, weights, name)


def lora_delta(x: Tensor, lora_a: Tensor, lora_b: Tensor) -> Tensor:
    """(x A^T) B^T, accumulated in float64: the enclave and the device run different thread counts,
    and float32 sums split differently would differ in the last bit."""
    return ((x.double() @ lora_a.double().T) @ lora_b.double().T).float()


def with_adapter(product: Tensor, x: Tensor, weights: Weights, name: str) -> Tensor:
    """Add the LoRA delta of `name` when this side holds its adapter; the one place both sides add it."""
    if f"{name}.lora_a" not in weights:
        return product
    return product + lora_delta(x, weights[f"{name}.lora_a"], weights[f"{name}.lora_b"])


def store_projection(op: str, values: Values, product: Tensor, ctx: StepContext) -> None:
    """Write a projection op's product to its outputs (q/k/v are one product, split here)."""
    if op == "qkv_proj":
        cfg = ctx.config
        values["q"], values["k"], values["v"] = product.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    else:
        values[OPS[op].writes[0]] = product


def blinded_product(values: Values, weights: Weights, op: str, layer: int | None) -> None:
    """The device's half of a blinded projection: y = v W mod P on one-time-padded field elements `v`."""
    (name,) = weight_names(op, layer)
    values["y"] = field_matmul(values["v"], weights[f"{name}.q"])


def _projection(op: str) -> Callable:
    def run(v: Values, w: Weights, layer: int | None, ctx: StepContext) -> None:
        (name,) = weight_names(op, layer)
        store_projection(op, v, project(v[OPS[op].reads[0]], w, name), ctx)

    return run


def _rope(v: Values, w: Weights, layer: int, ctx: StepContext) -> None:
    cfg = ctx.config
    if (keyed := w.get(f"layers.{layer}.rope_inv_freq")) is not None:
        _keyed_rope(v, keyed, ctx)
        return
    v["q"] = _flat(apply_rope(_heads(v["q"], ctx, cfg.num_heads), ctx.cos, ctx.sin), ctx)
    v["k"] = _flat(apply_rope(_heads(v["k"], ctx, cfg.num_kv_heads), ctx.cos, ctx.sin), ctx)


def _keyed_rope(v: Values, inv_freq: Tensor, ctx: StepContext) -> None:
    """RoPE with one frequency order per KV head ([kv_heads, head_dim/2]), as a head-permuted model needs.

    The angles are the same float32 products `rope_tables` forms, so each pair turns exactly as in the
    unkeyed model; only the order of the pairs differs.
    """
    cfg = ctx.config
    angles = ctx.positions.float()[:, None, :, None] * inv_freq[None, :, None, :]  # [B|1, kv_heads, T, half]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()

    def rotate(x: Tensor, heads: int) -> Tensor:
        group = heads // cfg.num_kv_heads
        return _flat(rotate_pairs(x, cos.repeat_interleave(group, dim=1), sin.repeat_interleave(group, dim=1)), ctx)

    v["q"] = rotate(_heads(v["q"], ctx, cfg.num_heads), cfg.num_heads)
    v["k"] = rotate(_heads(v["k"], ctx, cfg.num_kv_heads), cfg.num_kv_heads)


def attention(v: Values, cache: KVCache, layer: int, ctx: StepContext) -> None:
    cfg = ctx.config
    keys, values = cache.update(
        layer, ctx.start, _heads(v["k"], ctx, cfg.num_kv_heads), _heads(v["v"], ctx, cfg.num_kv_heads)
    )
    out = F.scaled_dot_product_attention(
        _heads(v["q"], ctx, cfg.num_heads), keys, values, attn_mask=ctx.mask, is_causal=ctx.causal, enable_gqa=True
    )
    v["a"] = _flat(out, ctx)


def _final_norm(v: Values, w: Weights, layer: None, ctx: StepContext) -> None:
    x = v["x"][:, -1:] if ctx.last_only else v["x"]
    v["h"] = rms_norm(x, w["final_norm"], ctx.config.rms_norm_eps)


def _norm(weight: str) -> Callable:
    def run(v: Values, w: Weights, layer: int, ctx: StepContext) -> None:
        v["h"] = rms_norm(v["x"], w[f"layers.{layer}.{weight}"], ctx.config.rms_norm_eps)

    return run


def _residual(src: str) -> Callable:
    def run(v: Values, w: Weights, layer: int, ctx: StepContext) -> None:
        v["x"] = v["x"] + v[src]

    return run


# Stateless kernels; `attention` is separate because it needs the KV cache of whichever side runs it.
KERNELS: dict[str, Callable[[Values, Weights, int | None, StepContext], None]] = {
    "embed": lambda v, w, layer, ctx: v.__setitem__("x", F.embedding(v["tokens"], w["embed"])),
    "attn_norm": _norm("attn_norm"),
    "qkv_proj": _projection("qkv_proj"),
    "rope": _rope,
    "o_proj": _projection("o_proj"),
    "attn_residual": _residual("o"),
    "ffn_norm": _norm("ffn_norm"),
    "gate_up_proj": _projection("gate_up_proj"),
    "swiglu": lambda v, w, layer, ctx: v.__setitem__("m", swiglu(v["gu"])),
    "down_proj": _projection("down_proj"),
    "ffn_residual": _residual("dn"),
    "final_norm": _final_norm,
    "lm_head": _projection("lm_head"),
}


OpObserver = Callable[[str, int | None, Values], None]


@torch.inference_mode()
def run_ops(
    ops: list[tuple[str, int | None]],
    values: Values,
    weights: Weights,
    cache: KVCache | None,
    ctx: StepContext,
    observe: OpObserver | None = None,
) -> None:
    """Run `ops` in order, reading and writing `values` in place.

    `observe(op, layer, written)` sees each op's outputs as they are made: the device's recorder uses
    it to dump every activation the device held, not only what crossed the boundary.
    """
    for op, layer in ops:
        if op == "attention":
            attention(values, cache, layer, ctx)
        else:
            KERNELS[op](values, weights, layer, ctx)
        if observe is not None:
            observe(op, layer, {name: values[name] for name in OPS[op].writes})

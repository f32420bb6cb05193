"""The LLaMA forward pass in one file: explicit ops, an explicit preallocated KV cache, no magic.

Every op is a small function of tensors (in the spirit of gpt-fast and nanoGPT), so a plan can later
run each one on either side of the trust boundary. Layouts follow transformers: weights are
`[out_features, in_features]`, RoPE pairs dimension i with i + head_dim/2 inside each head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelConfig


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # torch's fused norm: one op where the formula (weight * x * rsqrt(mean(x^2) + eps)) is five, ~40% less time
    # a call in a decode step, where the enclave runs 61 of them a token; equal to transformers' bit for bit (test).
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rope_inverse_frequencies(config: ModelConfig) -> Tensor:
    """[head_dim/2]: the rotation frequency of each pair (i, i + head_dim/2), as transformers computes it."""
    dim = config.head_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_tables(config: ModelConfig, max_len: int) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [max_len, head_dim], computed as transformers does so results match bit for bit."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inverse_frequencies(config))
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, T, head_dim]; cos/sin: [B or 1, T, head_dim]."""
    return rotate_pairs(x, cos.unsqueeze(1), sin.unsqueeze(1))


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn each pair (i, i + head_dim/2) of x by the angle whose cos/sin (broadcast to x) sit at i and i + head_dim/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def swiglu(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class LayerWeights:
    attn_norm: Tensor
    wqkv: Tensor  # q, k and v stacked on the output dim: one product per token instead of three
    wo: Tensor
    ffn_norm: Tensor
    w_gate_up: Tensor  # gate and up stacked likewise
    w_down: Tensor


# transformers' projection modules, in the order their outputs sit inside each of our fused weights
FUSED_WEIGHTS = {
    "wqkv": ("q_proj", "k_proj", "v_proj"),
    "wo": ("o_proj",),
    "w_gate_up": ("gate_proj", "up_proj"),
    "w_down": ("down_proj",),
}
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip


def module_path(layer: int, module: str) -> str:
    """transformers' path of one layer's projection, e.g. `model.layers.3.self_attn.q_proj`."""
    return f"model.layers.{layer}.{MODULE_PARENT[module]}.{module}"


@dataclass
class LlamaWeights:
    embed: Tensor
    layers: list[LayerWeights]
    final_norm: Tensor
    lm_head: Tensor  # the embedding tensor itself when tied

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, Tensor]) -> "LlamaWeights":
        """`sd` uses transformers' parameter names (`model.layers.N.self_attn.q_proj.weight`, ...)."""
        def fused(layer: int, weight: str) -> Tensor:
            members = [sd[f"{module_path(layer, module)}.weight"] for module in FUSED_WEIGHTS[weight]]
            return members[0] if len(members) == 1 else torch.cat(members)  # a lone member stays uncopied

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            layers.append(
                LayerWeights(
                    attn_norm=sd[p + "input_layernorm.weight"],
                    ffn_norm=sd[p + "post_attention_layernorm.weight"],
                    **{weight: fused(i, weight) for weight in FUSED_WEIGHTS},
                )
            )
        embed = sd["model.embed_tokens.weight"]
        lm_head = embed if config.tie_word_embeddings else sd["lm_head.weight"]
        return cls(embed=embed, layers=layers, final_norm=sd["model.norm.weight"], lm_head=lm_head)


class KVCache:
    """Keys and values for every layer, preallocated to `max_len` positions: [layers, B, kv_heads, max_len, head_dim]."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v for positions [start, start+T) and return views of everything cached so far."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_mask(start: int, length: int, pad: Tensor | None) -> Tensor:
    """Boolean [B|1, 1, T, start+T] mask: causal, and blind to each row's left padding.

    A padding query still sees itself, so its softmax row is never empty: an all-masked row gives
    NaN, and NaN values would poison real rows through 0 * NaN in the attention product.
    """
    query_pos = torch.arange(start, start + length).unsqueeze(1)
    key_pos = torch.arange(start + length).unsqueeze(0)
    mask = key_pos <= query_pos
    if pad is None:
        return mask[None, None]
    real_key = key_pos[None] >= pad[:, None, None]
    return (mask[None] & (real_key | (key_pos == query_pos)[None])).unsqueeze(1)


class Llama:
    """A LLaMA decoder over `LlamaWeights`. `forward` runs prefill (T > 1) and decode (T == 1) alike."""

    def __init__(self, config: ModelConfig, weights: LlamaWeights):
        self.config = config
        self.weights = weights
        self.rope_cos, self.rope_sin = rope_tables(config, config.max_position_embeddings)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, sd: dict[str, Tensor]) -> "Llama":
        return cls(config, LlamaWeights.from_state_dict(config, sd))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, min(max_len, self.config.max_position_embeddings))

    def positions(self, start: int, length: int, pad: Tensor | None) -> Tensor:
        pos = torch.arange(start, start + length).unsqueeze(0)
        return pos if pad is None else (pos - pad[:, None]).clamp(min=0)

    @torch.inference_mode()
    def forward(
        self,
        tokens: Tensor,
        cache: KVCache,
        start: int,
        pad: Tensor | None = None,
        last_only: bool = True,
    ) -> Tensor:
        """tokens: [B, T] ids at positions [start, start+T). `pad[b]` counts row b's left-padding tokens.

        Returns logits [B, 1, vocab] for the last position, or [B, T, vocab] with `last_only=False`.
        """
        cfg, w = self.config, self.weights
        batch, length = tokens.shape
        pos = self.positions(start, length, pad)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        # Decoding one token with no padding needs no mask; a fresh prefill is plain causal.
        mask = None if (pad is None and (length == 1 or start == 0)) else attention_mask(start, length, pad)
        causal = mask is None and length > 1

        x = F.embedding(tokens, w.embed)
        for i, layer in enumerate(w.layers):
            h = rms_norm(x, layer.attn_norm, cfg.rms_norm_eps)
            q, k, v = F.linear(h, layer.wqkv).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = apply_rope(q.view(batch, length, cfg.num_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            k = apply_rope(k.view(batch, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
            keys, values = cache.update(i, start, k, v)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
            x = x + F.linear(attn.transpose(1, 2).reshape(batch, length, cfg.q_size), layer.wo)

            h = rms_norm(x, layer.ffn_norm, cfg.rms_norm_eps)
            x = x + F.linear(swiglu(F.linear(h, layer.w_gate_up)), layer.w_down)

        if last_only:
            x = x[:, -1:]
        return F.linear(rms_norm(x, w.final_norm, cfg.rms_norm_eps), w.lm_head)

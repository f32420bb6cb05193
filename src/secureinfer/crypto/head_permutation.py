"""KV-Shield's key (Yang et al., arXiv 2409.04040): one secret permutation of head_dim per layer and KV head.

Folded into the rows of W_q, W_k and W_v (the query heads of a GQA group share their KV head's key), it
makes the device compute, and cache, keys and values whose dimensions are shuffled; q.k is unchanged, so
attention needs no enclave help, and the attention output comes out shuffled the same way as the values.
The enclave undoes that (the paper's mode), or the inverse is folded into W_o's input columns (`fold`).

RoPE rotates dimension i with i + head_dim/2 at a frequency that depends on i. So the key moves those pairs
as ordered units (a permutation of head_dim/2 pairs, applied to both halves alike), and the device gets the
per-head inverse frequencies in the same order. That table is the key in other clothes: RoPE's frequencies
are public and distinct, so the device reads the permutation off it (`attacks/key_recovery` shows the same
key also falls to matching the weights against the public ones). The alternative, RoPE in the enclave, would
cost the enclave the q/k projections or a round trip that shows the device q and k both before and after
rotation, which gives the frequencies away just the same.

Convention (as in `attacks/key_recovery`): `permutations[layer, kv_head, j]` is the public dimension that
device dimension j holds, so a device tensor is `public[..., permutations[layer, kv_head]]` per head.
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor

from ..model.config import ModelConfig
from ..model.llama import rope_inverse_frequencies


def random_pair_permutation(head_dim: int) -> list[int]:
    """A uniformly random permutation of head_dim that keeps RoPE pairs (i, i + head_dim/2) together, in order."""
    half = head_dim // 2
    pairs = list(range(half))
    secrets.SystemRandom().shuffle(pairs)  # the OS CSPRNG: this is key material
    return pairs + [p + half for p in pairs]


class HeadPermutation:
    """A session's key: permutations [layers, kv_heads, head_dim] (int64), drawn fresh, held only by the enclave."""

    def __init__(self, config: ModelConfig, permutations: Tensor):
        shape = (config.num_layers, config.num_kv_heads, config.head_dim)
        if tuple(permutations.shape) != shape:
            raise ValueError(f"a head permutation for this model has shape {shape}, got {tuple(permutations.shape)}")
        self.config = config
        self.permutations = permutations
        self.inverse = permutations.argsort(dim=-1)

    @classmethod
    def draw(cls, config: ModelConfig, allocate=torch.empty) -> "HeadPermutation":
        """`allocate(shape, dtype)` places the key, e.g. in the enclave's secret memory."""
        drawn = [
            [random_pair_permutation(config.head_dim) for _ in range(config.num_kv_heads)]
            for _ in range(config.num_layers)
        ]
        permutations = allocate((config.num_layers, config.num_kv_heads, config.head_dim), torch.int64)
        permutations.copy_(torch.tensor(drawn, dtype=torch.int64))
        return cls(config, permutations)

    def _index(self, layer: int, heads: int, table: Tensor) -> Tensor:
        """Indices into a [heads * head_dim] axis that apply `table[layer]` per head (query heads share by group)."""
        group = heads // self.config.num_kv_heads
        dim = self.config.head_dim
        per_head = table[layer].repeat_interleave(group, dim=0)  # [heads, head_dim]
        return (per_head + torch.arange(heads)[:, None] * dim).reshape(-1)

    def query_index(self, layer: int) -> Tensor:
        return self._index(layer, self.config.num_heads, self.permutations)

    def fold_into(self, weights: dict[str, Tensor], fold_output: bool) -> dict[str, Tensor]:
        """The device's copy of `weights` (our fused names) with the key folded in, plus each layer's RoPE
        frequencies in key order (`layers.{i}.rope_inv_freq`, [kv_heads, head_dim/2]).

        Rows of `wqkv` (and of a LoRA adapter's `wqkv.lora_b`) are permuted; with `fold_output`, so are the
        input columns of `wo` (and of `wo.lora_a`). Anything else passes through unchanged.
        """
        cfg = self.config
        out = dict(weights)
        inv_freq = rope_inverse_frequencies(cfg)
        for layer in range(cfg.num_layers):
            q_rows = self.query_index(layer)
            kv_rows = self._index(layer, cfg.num_kv_heads, self.permutations)
            rows = torch.cat([q_rows, cfg.q_size + kv_rows, cfg.q_size + cfg.kv_size + kv_rows])
            for name in (f"layers.{layer}.wqkv", f"layers.{layer}.wqkv.lora_b"):
                if name in out:
                    out[name] = out[name][rows].contiguous()
            if fold_output:
                for name in (f"layers.{layer}.wo", f"layers.{layer}.wo.lora_a"):
                    if name in out:
                        out[name] = out[name][:, q_rows].contiguous()
            half = cfg.head_dim // 2
            out[f"layers.{layer}.rope_inv_freq"] = inv_freq[self.permutations[layer, :, :half]].contiguous()
        return out

    def unpermute_attention(self, attention_output: Tensor, layer: int) -> Tensor:
        """Put the device's attention output [..., q_size], shuffled like the values, back in model order."""
        return attention_output.index_select(-1, self._index(layer, self.config.num_heads, self.inverse))

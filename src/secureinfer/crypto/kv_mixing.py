"""Our KV-on-device key: secret invertible matrices that mix each head's queries, keys and values.

Per layer and KV head the enclave holds A (keys) and C (values), drawn fresh per session. It sends the
device k' = k A and v' = v C for every new position (after RoPE, which the enclave applies), and, each
step, q' = q A^-T for the query heads of that group. Then q' k'^T = q k^T, so the device's ordinary
attention over its cache of k', v' gives softmax(q k^T / sqrt(d)) V C, and the enclave multiplies by C^-1.

Unlike KV-Shield's permutation, a dense mix changes the values themselves (sorted-value matching has
nothing to sort), and A is not orthogonal, so the Gram matrix of the cached keys changes too. Nothing of
the key is in the device's weights: the device holds only the blinded projections' public int8 weights.
What the device does see is q k^T: attention needs the scores, and whoever computes softmax sees them.

Each matrix is U diag(s) V with U, V Haar-orthogonal and s log-uniform in [1/2, 2]: far from orthogonal,
but with condition number at most 4, so mixing and unmixing in float32 costs ~1e-6 relative error.
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor

from ..model.config import ModelConfig

SPREAD = 2.0  # singular values in [1/SPREAD, SPREAD]


def _haar_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * r.diagonal().sign()


def random_mixing(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(M, M^-1), float64, with M = U diag(s) V as described above."""
    u, v = _haar_orthogonal(n, generator), _haar_orthogonal(n, generator)
    s = SPREAD ** (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)
    return u @ torch.diag(s) @ v, v.T @ torch.diag(1 / s) @ u.T


class KVMixing:
    """A session's key: for each (layer, KV head), A and A^-T for keys and queries, C and C^-1 for values."""

    def __init__(self, config: ModelConfig, allocate=torch.empty):
        self.config = config
        shape = (config.num_layers, config.num_kv_heads, config.head_dim, config.head_dim)
        self.key, self.query, self.value, self.output = (allocate(shape, torch.float32) for _ in range(4))
        # The seed comes from the OS CSPRNG and the draws never leave the enclave: the device sees only
        # products with them, never the generator's raw output.
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        for layer in range(config.num_layers):
            for head in range(config.num_kv_heads):
                a, a_inverse = random_mixing(config.head_dim, generator)
                c, c_inverse = random_mixing(config.head_dim, generator)
                self.key[layer, head], self.query[layer, head] = a, a_inverse.T
                self.value[layer, head], self.output[layer, head] = c, c_inverse

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.key, self.query, self.value, self.output))

    def _apply(self, x: Tensor, matrices: Tensor, heads: int) -> Tensor:
        """x [..., heads * head_dim]: each head's row times its group's matrix."""
        per_head = matrices.repeat_interleave(heads // self.config.num_kv_heads, dim=0)  # [heads, d, d]
        split = x.unflatten(-1, (heads, self.config.head_dim))
        return torch.einsum("...hd,hde->...he", split, per_head).flatten(-2)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config
        return (
            self._apply(q, self.query[layer], cfg.num_heads),
            self._apply(k, self.key[layer], cfg.num_kv_heads),
            self._apply(v, self.value[layer], cfg.num_kv_heads),
        )

    def unmix_attention(self, attention_output: Tensor, layer: int) -> Tensor:
        return self._apply(attention_output, self.output[layer], self.config.num_heads)

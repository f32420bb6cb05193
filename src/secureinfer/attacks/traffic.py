"""What an adversary can try on blinded traffic: is it uniform, does it predict the plaintext or the token,
and was any pad used twice?"""

from __future__ import annotations

import torch
from scipy.stats import chisquare, kstest
from torch import Tensor

from ..crypto.field import to_signed
from ..crypto.quant import ACTIVATION_QMAX


def uniformity_counts(values: Tensor, modulus: int, bins: int = 256) -> Tensor:
    """How many of `values` fall in each of `bins` equal bins of [0, modulus): views' counts add up."""
    if values.numel() < 5 * bins:
        raise ValueError(f"{values.numel()} values are too few for {bins} bins; chi-square wants at least 5 per bin")
    return torch.bincount((values.double() * bins / modulus).long().clamp(0, bins - 1), minlength=bins)


def counts_p_value(counts: Tensor) -> float:
    """Chi-square p-value that bin counts came from a uniform distribution over the bins."""
    return float(chisquare(counts.numpy()).pvalue)


def uniformity_p_value(values: Tensor, modulus: int, bins: int = 256) -> float:
    """Chi-square p-value that `values` are uniform over [0, modulus), counted in `bins` equal bins.

    Uniform traffic gives p uniform on (0, 1); structure shows as p near 0.
    """
    return counts_p_value(uniformity_counts(values, modulus, bins))


def views_p_value(p_values: list[float]) -> float | None:
    """Kolmogorov-Smirnov p-value that per-view uniformity p-values are themselves uniform on (0, 1).

    The smallest of n uniform p-values is near 1/(n + 1) by chance alone (0.034 for 28 views), so a low minimum
    is no finding by itself; a distribution of them piled towards 0 is. None below 2 views.
    """
    return float(kstest(p_values, "uniform").pvalue) if len(p_values) >= 2 else None


def regression_r_squared(observed: Tensor, plaintext: Tensor) -> float:
    """Share of the plaintext's variance that an affine least-squares fit on the observed values explains.

    0 is chance; 1 would mean the device reads the plaintext off its traffic.
    """
    x, y = observed.flatten().double(), plaintext.flatten().double()
    design = torch.stack([x / x.abs().max().clamp(min=1), torch.ones_like(x)], dim=1)
    residual = y[:, None] - design @ torch.linalg.lstsq(design, y[:, None]).solution
    return 1 - residual.var().item() / y.var().item()


def nearest_embedding_tokens(received: Tensor, candidates: Tensor, modulus: int) -> Tensor:
    """Read each received row as if it were the plaintext and return the most cosine-similar candidate row.

    Against the first projection of layer 0, `candidates` are the public normalized embeddings (one per
    token, as the enclave would feed them): clear or scaled activations give the token away; padded
    ones leave the attacker at chance.
    """
    signed = to_signed(received.long() % modulus).double()
    unit = signed / signed.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    reference = candidates.double() / candidates.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (unit @ reference.T).argmax(dim=-1)


def pad_reuse_pairs(received: Tensor, modulus: int, bound: int = 2 * ACTIVATION_QMAX + 1) -> list[tuple[int, int]]:
    """Pairs of rows that look blinded by the same pad: their difference mod P is small in every coordinate.

    With one pad r on two rows, (x1 + r) - (x2 + r) = x1 - x2, whose entries are below twice the
    fixed-point range; with independent uniform pads an entry lands there with probability ~2^-16, so a
    whole row of them never happens by chance. A cheap screen on the first column finds candidate pairs.
    """
    rows = received.long() % modulus
    first = rows[:, 0]
    close = to_signed((first[:, None] - first[None, :]) % modulus).abs() <= bound
    pairs = []
    for i, j in torch.nonzero(torch.triu(close, diagonal=1)).tolist():
        if to_signed((rows[i] - rows[j]) % modulus).abs().max() <= bound:
            pairs.append((i, j))
    return pairs

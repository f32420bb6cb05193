"""Statistics an adversary runs on blinded traffic: does it look uniform, and does it predict the plaintext?"""

from __future__ import annotations

import torch
from scipy.stats import chisquare
from torch import Tensor


def uniformity_p_value(values: Tensor, modulus: int, bins: int = 256) -> float:
    """Chi-square p-value that `values` are uniform over [0, modulus), counted in `bins` equal bins.

    Uniform traffic gives p uniform on (0, 1); structure shows as p near 0.
    """
    if values.numel() < 5 * bins:
        raise ValueError(f"{values.numel()} values are too few for {bins} bins; chi-square wants at least 5 per bin")
    counts = torch.bincount((values.double() * bins / modulus).long().clamp(0, bins - 1), minlength=bins)
    return float(chisquare(counts.numpy()).pvalue)


def regression_r_squared(observed: Tensor, plaintext: Tensor) -> float:
    """Share of the plaintext's variance that an affine least-squares fit on the observed values explains.

    0 is chance; 1 would mean the device reads the plaintext off its traffic.
    """
    x, y = observed.flatten().double(), plaintext.flatten().double()
    design = torch.stack([x / x.abs().max().clamp(min=1), torch.ones_like(x)], dim=1)
    residual = y[:, None] - design @ torch.linalg.lstsq(design, y[:, None]).solution
    return 1 - residual.var().item() / y.var().item()

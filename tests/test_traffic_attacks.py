"""The traffic statistics and the content search catch what they are meant to catch, so a pass means something."""

from __future__ import annotations

import pytest
import torch

from safetensors.torch import save_file

from secureinfer.attacks.content import find_in_view, tensor_probes
from secureinfer.attacks.traffic import regression_r_squared, uniformity_p_value
from secureinfer.crypto.field import P
from secureinfer.crypto.pads import uniform_field


def test_uniformity_rejects_structured_traffic_and_accepts_pads():
    pads = uniform_field(64, 1000).flatten()
    assert uniformity_p_value(pads, P) > 1e-3
    # Small signed activations mapped into the field cluster at both ends of [0, P).
    activations = torch.randint(-3000, 3000, (64_000,)) % P
    assert uniformity_p_value(activations, P) < 1e-12
    # A subtler skew: a fifth of the values squeezed into the lower half.
    skewed = pads.clone()
    skewed[: len(skewed) // 5] //= 2
    assert uniformity_p_value(skewed, P) < 1e-6


def test_uniformity_refuses_too_few_values():
    with pytest.raises(ValueError, match="too few"):
        uniformity_p_value(torch.arange(100), P)


def test_regression_reads_a_leaky_channel_and_not_a_padded_one():
    plaintext = torch.randint(-2**20, 2**20, (50_000,))
    leaky = plaintext * 3 + torch.randint(-1000, 1000, plaintext.shape) + 7
    assert regression_r_squared(leaky, plaintext) > 0.99
    padded = (plaintext + uniform_field(1, plaintext.numel()).flatten()) % P
    assert abs(regression_r_squared(padded, plaintext)) < 1e-3


def test_content_search_finds_a_secret_in_any_precision_at_any_offset(tmp_path):
    secret = {"lora_a": torch.randn(16, 64), "lora_b": torch.randn(64, 16)}
    probes = tensor_probes(secret)
    noise = torch.randint(-128, 128, (1 << 16,), dtype=torch.int8).numpy().tobytes()
    (tmp_path / "clean.bin").write_bytes(noise)
    assert find_in_view(tmp_path, probes) == []
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        leaked = secret["lora_b"][::4].to(dtype)
        name = f"leak-{str(dtype).removeprefix('torch.')}"
        (tmp_path / "nested").mkdir(exist_ok=True)
        save_file({"x": leaked.contiguous()}, tmp_path / "nested" / f"{name}.safetensors")
        hits = find_in_view(tmp_path, probes)
        assert {(probe.split(" as ")[1], file) for probe, file, _ in hits} >= {(str(dtype), f"nested/{name}.safetensors")}
    # At an odd byte offset inside other bytes, and quantized to int8 the way a device would hold it.
    row = secret["lora_a"][0]
    quantized = torch.round(row.double() * 127 / row.abs().max()).to(torch.int8).numpy().tobytes()
    (tmp_path / "odd.bin").write_bytes(noise[:1001] + row.numpy().tobytes() + noise[:77] + quantized)
    found = {probe for probe, file, _ in find_in_view(tmp_path, probes) if file == "odd.bin"}
    assert found == {"lora_a[0] as torch.float32", "lora_a[0] as torch.int8"}


def test_content_search_refuses_a_probe_too_short_to_mean_anything(tmp_path):
    (tmp_path / "f").write_bytes(b"abcdef")
    with pytest.raises(ValueError, match="4 or more"):
        find_in_view(tmp_path, {"tiny": b"ab"})

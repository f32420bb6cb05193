"""The traffic statistics and the content search catch what they are meant to catch, so a pass means something."""

from __future__ import annotations

import pytest
import torch

from safetensors.torch import save_file

from secureinfer.attacks.content import find_in_view, tensor_probes
from secureinfer.attacks.traffic import (
    nearest_embedding_tokens,
    pad_reuse_pairs,
    regression_r_squared,
    counts_p_value,
    uniformity_counts,
    uniformity_p_value,
    views_p_value,
)
from secureinfer.crypto.field import P
from secureinfer.crypto.pads import uniform_field
from secureinfer.crypto.quant import quantize_activation
from secureinfer.model.llama import rms_norm


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


def test_the_views_p_values_are_tested_as_a_whole():
    # 28 p-values spread evenly over (0, 1), the smallest one 0.004: nothing, however low that one looks.
    spread = [0.004] + [(i + 0.5) / 28 for i in range(1, 28)]
    assert views_p_value(spread) > 0.5
    # Views that each look only mildly off, together: every p below 0.3.
    assert views_p_value([0.3 * (i + 0.5) / 28 for i in range(28)]) < 1e-6
    assert views_p_value([0.2]) is None  # one view: nothing to compare its p with


def _view_statistics(values: torch.Tensor) -> dict:
    counts = uniformity_counts(values, P)
    return {"elements": values.numel(), "uniformity_p": counts_p_value(counts), "pad_reuse_pairs": 0, "bin_counts": counts.tolist()}


def test_pooling_the_views_counts_finds_a_bias_no_single_view_shows():
    from secureinfer.attacks.audit import _pool_traffic

    views = []
    for _ in range(28):
        values = uniform_field(100, 1000).flatten()
        # 70 of 100,000 values moved into the lowest bin: that bin ~3.5 sigma high, one view's chi-square ~0.5 sigma.
        # (60 left the pooled p at 1e-16 typically but once, in CI, at 1.2e-9; 70: at most 4e-23 in 30 tries.)
        values[:70] %= P // 256
        views.append(_view_statistics(values))
    pooled = _pool_traffic(views)
    assert sorted(pooled["uniformity_p"])[14] > 0.05  # one view at a time, nothing remarkable
    assert pooled["pooled_uniformity_p"] < 1e-9 and pooled["bins"] == 256 and pooled["elements"] == 28 * 100_000
    fair = _pool_traffic([_view_statistics(uniform_field(100, 1000).flatten()) for _ in range(28)])
    assert fair["pooled_uniformity_p"] > 1e-4


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


def test_nearest_embedding_reads_clear_activations_and_not_padded_ones():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(500, 64, generator=generator)
    tokens = torch.randint(0, 500, (300,), generator=generator)
    plaintext, _ = quantize_activation(embeddings[tokens])
    assert (nearest_embedding_tokens(plaintext % P, embeddings, P) == tokens).float().mean() == 1.0
    padded = (plaintext + uniform_field(300, 64)) % P
    assert (nearest_embedding_tokens(padded, embeddings, P) == tokens).float().mean() < 0.05  # chance: 1/500


def test_pad_reuse_is_found_exactly_where_a_pad_was_used_twice():
    plaintext, _ = quantize_activation(torch.randn(40, 96))
    pads = uniform_field(40, 96)
    assert pad_reuse_pairs((plaintext + pads) % P, P) == []
    pads[27] = pads[9]
    assert pad_reuse_pairs((plaintext + pads) % P, P) == [(9, 27)]


def test_a_secureinfer_session_reuses_no_pad_and_its_first_projection_hides_the_tokens(tiny_lm, tiny_gguf):
    import secureinfer

    with secureinfer.load(tiny_gguf, "secureinfer", progress=False, channel="inprocess") as lm:
        received, original = [], lm.runtime.channel.request

        def spy(kind, meta=None, tensors=None, **options):
            if kind == "run" and meta.get("blinded") and [list(op) for op in meta["ops"]] == [["qkv_proj", 0]]:
                received.append(tensors["v"])
            return original(kind, meta, tensors, **options)

        lm.runtime.channel.request = spy
        result = lm.generate("the cat sat on the mat by the door", max_new_tokens=40, ignore_eos=True)
        weights = lm.runtime.weights
    rows = torch.cat(received)
    tokens = torch.tensor(lm.tokenizer.encode("the cat sat on the mat by the door") + result.tokens[:-1])
    assert len(rows) == len(tokens) and pad_reuse_pairs(rows, P) == []
    normalized = rms_norm(weights["embed"], weights["layers.0.attn_norm"], lm.config.rms_norm_eps)
    hits = (nearest_embedding_tokens(rows, normalized, P) == tokens).float().mean().item()
    assert hits < 0.1  # the tiny vocabulary's chance level is below 0.01

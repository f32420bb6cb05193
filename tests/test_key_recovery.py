"""Key recovery from weights finds a KV-Shield key drawn here, and only when the device weights are permuted.

Every check compares the attack's answer with the permutation the test drew itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from gguf_fixtures import tiny_llama_config, tiny_llama_model
from secureinfer.attacks.key_recovery import (
    CONFIDENT_MARGIN,
    attention_weights,
    recover_permutations,
    unpermute_kv_cache,
)
from secureinfer.crypto.quant import quantize_weight
from secureinfer.model import Llama, ModelConfig
from secureinfer.model.kernels import flat_weights
from secureinfer.model.llama import LlamaWeights


def draw_key(config: ModelConfig, generator: torch.Generator, pair_units: bool) -> Tensor:
    """int64 [layers, kv_heads, head_dim]: position j of a device head holds public row key[..., j]."""
    heads = config.num_layers * config.num_kv_heads
    if not pair_units:
        keys = [torch.randperm(config.head_dim, generator=generator) for _ in range(heads)]
        return torch.stack(keys).view(config.num_layers, config.num_kv_heads, config.head_dim)
    half = config.head_dim // 2
    units = torch.stack([torch.randperm(half, generator=generator) for _ in range(heads)])
    return torch.cat([units, units + half], dim=-1).view(config.num_layers, config.num_kv_heads, config.head_dim)


def haar_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * r.diagonal().sign()).float()  # the sign fix makes it uniform; raw QR leans towards -I


def device_weights(
    public: dict[str, Tensor], config: ModelConfig, key: Tensor, *, fold: bool, mixing: Tensor | None = None
) -> dict[str, Tensor]:
    """The attention weights a KV-Shield device holds, in transformers' names: each head's q/k/v rows
    reordered by `key` (W_o's input columns too when `fold`). `mixing[layer, kv_head]` ([head_dim, head_dim],
    orthogonal) then mixes the reordered rows, as a KV-Cloak-style defence does instead of permuting."""
    dim, group = config.head_dim, config.num_heads // config.num_kv_heads
    out = {}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.self_attn."
        q, k, v, o = (public[f"{prefix}{p}_proj.weight"].clone() for p in "qkvo")
        for kv_head in range(config.num_kv_heads):
            transform = key[layer, kv_head]
            mix = None if mixing is None else mixing[layer, kv_head]

            def keyed(rows: Tensor) -> Tensor:
                return rows[transform] if mix is None else mix @ rows[transform]

            query_heads = range(kv_head * group, (kv_head + 1) * group)
            for weight, heads in ((q, query_heads), (k, [kv_head]), (v, [kv_head])):
                for head in heads:
                    weight[head * dim : (head + 1) * dim] = keyed(weight[head * dim : (head + 1) * dim].clone())
            if fold:
                for head in query_heads:
                    o[:, head * dim : (head + 1) * dim] = keyed(o[:, head * dim : (head + 1) * dim].T.clone()).T
        out.update({f"{prefix}{p}_proj.weight": w for p, w in zip("qkvo", (q, k, v, o))})
    return out


def fused_int8(device: dict[str, Tensor], config: ModelConfig, *, with_scale: bool) -> dict[str, Tensor]:
    """The same weights as our device holds them quantized: `layers.{i}.wqkv.q` / `layers.{i}.wo.q`, int8
    [in, out], with the per-row scales or (as under blinding) without them."""
    out = {}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.self_attn."
        fused = {
            "wqkv": torch.cat([device[f"{prefix}{p}_proj.weight"] for p in "qkv"]),
            "wo": device[f"{prefix}o_proj.weight"],
        }
        for name, weight in fused.items():
            quantized = quantize_weight(weight)
            out[f"layers.{layer}.{name}.q"] = quantized.weight_t
            if with_scale:
                out[f"layers.{layer}.{name}.scale"] = quantized.scale
    return out


def permute_cache(cache: Tensor, key: Tensor) -> Tensor:
    """What the device caches under `key`: [layers, batch, kv_heads, positions, head_dim], head_dim reordered."""
    return cache.gather(-1, key[:, None, :, None, :].expand_as(cache))


def fraction_right(recovered: Tensor, key: Tensor) -> float:
    return (recovered == key).float().mean().item()


# --- tiny random-weight model: the mechanics -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    config = ModelConfig.from_hf_config(tiny_llama_config().to_dict())
    return config, tiny_llama_model().state_dict()


@pytest.mark.parametrize("pair_units", [False, True])
@pytest.mark.parametrize("fold", [False, True])
def test_tiny_key_recovered_exactly(tiny, pair_units, fold):
    config, public = tiny
    key = draw_key(config, torch.Generator().manual_seed(1), pair_units)
    result = recover_permutations(device_weights(public, config, key, fold=fold), public, config, pair_units=pair_units)
    assert torch.equal(result.permutations, key)
    assert result.confident and bool((result.similarity > 0.999).all())
    assert result.layer_confidence.shape == (config.num_layers,)
    # A free key of 16 dims keeps RoPE pairs in order with probability 8!/16! ~ 2e-9 per head.
    assert result.respects_pairs.all() if pair_units else not result.respects_pairs.any()
    # Fold mode permutes W_o's columns; otherwise W_o is the public one and must not vote for the identity.
    assert result.sources == (("q_proj", "k_proj", "v_proj", "o_proj") if fold else ("q_proj", "k_proj", "v_proj"))


def test_free_recovery_reports_a_pair_unit_key_as_respecting_pairs(tiny):
    config, public = tiny
    key = draw_key(config, torch.Generator().manual_seed(2), pair_units=True)
    result = recover_permutations(device_weights(public, config, key, fold=False), public, config)
    assert torch.equal(result.permutations, key) and bool(result.respects_pairs.all())


def test_score_against_a_supplied_truth(tiny):
    config, public = tiny
    key = draw_key(config, torch.Generator().manual_seed(3), pair_units=False)
    device = device_weights(public, config, key, fold=False)
    assert recover_permutations(device, public, config, truth=key).fraction_recovered == 1.0
    # Two positions of one head swapped in the truth: the score must drop by exactly those two.
    wrong = key.clone()
    wrong[0, 0, [0, 1]] = wrong[0, 0, [1, 0]]
    expected = 1 - 2 / key.numel()
    assert recover_permutations(device, public, config, truth=wrong).fraction_recovered == pytest.approx(expected)
    assert recover_permutations(device, public, config).fraction_recovered is None


def test_fused_layout_reads_as_transformers_names(tiny):
    config, public = tiny
    fused = flat_weights(LlamaWeights.from_state_dict(config, public))
    assert attention_weights(fused, config).keys() == attention_weights(public, config).keys()
    for name, weight in attention_weights(fused, config).items():
        assert torch.equal(weight, public[name]), name
    dequantized = attention_weights(fused_int8(public, config, with_scale=True), config)
    for name, weight in dequantized.items():
        assert torch.allclose(weight, public[name], atol=public[name].abs().max().item() / 127), name


@pytest.mark.parametrize("with_scale", [False, True])
def test_tiny_key_recovered_from_fused_int8(tiny, with_scale):
    config, public = tiny
    key = draw_key(config, torch.Generator().manual_seed(4), pair_units=False)
    device = fused_int8(device_weights(public, config, key, fold=True), config, with_scale=with_scale)
    result = recover_permutations(device, public, config)
    assert torch.equal(result.permutations, key) and "o_proj" in result.sources


def test_missing_projections_are_refused(tiny):
    config, public = tiny
    with pytest.raises(ValueError, match="layer 0"):
        recover_permutations({"model.embed_tokens.weight": public["model.embed_tokens.weight"]}, public, config)


def test_unpermuting_restores_the_cache(tiny):
    config, _ = tiny
    key = draw_key(config, torch.Generator().manual_seed(5), pair_units=False)
    cache = torch.randn(config.num_layers, 2, config.num_kv_heads, 7, config.head_dim)
    permuted = permute_cache(cache, key)
    assert not torch.equal(permuted, cache)
    assert torch.equal(unpermute_kv_cache(permuted, key), cache)


def test_tiny_orthogonal_mixing_is_not_confident(tiny):
    config, public = tiny
    generator = torch.Generator().manual_seed(6)
    key = draw_key(config, generator, pair_units=False)
    mixing = torch.stack([haar_orthogonal(config.head_dim, generator) for _ in range(key.shape[0] * key.shape[1])])
    device = device_weights(public, config, key, fold=True, mixing=mixing.view(*key.shape[:2], *mixing.shape[1:]))
    assert not recover_permutations(device, public, config).confident


# --- the real SmolLM2 weights: acceptance ----------------------------------------------------------


@pytest.fixture(scope="module")
def real(real_checkpoint):
    return real_checkpoint.config, real_checkpoint.weights


@pytest.mark.integration
@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize(("pair_unit_key", "pair_units"), [(False, False), (True, False), (True, True)])
def test_real_key_recovered(real, precision, pair_unit_key, pair_units):
    config, public = real
    key = draw_key(config, torch.Generator().manual_seed(10 + pair_unit_key), pair_unit_key)
    if precision == "fp32":  # fold mode, transformers' names
        device = device_weights(public, config, key, fold=True)
    else:  # the paper-literal mode (W_o as published), int8 without scales in our fused layout
        device = fused_int8(device_weights(public, config, key, fold=False), config, with_scale=False)
    result = recover_permutations(device, public, config, pair_units=pair_units, truth=key)
    recovered = fraction_right(result.permutations, key)
    assert recovered >= 0.95, f"{recovered:.4f} of the key"
    assert result.fraction_recovered == pytest.approx(recovered)
    assert result.confident
    assert result.respects_pairs.all() if pair_unit_key else not result.respects_pairs.any()
    assert ("o_proj" in result.sources) == (precision == "fp32")


@pytest.mark.integration
def test_real_cache_restored_with_recovered_key(real):
    config, public = real
    key = draw_key(config, torch.Generator().manual_seed(20), pair_units=False)
    result = recover_permutations(device_weights(public, config, key, fold=False), public, config)
    model = Llama.from_state_dict(config, public)
    cache = model.new_cache(1, 12)
    model.forward(torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(21)), cache, 0)
    for plain in (cache.k, cache.v):
        assert torch.equal(unpermute_kv_cache(permute_cache(plain, key), result.permutations), plain)


@pytest.mark.integration
@pytest.mark.parametrize("pair_units", [False, True])
def test_real_orthogonal_mixing_recovers_at_chance(real, pair_units):
    config, public = real
    generator = torch.Generator().manual_seed(30)
    key = draw_key(config, generator, pair_units)
    heads = config.num_layers * config.num_kv_heads
    mixing = torch.stack([haar_orthogonal(config.head_dim, generator) for _ in range(heads)])
    device = device_weights(public, config, key, fold=True, mixing=mixing.view(*key.shape[:2], *mixing.shape[1:]))
    result = recover_permutations(device, public, config, pair_units=pair_units)
    chance = 1 / (config.head_dim // 2 if pair_units else config.head_dim)
    # 5,760 positions: the count right by chance has a standard deviation of ~chance / 10.
    assert abs(fraction_right(result.permutations, key) - chance) < chance / 2
    assert not result.confident and float(result.confidence.max()) < CONFIDENT_MARGIN / 2

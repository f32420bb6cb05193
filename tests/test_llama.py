"""Our forward pass against transformers' LlamaForCausalLM holding the same random weights."""

from __future__ import annotations

import pytest
import torch

from gguf_fixtures import tiny_llama_config, tiny_llama_model
from secureinfer.model import Llama, ModelConfig

VOCAB = tiny_llama_config().vocab_size


def ours_and_reference(**overrides):
    reference = tiny_llama_model(tiny_llama_config(**overrides), seed=3)
    config = ModelConfig.from_hf_config(reference.config.to_dict())
    return Llama.from_state_dict(config, reference.state_dict()), reference


def reference_logits(reference, ids):
    with torch.no_grad():
        return reference(ids).logits


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1, "rope_theta": 1e5}],
    ids=["gqa-tied", "untied", "mha", "mqa"],
)
def test_prefill_logits_match_transformers(overrides):
    ours, reference = ours_and_reference(**overrides)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = ours.forward(ids, ours.new_cache(2, 24), 0, last_only=False)
    torch.testing.assert_close(logits, reference_logits(reference, ids), rtol=0, atol=1e-5)


def test_decode_one_token_at_a_time_matches_full_forward():
    ours, reference = ours_and_reference()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(reference, ids)
    cache = ours.new_cache(1, 30)
    ours.forward(ids[:, :10], cache, 0)
    for pos in range(10, 30):
        step = ours.forward(ids[:, pos : pos + 1], cache, pos)
        torch.testing.assert_close(step[:, 0], expected[:, pos], rtol=0, atol=1e-5)


def test_prefill_in_chunks_after_a_cached_prefix():
    ours, reference = ours_and_reference()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    cache = ours.new_cache(1, 40)
    ours.forward(ids[:, :16], cache, 0)
    chunk = ours.forward(ids[:, 16:], cache, 16, last_only=False)
    torch.testing.assert_close(chunk, reference_logits(reference, ids)[:, 16:], rtol=0, atol=1e-5)


def test_left_padded_batch_equals_each_row_alone():
    ours, reference = ours_and_reference()
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (20, 13, 7)]
    longest = max(len(r) for r in rows)
    pad = torch.tensor([longest - len(r) for r in rows])
    batch = torch.stack([torch.cat([torch.full((int(p),), 2), r]) for p, r in zip(pad, rows)])
    cache = ours.new_cache(3, longest + 5)
    logits = ours.forward(batch, cache, 0, pad=pad, last_only=False)
    next_tokens = logits[:, -1].argmax(-1)
    step = ours.forward(next_tokens[:, None], cache, longest, pad=pad)
    for b, row in enumerate(rows):
        alone = reference_logits(reference, row[None])
        torch.testing.assert_close(logits[b, int(pad[b]) :], alone[0], rtol=0, atol=1e-5)
        extended = reference_logits(reference, torch.cat([row, next_tokens[b : b + 1]])[None])
        torch.testing.assert_close(step[b, 0], extended[0, -1], rtol=0, atol=1e-5)
    assert torch.isfinite(logits).all()


def test_cache_refuses_writes_past_its_length():
    ours, _ = ours_and_reference()
    cache = ours.new_cache(1, 8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        ours.forward(torch.zeros(1, 9, dtype=torch.long), cache, 0)


def test_config_counts_parameters_like_transformers():
    for tie in (True, False):
        _, reference = ours_and_reference(tie_word_embeddings=tie)
        config = ModelConfig.from_hf_config(reference.config.to_dict())
        assert config.num_parameters() == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("torch_threads", [1, 2], indirect=True)
def test_rms_norm_equals_transformers_bit_for_bit(torch_threads):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from secureinfer.model.llama import rms_norm

    generator = torch.Generator().manual_seed(5)
    for width in (64, 576, 2048):
        for rows in (1, 7, 43, 512):
            for scale in (1e-3, 1.0, 30.0):
                x = torch.randn(1, rows, width, generator=generator) * scale
                reference = LlamaRMSNorm(width, eps=1e-5)
                reference.weight.data = torch.randn(width, generator=generator)
                with torch.no_grad():
                    assert torch.equal(rms_norm(x, reference.weight, 1e-5), reference(x)), (width, rows, scale)

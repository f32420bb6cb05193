"""Integration: the bundled SmolLM2-135M-Instruct against transformers' fp32 model from the same GGUF,
and every baseline scheme through the process boundary against our in-process engine."""

from __future__ import annotations

import pytest
import torch

from secureinfer.api import SecureLM
from secureinfer.engine import GenerationConfig
from secureinfer.model import load_checkpoint

pytestmark = pytest.mark.integration

PROMPTS = [
    "The history of the Roman Empire",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "My favourite recipe for a rainy day is",
    "The three laws of motion, as stated by Newton, are",
    "Once upon a time, in a village by the sea,",
]
NEW_TOKENS = 64


def test_weights_are_bit_identical_to_transformers_gguf_loader(real_checkpoint, real_hf_model):
    reference = real_hf_model.state_dict()
    reference.pop("lm_head.weight")  # tied: the same tensor as the embedding
    assert real_checkpoint.weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(real_checkpoint.weights[name], tensor), name


def test_logits_agree_with_transformers_within_1e_3(real_engine, real_hf_model):
    model, tokenizer = real_engine.model, real_engine.tokenizer
    for prompt in PROMPTS[:4] + ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]:
        ids = torch.tensor([tokenizer.encode(prompt)])
        ours = model.forward(ids, model.new_cache(1, ids.shape[1]), 0, last_only=False)
        with torch.no_grad():
            reference = real_hf_model(ids).logits
        assert (ours - reference).abs().max().item() < 1e-3, prompt


@pytest.fixture
def reference_without_eos(real_hf_model):
    """Both sides must run exactly 64 greedy steps: ours ignores EOS, transformers gets none to stop on."""
    eos = real_hf_model.generation_config.eos_token_id
    real_hf_model.generation_config.eos_token_id = None
    yield real_hf_model
    real_hf_model.generation_config.eos_token_id = eos


def test_greedy_64_token_continuations_are_identical_to_transformers(real_engine, reference_without_eos):
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt in PROMPTS:
        ids = real_engine.tokenizer.encode(prompt)
        ours = real_engine.generate(prompt, config).tokens
        with torch.no_grad():
            reference = reference_without_eos.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        assert len(reference) == NEW_TOKENS
        assert ours == reference, prompt


@pytest.mark.parametrize("scheme", ["plain", "enclave"])
def test_schemes_through_the_process_boundary_match_the_in_process_engine(real_checkpoint, real_engine, scheme):
    config = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    with SecureLM(real_checkpoint, scheme, threads=torch.get_num_threads()) as lm:
        for prompt in PROMPTS[:5]:
            assert lm.generate(prompt, **vars(config)).tokens == real_engine.generate(prompt, config).tokens, prompt
        stats = lm.stats()
    assert stats["channel"]["round_trips_by_kind"].get("run", 0) == (5 * 24 if scheme == "plain" else 0)


def test_secureinfer_generates_exactly_what_plain_int8_generates(real_checkpoint):
    tokens = {}
    for scheme in ("plain-int8", "secureinfer"):
        with SecureLM(real_checkpoint, scheme) as lm:
            tokens[scheme] = [lm.generate(p, max_new_tokens=16, ignore_eos=True).tokens for p in PROMPTS[:5]]
    assert tokens["secureinfer"] == tokens["plain-int8"]


def test_chat_answers_the_demo_question(real_checkpoint):
    with SecureLM(real_checkpoint, "plain") as lm:
        result = lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert "Paris" in result.text
    assert result.finish_reason == "eos"


def test_second_load_reads_the_cache(real_checkpoint):
    again = load_checkpoint(progress=False)
    assert again.details["cache_hit"] is True
    assert again.details["sha256"] == real_checkpoint.details["sha256"]

"""KV-Shield (`kvshield`, `kvshield-fold`): a per-(layer, KV head) permutation folded into the device's
weights, checked against transformers and against a plain run of the same session, and its device view."""

from __future__ import annotations

import pytest
import torch

import secureinfer
from scheme_runs import padded_batch, real_greedy_run
from secureinfer.attacks.content import find_in_view
from secureinfer.attacks.view import DeviceView
from secureinfer.crypto.head_permutation import HeadPermutation, random_pair_permutation
from secureinfer.model import load_checkpoint
from secureinfer.model.kernels import flat_weights
from secureinfer.model.llama import LlamaWeights
from secureinfer.plan import build_plan

SCHEMES = ("kvshield", "kvshield-fold")
PROMPTS = ["the cat and the dog", "once upon a time in a land", "is it on"]


@pytest.fixture(scope="module")
def checkpoint(tiny_gguf):
    return load_checkpoint(tiny_gguf, progress=False)


def integer_probes(key: torch.Tensor) -> dict[str, bytes]:
    """The bytes of each head's key as it would lie in memory in any integer width: 8 values after its zero."""
    probes = {}
    for index, row in enumerate(key.flatten(0, 1)):
        after_zero = torch.cat([row, row])[int((row == 0).nonzero()) + 1 :][:8]
        for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            probes[f"head {index} as {dtype}"] = after_zero.to(dtype).numpy().tobytes()
    return probes


def test_a_pair_permutation_moves_rope_pairs_as_ordered_units():
    for _ in range(20):
        key = random_pair_permutation(64)
        assert sorted(key) == list(range(64)) and all(key[j + 32] == key[j] + 32 for j in range(32))
    assert len({tuple(random_pair_permutation(64)) for _ in range(20)}) == 20  # 32! keys: no repeats by chance


@pytest.mark.parametrize("scheme", SCHEMES)
def test_kvshield_logits_match_transformers(checkpoint, tiny_hf_model, scheme):
    """Prefill of a left-padded batch, all positions, against transformers' fp32 forward."""
    batch, pad = padded_batch(checkpoint.tokenizer, PROMPTS)
    attention = (torch.arange(batch.shape[1])[None] >= pad[:, None]).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = tiny_hf_model(batch, attention_mask=attention, position_ids=positions).logits
    with secureinfer.SecureLM(checkpoint, scheme) as lm:
        cache = lm.runtime.new_cache(batch.shape[0], batch.shape[1] + 1)
        ours = lm.runtime.forward(batch, cache, 0, pad, last_only=False)
    real = attention.bool()
    assert (ours[real] - expected[real]).abs().max() < 1e-4


@pytest.mark.parametrize("channel", ["process", "inprocess"])
def test_kvshield_generates_what_plain_generates(checkpoint, channel):
    tokens = {}
    for scheme in ("plain", *SCHEMES):
        with secureinfer.SecureLM(checkpoint, scheme, channel=channel) as lm:
            tokens[scheme] = [lm.generate(p, max_new_tokens=8, ignore_eos=True).tokens for p in PROMPTS]
    assert tokens["kvshield"] == tokens["kvshield-fold"] == tokens["plain"]


def test_round_trips_literal_adds_one_per_layer_fold_adds_none(checkpoint):
    layers = checkpoint.config.num_layers
    trips = {}
    for scheme in ("plain", *SCHEMES):
        with secureinfer.SecureLM(checkpoint, scheme, channel="inprocess") as lm:
            counted = []
            for new in (1, 3):  # the difference is two decode steps
                lm.runtime.reset_stats()
                lm.generate(PROMPTS[0], max_new_tokens=new, ignore_eos=True)
                counted.append(lm.stats()["channel"]["round_trips"])
            trips[scheme] = ((counted[1] - counted[0]) // 2, lm.costs(16).round_trips)
    assert trips["plain"] == (1, 1)
    assert trips["kvshield-fold"] == (1, 1)
    assert trips["kvshield"] == (1 + layers, 1 + layers)


def test_the_device_view_holds_the_permuted_cache_and_weights_and_no_key(tmp_path, checkpoint):
    prompt, new = PROMPTS[1], 5
    views = {}
    for scheme in ("plain", *SCHEMES):
        with secureinfer.SecureLM(checkpoint, scheme, record_view=tmp_path / scheme) as lm:
            lm.generate(prompt, max_new_tokens=new, ignore_eos=True)
            if scheme != "plain":
                key = lm.runtime.head_key.permutations.clone()
        views[scheme] = (DeviceView.load(tmp_path / scheme), None if scheme == "plain" else key)

    public = flat_weights(LlamaWeights.from_state_dict(checkpoint.config, checkpoint.weights))
    plain_k, plain_v = views["plain"][0].kv_cache()
    keys = []
    for scheme in SCHEMES:
        view, key = views[scheme]
        keys.append(key)
        k, v = view.kv_cache()
        index = key[:, None, :, None, :].expand_as(plain_k)
        assert not torch.equal(k, plain_k)
        assert torch.allclose(k, plain_k.gather(-1, index), atol=1e-5)  # the plain cache, each head permuted
        assert torch.allclose(v, plain_v.gather(-1, index), atol=1e-5)
        expected = HeadPermutation(checkpoint.config, key).fold_into(public, fold_output=scheme == "kvshield-fold")
        for layer in range(checkpoint.config.num_layers):
            for name in ("wqkv", "wo"):
                held = view.weight(f"layers.{layer}.{name}")
                assert torch.equal(held, expected[f"layers.{layer}.{name}"])
                assert torch.equal(held, public[f"layers.{layer}.{name}"]) == (name == "wo" and scheme == "kvshield")
        # No integer copy of the key anywhere in the view's bytes (the RoPE frequency table is another matter:
        # see test_key_recovery's reading of it).
        probes = integer_probes(key)
        assert len(probes) == 4 * key.shape[0] * key.shape[1] and not find_in_view(tmp_path / scheme, probes)
    assert not torch.equal(keys[0], keys[1])  # a fresh key per session


def test_a_head_key_needs_its_ops_on_the_device_in_clear(checkpoint):
    import dataclasses

    with pytest.raises(ValueError, match="on the device, in clear"):
        dataclasses.replace(build_plan("secureinfer", checkpoint.config), head_key="fold")
    with pytest.raises(ValueError, match="head_key"):
        dataclasses.replace(build_plan("plain", checkpoint.config), head_key="sideways")


@pytest.mark.integration
def test_kvshield_greedy_tokens_equal_plain_on_the_real_model(real_checkpoint):
    """Five prompts (one a chat), 16 new tokens each; logits of a first step within float tolerance."""
    outputs = {}
    for scheme in ("plain", *SCHEMES):
        with secureinfer.SecureLM(real_checkpoint, scheme) as lm:
            outputs[scheme], outputs[scheme + " logits"] = real_greedy_run(lm, real_checkpoint.tokenizer)
    for scheme in SCHEMES:
        assert outputs[scheme] == outputs["plain"], scheme
        assert (outputs[scheme + " logits"] - outputs["plain logits"]).abs().max() < 1e-3, scheme


# --- the attacks on a kvshield view -----------------------------------------------------------------


def share_right(result, truth: list[int]) -> float:
    guesses = result.tokens[0][-len(truth) :]
    return sum(g == t for g, t in zip(guesses, truth)) / len(truth)


def kvshield_session(checkpoint, scheme, directory, run):
    """Run `run(lm)` under `scheme` recording the view; returns (the view, the session's key, the cached ids)."""
    with secureinfer.SecureLM(checkpoint, scheme, record_view=directory) as lm:
        result = run(lm)
        key = lm.runtime.head_key.permutations.clone()
    return DeviceView.load(directory), key, result


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_tiny_key_falls_to_the_rope_table_and_to_weight_matching(tmp_path, checkpoint, scheme):
    from secureinfer.attacks.key_recovery import held_attention_weights, invert_after_key_recovery, read_rope_key, recover_permutations
    from secureinfer.attacks.kv_inversion import invert_kv_cache
    from secureinfer.model import Llama

    prompt = checkpoint.tokenizer.encode(PROMPTS[1])
    view, key, result = kvshield_session(
        checkpoint, scheme, tmp_path, lambda lm: lm.generate(PROMPTS[1], max_new_tokens=4, ignore_eos=True)
    )
    truth = prompt + result.tokens[:-1]
    public = Llama.from_state_dict(checkpoint.config, checkpoint.weights)
    held = held_attention_weights(view)
    assert torch.equal(read_rope_key(held, checkpoint.config), key)
    matched = recover_permutations(held, flat_weights(public.weights), checkpoint.config, pair_units=True, truth=key)
    assert matched.fraction_recovered == 1.0
    assert share_right(invert_after_key_recovery(view, public), truth) == 1.0
    assert share_right(invert_kv_cache(view, public), truth) < 0.5  # without the key, the model's basis is wrong


@pytest.mark.integration
def test_a_real_kvshield_conversation_falls_to_key_recovery_and_sorted_matching(tmp_path, real_checkpoint):
    """One victim conversation under the paper-literal preset: the permutation hides the cache from plain KV
    inversion, but not from matching the device's weights to the public ones, nor from sorted values."""
    from secureinfer.attacks.key_recovery import held_attention_weights, invert_after_key_recovery, read_rope_key
    from secureinfer.attacks.kv_inversion import invert_hidden_states, invert_kv_cache
    from secureinfer.attacks.victims import load_conversations
    from secureinfer.attacks.vocab_matching import match_vocabulary
    from secureinfer.model import Llama

    victim = load_conversations()[0]
    view, key, result = kvshield_session(
        real_checkpoint, "kvshield", tmp_path, lambda lm: lm.chat(list(victim.messages), max_new_tokens=4)
    )
    truth = real_checkpoint.tokenizer.apply_chat_template(list(victim.messages)) + result.tokens[:-1]
    public = Llama.from_state_dict(real_checkpoint.config, real_checkpoint.weights)
    assert torch.equal(read_rope_key(held_attention_weights(view), real_checkpoint.config), key)
    assert share_right(invert_kv_cache(view, public), truth) < 0.1
    assert share_right(invert_after_key_recovery(view, public), truth) >= 0.95
    assert share_right(match_vocabulary(view, public, features="sorted", max_candidates=256), truth) >= 0.95
    assert share_right(invert_hidden_states(view, public), truth) >= 0.95  # activations travel in clear

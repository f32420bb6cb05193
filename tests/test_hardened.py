"""The hardened preset: Freivalds checks catch a device that tampers with blinded products, the KV cache
past the enclave budget is sealed on the device and opens exactly, and tampering with it is caught."""

from __future__ import annotations

import pytest
import torch

import secureinfer
from fake_clock import FakeClock
from secureinfer import IntegrityError  # exported at the top, as the README shows
from secureinfer.attacks.tamper import MODES, run_tamper_attack, tamper_replies
from secureinfer.channel import base as channel_base
from secureinfer.crypto.field import P
from secureinfer.enclave import runtime as runtime_module
from secureinfer.model.ops import weight_names

PROMPT = "the quick brown fox jumps over"


@pytest.mark.parametrize("enclave_share", [0.0, 0.5])
def test_hardened_equals_plain_int8_with_a_thousand_checks_and_no_false_alarm(tiny_gguf, enclave_share, monkeypatch):
    # The tiny model's context ends at 128 positions: a one-word prompt leaves room for ~125 forwards.
    with secureinfer.load(tiny_gguf, "plain-int8", progress=False) as reference:
        expected = reference.generate("the", max_new_tokens=200, ignore_eos=True).tokens
    with secureinfer.load(tiny_gguf, "hardened", progress=False, enclave_share=enclave_share) as lm:
        clock = FakeClock()  # one tick per piece of the enclave's overlappable work
        for module in (runtime_module, channel_base):
            monkeypatch.setattr(module, "time", clock)
        for name in ("signed_matmul", "verify_products"):  # the enclave's columns, a batch of checks
            monkeypatch.setattr(runtime_module, name, clock.ticking(getattr(runtime_module, name)))
        monkeypatch.setattr(lm.runtime.pads, "take", clock.ticking(lm.runtime.pads.take))
        lm.runtime.reset_stats()
        got = lm.generate("the", max_new_tokens=200, ignore_eos=True)
        stats = lm.stats()
    assert got.tokens == expected
    blinded_per_forward = len(lm.plan.device_segments)
    assert stats["integrity"]["repetitions"] == 2
    assert stats["integrity"]["checked"] == len(got.tokens) * blinded_per_forward >= 1000
    # While the device computed a product the enclave did its own columns and took the next product's pads, both
    # timed in their own figures, and ran a batch of checks; forward checks the rest, outside the overlap.
    named = stats["time"]["enclave_own_columns_s"] + stats["time"]["enclave_pads_ahead_s"]
    assert named < stats["channel"]["overlapped_s"] <= named + stats["integrity"]["seconds"]
    assert (stats["time"]["enclave_own_columns_s"] > 0) == (enclave_share > 0)
    assert stats["time"]["enclave_pads_ahead_s"] > 0
    assert stats["perturbation"] > 0  # on by default under hardened


@pytest.mark.parametrize("mode", MODES)
def test_a_tampering_device_raises_integrity_error_and_emits_no_wrong_token(tiny_gguf, mode):
    with secureinfer.load(tiny_gguf, "hardened", progress=False, channel="inprocess") as lm:
        result = run_tamper_attack(lm, mode, trials=250, prompt=PROMPT, honest_runs=20, seed=len(mode))
    # x 4 modes: 1,000 tampered runs end to end, each stopped before a wrong token
    assert result.detected == result.trials == 250 and result.wrong_tokens_before_detection == 0
    assert result.false_alarms == 0 and result.honest_runs == 20


@pytest.mark.parametrize("mode", MODES)
def test_without_checks_secureinfer_passes_tampered_products_on_to_the_user(tiny_gguf, mode):
    """The control: the same attack on secureinfer goes unnoticed and changes what the user reads."""
    with secureinfer.load(tiny_gguf, "secureinfer", progress=False, channel="inprocess") as lm:
        result = run_tamper_attack(lm, mode, trials=20, prompt=PROMPT, honest_runs=2, seed=len(mode))
    assert result.detected == 0 and result.wrong_output > 0


def _sealing_lm(tiny_gguf, **options):
    # A budget a little over what the tiny model's weights and pads need: the KV cache must spill.
    probe = secureinfer.load(tiny_gguf, "hardened", progress=False, channel="inprocess", pad_background=False)
    probe.runtime.pads.prefill(32)
    base = probe.runtime.memory.current_bytes
    probe.close()
    per_position = 2 * probe.config.num_layers * probe.config.kv_size * 4
    return secureinfer.load(
        tiny_gguf, "hardened", progress=False, epc_bytes=base + 70 * per_position, pad_background=False, **options
    )


def test_the_kv_cache_past_the_budget_is_sealed_on_the_device_and_opens_exactly(tiny_gguf, tmp_path):
    with secureinfer.load(tiny_gguf, "plain-int8", progress=False) as reference:
        expected = reference.generate(PROMPT, max_new_tokens=150, ignore_eos=True).tokens
    with _sealing_lm(tiny_gguf, record_view=tmp_path / "view") as lm:
        lm.runtime.pads.prefill(32)
        got = lm.generate(PROMPT, max_new_tokens=150, ignore_eos=True).tokens
        report = lm.stats()["sealed_kv"]
        kinds = lm.stats()["channel"]["round_trips_by_kind"]
        again = lm.generate(PROMPT, max_new_tokens=150, ignore_eos=True).tokens  # a fresh cache and key
        after = lm.stats()["sealed_kv"]
    assert got == again == expected
    # The report counts every conversation's blocks, not only the live cache's.
    assert after["blocks_sealed"] == 2 * report["blocks_sealed"] and after["blocks_opened"] == 2 * report["blocks_opened"]
    assert report["resident_positions"] == 64 and report["blocks_sealed"] >= 2 * 2  # k and v, both layers
    assert report["blocks_opened"] > report["blocks_sealed"]  # every later step reads them back
    assert kinds["put_sealed"] >= 2 and kinds["get_sealed"] > 0
    assert kinds["get_sealed"] <= lm.config.num_layers * len(got)  # keys and values of a layer in one trip
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "view" / "state.safetensors"))
    sealed = {k: v for k, v in state.items() if k.startswith("sealed.")}
    assert sealed and all(v.dtype == torch.uint8 for v in sealed.values())


@pytest.mark.parametrize("attack", ["flip", "drop", "move"])
def test_tampering_with_sealed_kv_is_caught(tiny_gguf, attack):
    seen: dict[str, torch.Tensor] = {}
    with _sealing_lm(tiny_gguf, channel="inprocess") as lm:

        def alter(kind, meta, reply):
            if kind != "get_sealed" or not reply:
                return reply
            reply = dict(reply)
            keys = sorted(reply)
            if attack == "flip":
                ct = next(k for k in keys if k.endswith(".ct"))
                reply[ct] = reply[ct].clone()
                reply[ct][len(reply[ct]) // 2] ^= 1
            elif attack == "drop":
                del reply[keys[-1]]
            else:  # answer for layer 1 with layer 0's block of the same kind and position (nonce too)
                for key in keys:
                    layer0 = key.replace("kv.1.", "kv.0.")
                    if key.startswith("kv.1.") and layer0 in seen:
                        reply[key] = seen[layer0]
                seen.update(reply)
            return reply

        tamper_replies(lm, alter)
        with pytest.raises(IntegrityError):
            lm.generate(PROMPT, max_new_tokens=150, ignore_eos=True)


def test_a_scheme_with_no_blinded_product_has_nothing_to_tamper_with(tiny_gguf):
    with secureinfer.load(tiny_gguf, "plain", progress=False, channel="inprocess") as lm:
        with pytest.raises(ValueError, match="nothing to tamper with"):
            run_tamper_attack(lm, "corrupt", trials=1, prompt=PROMPT)


@pytest.mark.parametrize("target", [("qkv_proj", 0), ("down_proj", 1), ("lm_head", None)])
def test_a_wrong_product_in_a_checked_batch_is_named(tiny_gguf, target):
    """Products are checked a layer at a time; a failed batch still names the weight and step of the wrong one."""
    (name,) = weight_names(*target)
    with secureinfer.load(tiny_gguf, "hardened", progress=False, channel="inprocess") as lm:
        lm.generate(PROMPT, max_new_tokens=2, ignore_eos=True)
        steps = lm.runtime.step

        def alter(kind, meta, reply):
            if kind == "run" and [tuple(op) for op in meta.get("ops", [])] == [target] and meta["step"] == steps + 2:
                reply = dict(reply)
                reply["y"] = (reply["y"] + 1) % P
            return reply

        tamper_replies(lm, alter)
        with pytest.raises(IntegrityError, match=rf"wrong product for {name.replace('.', '[.]')} \(step {steps + 2}\)"):
            lm.generate(PROMPT, max_new_tokens=4, ignore_eos=True)

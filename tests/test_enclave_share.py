"""The enclave's share of a blinded product: it multiplies some output columns itself, in the clear, while the
device multiplies the rest on the padded input. Exact against Python integers, visible in the device's view
and traffic exactly as the plan's costs say, and no easier to tamper with."""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch

import secureinfer
from secureinfer.attacks.tamper import MODES, run_tamper_attack
from secureinfer.attacks.view import DeviceView
from secureinfer.crypto.field import BACKENDS, BYTE_LIMBS_FROM, CHUNK, HORNER_FROM, PACKED_MAX_INNER_DIM, product_weight, signed_matmul
from secureinfer.crypto.quant import ACTIVATION_QMAX
from secureinfer.errors import InvalidRequestError
from secureinfer.model import load_checkpoint
from secureinfer.plan import build_plan
from secureinfer.plan.costs import plan_costs

PROMPT = "once upon a time"


# one slice; three, the last ragged; the widest weight that is packed, once tiled past PACK_FROM_BYTES
@pytest.mark.parametrize("inner", [CHUNK, 2 * CHUNK + 3, PACKED_MAX_INNER_DIM])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_clear_product_is_exact_at_the_extremes(backend, inner, int8_route):
    rng = random.Random(2)
    # +-65535 fill every limb (the top one at its most negative, -4 for 7-bit limbs); 2^14 - 1 only the low two
    rows = [[ACTIVATION_QMAX] * inner, [-ACTIVATION_QMAX] * inner, [2**14 - 1] * inner, [-(2**14)] * inner,
            [rng.randint(-ACTIVATION_QMAX, ACTIVATION_QMAX) for _ in range(inner)]]  # fmt: skip
    weight = torch.tensor([[rng.choice((-127, 127, rng.randrange(-127, 128))) for _ in range(3)] + [-127] for _ in range(inner)], dtype=torch.int8)
    expected = [[sum(x * int(weight[k, j]) for k, x in enumerate(row)) for j in range(4)] for row in rows]
    got = signed_matmul(torch.tensor(rows), product_weight(weight, backend), backend)
    assert got.dtype == torch.float64 and got.tolist() == expected
    tiled = weight.repeat(1, HORNER_FROM // len(rows) // 4 + 1)  # past HORNER_FROM outputs: the in-place recombination
    got = signed_matmul(torch.tensor(rows), product_weight(tiled, backend), backend)
    assert got.numel() > HORNER_FROM and (got.view(len(rows), -1, 4) == torch.tensor(expected, dtype=torch.float64)[:, None]).all()
    many = torch.tensor(rows).repeat(4, 1)  # a prefill's many rows: int8 limbs cut from bytes, high limbs joined in int32
    assert many[:, :CHUNK].numel() >= BYTE_LIMBS_FROM
    assert signed_matmul(many, product_weight(weight, backend), backend).tolist() == expected * 4


def test_the_device_holds_and_returns_only_its_columns(tiny_gguf, tmp_path):
    with secureinfer.load(tiny_gguf, "secureinfer", progress=False, enclave_share=0.5, record_view=tmp_path) as lm:
        lm.runtime.reset_stats()
        result = lm.generate(PROMPT, max_new_tokens=4, ignore_eos=True)
        stats, config, plan = lm.stats(), lm.config, lm.plan
    view = DeviceView.load(tmp_path)
    full = plan_costs(plan.with_enclave_share(0.0), context=1)
    half = plan_costs(plan, context=1)
    qkv_out = config.q_size + 2 * config.kv_size
    assert view.weight("layers.0.wqkv.q").shape == (config.hidden_size, qkv_out - qkv_out // 2)
    assert view.weight("layers.0.w_down.q").shape == (config.intermediate_size, config.hidden_size - config.hidden_size // 2)
    widths = {view.message_tensor(m.tensors["y"]).shape[-1] for m in view.messages if m.direction == "out" and "y" in m.tensors}
    outputs = {"wqkv": qkv_out, "wo": config.hidden_size, "w_gate_up": 2 * config.intermediate_size,
               "w_down": config.hidden_size, "lm_head": config.vocab_size}  # fmt: skip
    assert widths == {columns - columns // 2 for columns in outputs.values()}
    # what the channel measured is what the plan says, and it is about half of what an all-device plan moves back
    prefill = plan_costs(plan, context=result.prompt_tokens, tokens=result.prompt_tokens)
    decode_steps = len(result.tokens) - 1
    measured = stats["channel"]["payload_bytes_received"]
    assert measured == prefill.bytes_from_device + sum(
        plan_costs(plan, context=result.prompt_tokens + i).bytes_from_device for i in range(decode_steps)
    )
    assert half.bytes_to_device == full.bytes_to_device and 0.45 < half.bytes_from_device / full.bytes_from_device < 0.55
    # the enclave does the device's other half: the FLOPs move across, none appear or vanish
    assert half.enclave_flops + half.device_flops == full.enclave_flops + full.device_flops
    assert half.device_flops < 0.55 * full.device_flops
    assert half.device_weight_bytes < full.device_weight_bytes and stats["time"]["enclave_own_columns_s"] > 0


def test_packed_own_columns_take_the_int8_route_they_are_packed_for_whatever_the_fastest(tiny_gguf, monkeypatch, torch_threads):
    """A share the caller names on a CPU whose fastest route is float64: the own columns are still laid out (here,
    packed) for the int8 route, and multiplied on it; on the float64 route a packed weight has no float copy."""
    from secureinfer.crypto import field

    monkeypatch.setattr(field, "_fastest_backend_on", functools.cache(lambda device_type: "float64"))
    monkeypatch.setattr(field, "PACK_FROM_BYTES", 1)  # every own weight packed, as the real LM head's are
    with secureinfer.load(tiny_gguf, "plain-int8", progress=False, channel="inprocess") as reference:
        expected = reference.generate(PROMPT, max_new_tokens=6, ignore_eos=True).tokens
    with secureinfer.load(tiny_gguf, "secureinfer", progress=False, channel="inprocess", enclave_share=0.5) as lm:
        assert all(isinstance(own, field.PackedInt8Weight) for own in lm.runtime._own_weights.values())
        assert lm.generate(PROMPT, max_new_tokens=6, ignore_eos=True).tokens == expected


def test_tampering_with_the_device_columns_is_still_caught(tiny_gguf):
    with secureinfer.load(tiny_gguf, "hardened", progress=False, channel="inprocess", enclave_share=0.5) as lm:
        for mode in MODES:
            result = run_tamper_attack(lm, mode, trials=30, prompt=PROMPT, honest_runs=5, seed=7)
            assert result.detected == result.trials == 30 and result.wrong_tokens_before_detection == 0, mode
            assert result.false_alarms == 0, mode


@pytest.mark.parametrize("share", [1.0, -0.1, 2, "half", True])
def test_an_invalid_share_is_refused_with_a_fix(tiny_gguf, share):
    with pytest.raises(InvalidRequestError) as error:
        secureinfer.load(tiny_gguf, "secureinfer", progress=False, enclave_share=share)
    assert "enclave_share" in error.value.problem and "0" in error.value.fix


def test_schemes_without_blinded_products_keep_every_column_on_the_device(tiny_gguf):
    with secureinfer.load(tiny_gguf, "plain", progress=False) as lm:
        assert lm.plan.enclave_share == 0.0 and not lm.plan.blinded_weights
    plan = build_plan("secureinfer", lm.config).with_enclave_share(0.99)
    assert all(plan.device_columns(columns) >= 1 for columns in (1, 2, 3, 128))  # never no device column



CALLERS_THREADS = (os.cpu_count() or 2) + 1  # more than SecureLM ever gives one side


@pytest.fixture
def float64_at_the_callers_threads(monkeypatch):
    """The route timing as this machine measures it: int8 at one thread, float64 at two (here, at the caller's
    CALLERS_THREADS, set for the test). Yields the threads of each timing; restores the threads after."""
    from secureinfer.crypto import field

    timed_at = []

    def route(device_type: str) -> str:
        timed_at.append(torch.get_num_threads())
        return "float64" if torch.get_num_threads() == CALLERS_THREADS else "int8"

    monkeypatch.setattr(field, "_fastest_backend_on", functools.cache(route))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(CALLERS_THREADS)
    yield timed_at
    torch.set_num_threads(threads_before)


def test_the_default_share_times_the_routes_at_the_enclaves_threads(tiny_gguf, float64_at_the_callers_threads):
    """A caller at more threads than the enclave keeps still gets the route the enclave runs fastest: timed at two
    threads (torch's default here), float64 beat the int8 route, whose fast loop serves one thread, and every
    caller of SecureLM ran at share 0 on the float64 route, where the enclave runs one thread."""
    with secureinfer.load(tiny_gguf, "secureinfer", progress=False) as lm:
        assert lm.threads < CALLERS_THREADS and float64_at_the_callers_threads == [lm.threads]
        assert lm.plan.enclave_share == 0.5


def test_schemes_with_no_product_of_the_enclaves_leave_the_route_to_the_first_blinded_one(tiny_gguf, float64_at_the_callers_threads):
    """The route is timed once per process, at the first asker's threads. `plain`, `enclave` and `plain-int8` have no
    product of the enclave's to route, so they must not ask: the bench makes them first, at two threads, and every
    blinded scheme after them ran at share 0 on the route two threads prefer (a run at 7def244)."""
    for scheme in ("plain", "enclave", "plain-int8"):
        with secureinfer.load(tiny_gguf, scheme, progress=False) as lm:
            assert lm.threads is None  # one crossing a token: torch's threads stay the caller's
    with secureinfer.load(tiny_gguf, "secureinfer", progress=False) as lm:
        assert float64_at_the_callers_threads == [lm.threads] and lm.plan.enclave_share == 0.5


def test_the_bench_breakdown_puts_the_enclave_share_on_the_enclave(tiny_gguf):
    from secureinfer.bench.analytic import PAD_CLASS, breakdown, pad_flops

    config = load_checkpoint(tiny_gguf, progress=False).config
    for share in (0.0, 0.5):
        plan = build_plan("secureinfer", config).with_enclave_share(share)
        by_class, costs = breakdown(plan, context=16), plan_costs(plan, context=16)
        assert sum(v for k, v in by_class["enclave"].items() if k != PAD_CLASS) == costs.enclave_flops
        assert sum(by_class["device"].values()) == costs.device_flops
        assert by_class["enclave"][PAD_CLASS] == pad_flops(plan) == costs.device_flops  # a pad per device column

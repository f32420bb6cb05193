"""The partition planner: leakage per asset, modelled cost, the EPC budget, and the choice between them."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from gguf_fixtures import tiny_llama_config
from secureinfer import SecureInferError
from secureinfer.channel import open_channel
from secureinfer.enclave import EnclaveRuntime
from secureinfer.enclave.memory import CYCLES_PER_PAGE, PAGE_BYTES
from secureinfer.model import ModelConfig, load_checkpoint
from secureinfer.model.llama import LlamaWeights
from secureinfer.plan import DEVICE, ENCLAVE, PRESETS, build_plan
from secureinfer.plan.planner import (
    MEASURED_LEAKAGE,
    CostModel,
    Layout,
    NoPlacementFits,
    TokenCosts,
    default_adapter_ranks,
    layout_of,
    misplaced_blinding,
    plan_from_name,
    plan_leakage,
    plan_partition,
    planner_table,
)

TINY = ModelConfig.from_hf_config(tiny_llama_config().to_dict())
# Big enough layers that compute, not round trips, decides where a product runs; 3 layers so the
# planner extrapolates from 1- and 2-layer copies. No weights are ever made: plans are data.
WIDE = ModelConfig.from_hf_config(
    tiny_llama_config(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=4, head_dim=64
    ).to_dict()
)
MIB = 1 << 20
BOTH = {"adapters", "conversation"}
RANK = 8
# A device 100x faster at compute than the enclave: the setting the papers target (TEE + GPU).
GPU = CostModel().with_device_speedup(100)


def lora_bits(config: ModelConfig, rows: int, cols: int, rank: int = RANK) -> int:
    return config.num_layers * rank * (rows + cols) * 32


@functools.lru_cache(maxsize=None)
def planned(config: ModelConfig, epc: int | None, protect: frozenset, model: CostModel = CostModel()):
    return plan_partition(config, epc, protect, cost_model=model)


def test_leakage_of_the_presets_with_both_assets_protected():
    ranks = default_adapter_ranks(TINY, RANK)
    d, f, q, kv = TINY.hidden_size, TINY.intermediate_size, TINY.q_size, TINY.kv_size
    # lora_a [rank, in] + lora_b [out, rank] per layer projection: wqkv, wo, w_gate_up, w_down
    all_adapter_bits = sum(lora_bits(TINY, out, inp) for out, inp in [(q + 2 * kv, d), (d, q), (2 * f, d), (d, f)])
    for name in ("secureinfer", "hardened", "enclave", "secureinfer-enclave-qkv-ffn"):
        leak = plan_leakage(build_plan(name, TINY).with_adapters(ranks))
        assert leak["conversation"].bits == 0 and leak["adapters"].bits == 0, name
    for name in ("plain", "plain-int8"):
        leak = plan_leakage(build_plan(name, TINY).with_adapters(ranks))
        assert leak["conversation"].bits == pytest.approx(math.log2(TINY.vocab_size))  # one token's entropy
        assert leak["adapters"].bits == all_adapter_bits  # every adapter sits on the device, all of it
        assert any("held by the device" in s for s in leak["adapters"].sources)


def test_an_adapter_on_the_device_leaks_all_its_bits_and_only_those():
    # Only the FFN up-projection runs on the device, in clear: its adapters are the ones exposed.
    layout = Layout("E", "E", ("E", "E", "D", "E", "E"))
    leak = plan_leakage(layout.plan(TINY, default_adapter_ranks(TINY, RANK)))
    d, f = TINY.hidden_size, TINY.intermediate_size
    assert leak["adapters"].bits == lora_bits(TINY, 2 * f, d)  # lora_a [8, 64] + lora_b [256, 8], float32
    assert leak["conversation"].bits > 0  # h and gu reach the device in clear


def test_an_enclave_adapter_leaks_when_the_device_sees_its_input_and_output():
    # Projections in the enclave, but the norms and SwiGLU on the device: the device holds each
    # projection's input and output in clear and can regress W + BA, though it holds no adapter.
    layout = Layout("D", "D", ("E",) * 5)
    plan = layout.plan(TINY, default_adapter_ranks(TINY, RANK))
    assert not [n for n in plan.stored_weights(DEVICE) if "lora" in n]
    leak = plan_leakage(plan)
    everything = plan_leakage(build_plan("plain", TINY).with_adapters(default_adapter_ranks(TINY, RANK)))
    assert leak["adapters"].bits == everything["adapters"].bits
    assert any("regress" in s for s in leak["adapters"].sources)
    # Blinded products hide both sides: nothing to regress.
    assert plan_leakage(Layout("E", "E", ("DB",) * 5).plan(TINY, default_adapter_ranks(TINY, RANK)))["adapters"].bits == 0


def test_no_adapter_means_nothing_to_leak_and_the_measured_hook_is_empty():
    assert plan_leakage(build_plan("plain", TINY))["adapters"].bits == 0
    assert MEASURED_LEAKAGE == {}


def test_a_blinded_product_next_to_device_ops_is_not_a_placement():
    with pytest.raises(ValueError, match="only the device holds"):
        Layout("D", "D", ("DB",) * 5).plan(TINY)
    assert misplaced_blinding(Layout("E", "D", ("DB", "E", "E", "E", "E")).plan(TINY))  # v goes to device attention
    assert not misplaced_blinding(Layout("E", "E", ("DB",) * 5).plan(TINY))
    result = planned(TINY, None, frozenset())
    assert result.counts["misplaced_blinding"] > 0
    assert not any(misplaced_blinding(c.plan) for c in result.candidates[:50])


def test_round_trips_and_bytes_match_a_hand_count():
    # o and down blinded, everything else in the enclave: two trips per layer, field elements both ways.
    layout = Layout("E", "E", ("E8", "DB", "E8", "DB", "E"))
    costs = TokenCosts.of(layout.plan(WIDE), 64).costs
    d, f, q = WIDE.hidden_size, WIDE.intermediate_size, WIDE.q_size
    assert costs.round_trips == 2 * WIDE.num_layers
    assert costs.bytes_to_device == WIDE.num_layers * 8 * (q + f)
    assert costs.bytes_from_device == WIDE.num_layers * 8 * (d + d)
    # Everything on the device but the LM head: one trip, the token id out, the last h back.
    costs = TokenCosts.of(Layout("D", "D", ("D",) * 4 + ("E",)).plan(WIDE), 64).costs
    assert (costs.round_trips, costs.bytes_to_device, costs.bytes_from_device) == (1, 8, 4 * d)


def test_modelled_time_adds_up_by_hand_including_paging():
    model = CostModel()
    plan = build_plan("plain", WIDE)
    costs = TokenCosts.of(plan, 100)
    c = costs.costs
    assert c.enclave_flops == WIDE.vocab_size  # sampling, the enclave's only work
    by_hand = (
        c.device_flops / model.device_flops_per_s
        + WIDE.vocab_size / model.enclave_flops_per_s
        + model.round_trip_s
        + (c.bytes_to_device + c.bytes_from_device) / model.bandwidth_bytes_per_s
    )
    assert model.modelled_seconds(costs, None) == pytest.approx(by_hand, rel=1e-12)
    enclave = TokenCosts.of(build_plan("enclave", WIDE), 100)
    resident = enclave.costs.enclave_resident_bytes
    epc = resident - 10 * PAGE_BYTES - 1  # 11 pages over
    assert model.breakdown(enclave, epc)["paging"] == pytest.approx(11 * CYCLES_PER_PAGE / model.clock_hz)
    assert model.breakdown(enclave, resident)["paging"] == 0


def test_the_enclaves_share_of_a_blinded_product_overlaps_the_devices_part_in_modelled_time():
    published = TokenCosts.of(build_plan("secureinfer", WIDE), 100)
    split = TokenCosts.of(build_plan("secureinfer", WIDE).with_enclave_share(0.5), 100)
    assert published.enclave_own_column_flops == 0
    # The columns move between the sides; the enclave's half makes no pads and crosses no boundary.
    assert split.enclave_own_column_flops + split.pad_flops == published.pad_flops
    assert 0.45 < split.enclave_own_column_flops / published.pad_flops < 0.55
    assert split.costs.bytes_from_device < published.costs.bytes_from_device
    cpu = CostModel()
    own = split.enclave_own_column_flops / cpu.enclave_int8_flops_per_s
    window = split.pad_flops / cpu.device_int8_flops_per_s + split.blinded_products * cpu.round_trip_s
    assert own <= window and cpu.breakdown(split, None)["enclave_own_columns"] == 0  # hidden behind the device
    # The enclave's other work is the same at any share: its columns are counted once, in their own entry.
    assert cpu.breakdown(split, None)["enclave_compute"] == pytest.approx(cpu.breakdown(published, None)["enclave_compute"])
    assert cpu.modelled_seconds(split, None) < cpu.modelled_seconds(published, None)
    # Beside a device 100x faster, the enclave's columns outlast the device's part and cost more than they save.
    exposed = own - (split.pad_flops / GPU.device_int8_flops_per_s + split.blinded_products * GPU.round_trip_s)
    assert GPU.breakdown(split, None)["enclave_own_columns"] == pytest.approx(exposed, rel=1e-12) and exposed > 0
    assert GPU.modelled_seconds(split, None) > GPU.modelled_seconds(published, None)


def test_the_planner_costs_every_blinded_placement_and_preset_at_the_share_given():
    result = plan_partition(WIDE, None, BOTH, enclave_share=0.5)
    ranks = default_adapter_ranks(WIDE, RANK)
    presets = {p.name: p for p in result.presets}
    expected = TokenCosts.of(build_plan("secureinfer", WIDE).with_adapters(ranks).with_enclave_share(0.5), result.context)
    assert presets["secureinfer"].costs == expected and presets["secureinfer"].plan.enclave_share == 0.5
    chosen = result.chosen
    assert "DB" in chosen.layout.projections and chosen.costs.enclave_own_column_flops > 0
    assert chosen.costs == TokenCosts.of(chosen.plan.with_adapters(ranks), result.context)
    assert "the enclave multiplies 50% of its columns itself" in planner_table(result)
    assert presets["secureinfer"].seconds < planned(WIDE, None, frozenset(BOTH)).presets[list(PRESETS).index("secureinfer")].seconds


def test_a_large_epc_protecting_the_conversation_beats_the_presets_without_leaking():
    for config, model in ((TINY, CostModel()), (WIDE, CostModel()), (WIDE, GPU)):
        result = planned(config, 1 << 40, frozenset({"conversation"}), model)
        chosen = result.chosen
        assert chosen.fits and chosen.leakage["conversation"].bits == 0
        presets = {p.name: p for p in result.presets}
        assert chosen.seconds <= presets["secureinfer"].seconds
        assert chosen.seconds <= presets["enclave"].seconds
        assert chosen is result.candidates[0]  # everything fits: the fastest zero-leakage one


def test_a_small_epc_that_holds_no_enclave_only_plan_gets_a_blinded_one():
    result = planned(WIDE, 64 * MIB, frozenset(BOTH), GPU)
    presets = {p.name: p for p in result.presets}
    assert not presets["enclave"].fits
    chosen = result.chosen
    assert chosen.fits and chosen.resident_bytes <= 64 * MIB
    assert "DB" in chosen.layout.projections
    assert all(chosen.leakage[a].bits == 0 for a in BOTH)
    # No faster zero-leakage placement fits.
    assert all(c.seconds >= chosen.seconds for c in result.candidates if c.fits)
    # The chosen placement is a runnable plan with its blinded products on the device.
    assert any(p.transform == "blinded" and p.side == DEVICE for p in chosen.plan.placements)


def test_with_nothing_protected_the_fastest_plain_like_placement_wins():
    result = planned(WIDE, None, frozenset(), GPU)
    assert result.counts["leaking"] == 0
    assert result.chosen.layout.misc == "D" and result.chosen.layout.attention == "D"
    assert all(code.startswith("D") for code in result.chosen.layout.projections)
    plain = {p.name: p for p in result.presets}["plain"]
    assert result.chosen.seconds <= plain.seconds and result.chosen.leakage["conversation"].bits > 0
    # With the CPU figures and an EPC too small for any weight, only all-device placements fit.
    result = planned(WIDE, 1, frozenset())
    assert result.chosen.resident_bytes == 0 and result.chosen.plan.stored_weights(ENCLAVE) == []


def test_an_impossible_budget_is_a_clear_error_with_the_table_attached():
    with pytest.raises(NoPlacementFits) as caught:
        plan_partition(WIDE, 1 * MIB, BOTH)
    err = caught.value
    assert isinstance(err, SecureInferError)
    assert "fits an enclave budget of 1.0 MiB" in err.problem and "raise --epc" in err.fix
    smallest = min(c.resident_bytes for c in err.result.candidates)
    assert f"at least {math.ceil(smallest / MIB)}MiB" in err.fix
    assert err.result.chosen is None and "nothing fits" in planner_table(err.result)
    with pytest.raises(SecureInferError, match="cannot protect"):
        plan_partition(TINY, None, {"weights"})


def test_extrapolated_costs_and_leakage_equal_the_full_plans():
    result = planned(WIDE, None, frozenset())
    ranks = default_adapter_ranks(WIDE, RANK)
    estimated = [c for c in result.candidates if not c.exact]
    assert len(estimated) > 1000
    for candidate in estimated[::97]:
        plan = candidate.layout.plan(WIDE, ranks)
        assert candidate.costs == TokenCosts.of(plan, result.context), candidate.name
        assert {a: v.bits for a, v in candidate.leakage.items()} == {a: v.bits for a, v in plan_leakage(plan).items()}


def test_ties_are_broken_the_same_way_every_time():
    first = plan_partition(TINY, None, BOTH)
    again = plan_partition(TINY, None, BOTH)
    assert [c.name for c in first.candidates] == [c.name for c in again.candidates]
    keys = [c.sort_key for c in first.candidates]
    assert keys == sorted(keys) and len({c.name for c in first.candidates}) == len(keys)


def test_presets_are_scored_on_the_same_table_and_the_output_serialises():
    result = planned(TINY, 1 * MIB, frozenset(BOTH))
    assert [p.name for p in result.presets] == list(PRESETS)
    assert layout_of(build_plan("secureinfer", TINY)) == Layout("E", "E", ("DB",) * 5)
    table = planner_table(result)
    assert "**chosen**" in table and "`secureinfer`" in table and "`hardened`" in table
    assert result.chosen.name in table
    data = result.to_json()
    loaded = json.loads(json.dumps(data, allow_nan=False))
    assert loaded == data
    assert loaded["chosen"]["name"] == result.chosen.name
    assert {row["name"] for row in loaded["rows"] if row["kind"] == "preset"} == set(PRESETS)
    assert len(loaded["candidates"]) == result.counts["costed"]


def test_the_chosen_placement_runs_and_matches_the_same_arithmetic_in_the_enclave(tiny_gguf):
    checkpoint = load_checkpoint(tiny_gguf, progress=False)
    # A fast device and free trips make a mixed placement: some products blinded, some int8 in the enclave.
    model = CostModel(round_trip_s=0.0, blinded_overhead_s=0.0, bandwidth_bytes_per_s=1e15).with_device_speedup(100)
    chosen = plan_partition(checkpoint.config, None, BOTH, cost_model=model).chosen
    assert "DB" in chosen.layout.projections
    # The same precision per projection, all in the enclave: blinded == int8, so logits must agree exactly.
    reference = Layout("E", "E", tuple("E8" if c in ("E8", "DB", "D8") else "E" for c in chosen.layout.projections))
    weights = LlamaWeights.from_state_dict(checkpoint.config, checkpoint.weights)
    tokens = torch.tensor([checkpoint.tokenizer.encode("the cat and the dog")])
    logits = []
    for plan in (plan_from_name(chosen.name, checkpoint.config), reference.plan(checkpoint.config)):
        device = functools.partial(open_channel, "inprocess")
        runtime = EnclaveRuntime(checkpoint.config, weights, plan, device, harden=False, pad_background=False)
        try:
            cache = runtime.new_cache(1, tokens.shape[1] + 1)
            logits.append(runtime.forward(tokens, cache, 0, last_only=False))
        finally:
            runtime.close()
    assert torch.equal(logits[0], logits[1])


def test_calibration_measures_positive_rates():
    model = CostModel.calibrate(hidden=128, intermediate=256, layers=2)
    assert model.enclave_flops_per_s > 0 and model.pad_flops_per_s > 0 and model.blinded_overhead_s > 0
    assert "calibrated" in model.source

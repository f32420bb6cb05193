"""Plans as data: presets, the transfer schedule between segments, and the analytic costs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gguf_fixtures import tiny_llama_config, tiny_llama_model
from secureinfer import InvalidRequestError
from secureinfer.model import ModelConfig
from secureinfer.plan import DEVICE, ENCLAVE, PRESETS, Placement, Plan, build_plan, op_sequence
from secureinfer.plan.costs import plan_costs
from secureinfer.plan.plan import uniform_plan

CONFIG = ModelConfig.from_hf_config(tiny_llama_config().to_dict())
LINEAR_OPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def test_presets_place_every_op_once_in_order():
    assert {"plain", "enclave", "plain-int8", "secureinfer"} <= set(PRESETS)
    for name in PRESETS:
        plan = build_plan(name, CONFIG)
        assert [(p.op, p.layer) for p in plan.placements] == op_sequence(CONFIG)
        assert plan.placements[-1] == Placement("sample", None, ENCLAVE)


def test_plain_is_one_round_trip_tokens_in_logits_out():
    (segment,) = build_plan("plain", CONFIG).segments
    assert (segment.side, segment.sends, segment.returns) == (DEVICE, ["tokens"], ["logits"])


def test_enclave_never_talks_to_the_device():
    plan = build_plan("enclave", CONFIG)
    assert plan.device_segments == [] and plan.stored_weights(DEVICE) == []


def test_outsourcing_the_linear_ops_costs_four_trips_per_layer_plus_the_head():
    plan = uniform_plan("linear-on-device", CONFIG, lambda op: (DEVICE if op in LINEAR_OPS else ENCLAVE, "clear"))
    trips = [(s.ops, s.sends, s.returns) for s in plan.device_segments]
    per_layer = [
        ([("qkv_proj", 0)], ["h"], ["q", "k", "v"]),
        ([("o_proj", 0)], ["a"], ["o"]),
        ([("gate_up_proj", 0)], ["h"], ["gu"]),
        ([("down_proj", 0)], ["m"], ["dn"]),
    ]
    assert len(trips) == 4 * CONFIG.num_layers + 1
    assert trips[:4] == per_layer
    assert trips[-1] == ([("lm_head", None)], ["h"], ["logits"])
    assert plan.device_segments[-1].last_position == {"h", "logits"}


def test_a_value_left_on_the_device_is_not_sent_again():
    # Residual adds on the device, norms in the enclave: x must come back for each norm, but the
    # device's copy stays current, so x is never sent to the device after the embedding.
    plan = uniform_plan(
        "norms-in-enclave", CONFIG, lambda op: (ENCLAVE if op in ("attn_norm", "ffn_norm", "final_norm", "sample") else DEVICE, "clear")
    )
    sent = [v for s in plan.device_segments for v in s.sends]
    returned = [v for s in plan.device_segments for v in s.returns]
    assert "x" not in sent and sent.count("h") == 2 * CONFIG.num_layers + 1
    assert returned.count("x") == 2 * CONFIG.num_layers + 1


def test_malformed_plans_are_refused():
    placements = build_plan("plain", CONFIG).placements
    with pytest.raises(ValueError, match="exactly once"):
        Plan("missing-op", CONFIG, placements[1:])
    with pytest.raises(ValueError, match="sampling runs in the enclave"):
        Plan("device-sampling", CONFIG, placements[:-1] + (Placement("sample", None, DEVICE),))
    with pytest.raises(InvalidRequestError, match="transform 'permuted'"):
        uniform_plan("future", CONFIG, lambda op: (ENCLAVE if op == "sample" else DEVICE, "permuted"))
    with pytest.raises(ValueError, match="only the projections"):
        uniform_plan("blind-norm", CONFIG, lambda op: (ENCLAVE, "clear") if op == "sample" else (DEVICE, "blinded"))
    with pytest.raises(ValueError, match="place it there"):
        uniform_plan("blind-in-enclave", CONFIG, lambda op: (ENCLAVE, "blinded" if op in LINEAR_OPS else "clear"))
    with pytest.raises(InvalidRequestError, match="unknown scheme 'nope'"):
        build_plan("nope", CONFIG)


def test_analytic_matmul_flops_equal_torch_flop_counter_on_transformers():
    model = tiny_llama_model()
    context = 11
    with torch.no_grad():
        past = model(torch.randint(0, CONFIG.vocab_size, (1, context - 1)), use_cache=True).past_key_values
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.tensor([[5]]), past_key_values=past, use_cache=True, logits_to_keep=1)
    from secureinfer.plan.costs import op_flops

    analytic = sum(
        op_flops(op, CONFIG, context) for op, _ in op_sequence(CONFIG) if op in LINEAR_OPS
    )
    assert analytic == counter.get_flop_counts()["Global"][torch.ops.aten.mm] == counter.get_total_flops()


def test_weight_bytes_follow_the_placement():
    model = tiny_llama_model()
    total = sum(p.numel() * 4 for p in model.parameters())  # tied: the embedding counts once
    plain, enclave = plan_costs(build_plan("plain", CONFIG), 16), plan_costs(build_plan("enclave", CONFIG), 16)
    assert (plain.device_weight_bytes, plain.enclave_weight_bytes) == (total, 0)
    assert (enclave.enclave_weight_bytes, enclave.device_weight_bytes) == (total, 0)
    kv = 2 * CONFIG.num_layers * CONFIG.num_kv_heads * CONFIG.head_dim * 16 * 4
    assert (plain.device_kv_bytes, enclave.enclave_kv_bytes, enclave.enclave_resident_bytes) == (kv, kv, total + kv)
    assert plain.enclave_flops + plain.device_flops == enclave.enclave_flops


def test_secureinfer_blinds_every_projection_alone_and_keeps_the_rest_in_the_enclave():
    plan = build_plan("secureinfer", CONFIG)
    device = plan.device_segments
    assert len(device) == 4 * CONFIG.num_layers + 1
    assert all(s.transform == "blinded" and len(s.ops) == 1 and s.ops[0][0] in LINEAR_OPS for s in device)
    assert all(p.side == ENCLAVE for p in plan.placements if p.op not in LINEAR_OPS)
    assert all(name.endswith(".q") for name in plan.stored_weights(DEVICE))  # int8 public weights, no scales
    costs = plan_costs(plan, 16)
    d, f, v = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.vocab_size
    per_layer_in = d + CONFIG.q_size + d + f  # h, a, h, m: field elements of 8 bytes
    per_layer_out = CONFIG.q_size + 2 * CONFIG.kv_size + d + 2 * f + d
    assert costs.bytes_to_device == 8 * (CONFIG.num_layers * per_layer_in + d)
    assert costs.bytes_from_device == 8 * (CONFIG.num_layers * per_layer_out + v)


def test_the_alternative_reading_outsources_only_the_output_projection_and_the_head():
    plan = build_plan("secureinfer-enclave-qkv-ffn", CONFIG)
    assert [s.ops[0][0] for s in plan.device_segments] == ["o_proj"] * CONFIG.num_layers + ["lm_head"]
    device = set(plan.stored_weights(DEVICE))
    assert device == {f"layers.{i}.wo.q" for i in range(CONFIG.num_layers)} | {"lm_head.q"}
    alternative, paper = plan_costs(plan, 16), plan_costs(build_plan("secureinfer", CONFIG), 16)
    assert alternative.round_trips == CONFIG.num_layers + 1
    assert alternative.enclave_flops > paper.enclave_flops and alternative.device_flops < paper.device_flops


def test_an_adapter_sits_with_the_side_that_finishes_its_projection():
    ranks = {f"layers.{i}.{w}": 8 for i in range(CONFIG.num_layers) for w in ("wqkv", "w_down")}
    adapter = {f"{name}.{part}" for name in ranks for part in ("lora_a", "lora_b")}
    for scheme, holder in (("plain", DEVICE), ("plain-int8", DEVICE), ("secureinfer", ENCLAVE), ("enclave", ENCLAVE)):
        plan = build_plan(scheme, CONFIG).with_adapters(ranks)
        other = ENCLAVE if holder == DEVICE else DEVICE
        assert adapter <= set(plan.stored_weights(holder)) and not adapter & set(plan.stored_weights(other))
        assert plan.adapter_sides() == [holder]
    adapted_plan = build_plan("secureinfer", CONFIG).with_adapters(ranks)
    plain, adapted = plan_costs(build_plan("secureinfer", CONFIG), 16), plan_costs(adapted_plan, 16)
    d, f = CONFIG.hidden_size, CONFIG.intermediate_size
    qkv_out = CONFIG.q_size + 2 * CONFIG.kv_size
    per_layer = (2 * 8 * (d + qkv_out) + qkv_out) + (2 * 8 * (f + d) + d)
    assert adapted.enclave_flops - plain.enclave_flops == CONFIG.num_layers * per_layer
    assert adapted.enclave_weight_bytes - plain.enclave_weight_bytes == 4 * 8 * CONFIG.num_layers * (d + qkv_out + f + d)
    assert adapted.device_flops == plain.device_flops and adapted_plan.adapters == ranks
    with pytest.raises(ValueError, match="not projections"):
        build_plan("plain", CONFIG).with_adapters({"layers.0.attn_norm": 8})


def test_a_blinded_product_must_take_its_input_from_the_enclave():
    def place(op):
        if op == "sample":
            return ENCLAVE, "clear"
        return (DEVICE, "blinded") if op in LINEAR_OPS else (DEVICE, "clear")

    with pytest.raises(ValueError, match="only the device holds in clear"):
        uniform_plan("bad", CONFIG, place)

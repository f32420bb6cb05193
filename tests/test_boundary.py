"""The trust boundary through the public API: baselines match the in-process engine, measured traffic
and memory match the plan's analytic costs, the device view holds what the plan puts there (checked
by content), device faults surface as clear errors and leave the enclave usable, and device code
never loads enclave code."""

from __future__ import annotations

import ast
import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import secureinfer
from secureinfer.channel import DeviceDied, DeviceTimeout
from secureinfer.engine import GenerationConfig, Generator
from secureinfer.model import Llama, load_checkpoint
from secureinfer.model.kernels import StepContext, flat_weights, run_ops
from secureinfer.plan import build_plan
from secureinfer.plan.costs import plan_costs

PROMPTS = ["the cat and the dog", "once upon a time in a land", "is it on"]
NEW_TOKENS = 12
SOURCE = Path(secureinfer.__file__).parent


@pytest.fixture(scope="module")
def checkpoint(tiny_gguf):
    return load_checkpoint(tiny_gguf, progress=False)


@pytest.fixture(scope="module")
def engine(checkpoint):
    model = Llama.from_state_dict(checkpoint.config, checkpoint.weights)
    return Generator(model, checkpoint.tokenizer, checkpoint.config.max_position_embeddings)


def secure_lm(checkpoint, scheme, **options) -> secureinfer.SecureLM:
    return secureinfer.SecureLM(checkpoint, scheme, threads=torch.get_num_threads(), **options)


@pytest.mark.parametrize("scheme", ["plain", "enclave"])
@pytest.mark.parametrize("channel", ["process", "inprocess"])
def test_baselines_generate_what_the_in_process_engine_generates(checkpoint, engine, scheme, channel):
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    with secure_lm(checkpoint, scheme, channel=channel) as lm:
        for prompt in PROMPTS:
            assert lm.generate(prompt, **vars(config)).tokens == engine.generate(prompt, config).tokens
        batch = lm.generate_batch(PROMPTS, **vars(config))
    assert [r.tokens for r in batch] == [r.tokens for r in engine.generate_batch(PROMPTS, config)]


@pytest.mark.parametrize("scheme", ["plain", "enclave", "plain-int8", "secureinfer", "secureinfer-enclave-qkv-ffn", "hardened"])
def test_measured_traffic_and_enclave_memory_match_the_analytic_costs(checkpoint, scheme):
    with secure_lm(checkpoint, scheme) as lm:
        prompt_tokens = len(lm.tokenizer.encode(PROMPTS[1]))
        lm.runtime.reset_stats()
        lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        stats = lm.stats()
    plan = lm.plan  # with the enclave share the runtime chose (0.5 for the blinded schemes here)
    prefill = plan_costs(plan, context=prompt_tokens, tokens=prompt_tokens)
    decode = plan_costs(plan, context=prompt_tokens + NEW_TOKENS)  # traffic does not depend on the context
    steps = NEW_TOKENS - 1
    channel = stats["channel"]
    assert channel["round_trips_by_kind"].get("run", 0) == prefill.round_trips + steps * decode.round_trips
    assert channel["round_trips"] == channel["round_trips_by_kind"].get("run", 0) + (scheme != "enclave")  # + new_cache
    assert channel["payload_bytes_sent"] == prefill.bytes_to_device + steps * decode.bytes_to_device
    assert channel["payload_bytes_received"] == prefill.bytes_from_device + steps * decode.bytes_from_device

    memory = lm.runtime.memory
    cache_positions = plan_costs(plan, context=prompt_tokens + NEW_TOKENS)  # the cache is allocated up front
    assert memory.held_bytes("weight:") == decode.enclave_weight_bytes
    assert memory.held_bytes("kv_cache") == cache_positions.enclave_kv_bytes
    assert stats["memory"]["peak_bytes"] >= cache_positions.enclave_resident_bytes
    if scheme == "plain":
        assert (channel["round_trips_by_kind"]["run"], stats["memory"]["peak_bytes"]) == (NEW_TOKENS, 0)


def test_an_epc_budget_models_paging_of_the_excess(checkpoint):
    budget = 64 << 10
    with secure_lm(checkpoint, "enclave", epc_bytes=budget) as lm:
        lm.generate(PROMPTS[0], max_new_tokens=4)
        report = lm.stats()["memory"]
    assert report["budget_bytes"] == budget and report["policy"] == "page"
    assert report["over_budget_bytes"] == report["peak_bytes"] - budget > 0
    assert report["paging_cycles_per_step"] == report["paged_pages_per_step"] * 40_000


def read_view(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("weights", "messages", "state"):
        tensors.update({f"{name}/{key}": t for key, t in load_file(directory / f"{name}.safetensors").items()})
    return tensors


def contains(view: dict[str, torch.Tensor], wanted: torch.Tensor) -> bool:
    return any(t.shape == wanted.shape and t.dtype == wanted.dtype and torch.equal(t, wanted) for t in view.values())


def test_the_enclave_view_holds_no_weight_and_no_activation(tmp_path, checkpoint):
    with secure_lm(checkpoint, "enclave", record_view=tmp_path) as lm:
        lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    view = read_view(tmp_path)
    assert not any(t.is_floating_point() for t in view.values())
    assert view == {}  # not even the prompt's token ids


def test_the_plain_view_holds_every_weight_and_every_layer_input(tmp_path, checkpoint):
    prompt = checkpoint.tokenizer.encode(PROMPTS[1])
    with secure_lm(checkpoint, "plain", record_view=tmp_path) as lm:
        tokens = lm.generate(PROMPTS[1], max_new_tokens=3, ignore_eos=True).tokens
    view = read_view(tmp_path)

    model = Llama.from_state_dict(checkpoint.config, checkpoint.weights)
    weights = flat_weights(model.weights)
    assert all(contains(view, w) for w in weights.values())

    # Recompute each step in process and collect every layer's input: the embedding, then each layer's output.
    layer_inputs: list[torch.Tensor] = []
    record = lambda op, layer, written: layer_inputs.append(written["x"]) if op in ("embed", "ffn_residual") else None  # noqa: E731
    cache = model.new_cache(1, len(prompt) + 3)
    ops = build_plan("plain", checkpoint.config).segments[0].ops
    for start, step_tokens in ((0, prompt), (len(prompt), tokens[:1]), (len(prompt) + 1, tokens[1:2])):
        ctx = StepContext.create(checkpoint.config, (model.rope_cos, model.rope_sin), start, 1, len(step_tokens), None, True)
        run_ops(ops, {"tokens": torch.tensor([step_tokens])}, weights, cache, ctx, record)
    assert len(layer_inputs) == 3 * (checkpoint.config.num_layers + 1)
    assert all(contains(view, x) for x in layer_inputs)


def test_a_killed_device_is_a_clear_error_and_a_restart_lets_the_request_succeed(checkpoint, engine):
    expected = engine.generate(PROMPTS[1], GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)).tokens
    with secure_lm(checkpoint, "plain") as lm:
        enclave_state = {name: w.clone() for name, w in lm.runtime.weights.items()}
        lm.generate(PROMPTS[0], max_new_tokens=2)
        os.kill(lm.runtime.channel.pid, signal.SIGKILL)
        with pytest.raises(DeviceDied, match="SIGKILL") as info:
            lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert "restart" in info.value.fix
        assert all(torch.equal(lm.runtime.weights[n], w) for n, w in enclave_state.items())
        lm.restart_device()
        assert lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens == expected


def test_a_hung_device_times_out_and_a_restart_recovers(checkpoint, engine):
    expected = engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=4, ignore_eos=True)).tokens
    with secure_lm(checkpoint, "plain", device_timeout_s=1.0) as lm:
        hung = lm.runtime.channel.pid
        os.kill(hung, signal.SIGSTOP)
        try:
            with pytest.raises(DeviceTimeout):
                lm.generate(PROMPTS[0], max_new_tokens=4)
            lm.restart_device()
        finally:
            with contextlib.suppress(ProcessLookupError):  # the restart may already have reaped it
                os.kill(hung, signal.SIGCONT)
        assert lm.runtime.channel.pid != hung
        assert lm.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True).tokens == expected


def test_the_device_process_loads_no_enclave_code(checkpoint):
    with secure_lm(checkpoint, "plain") as lm:
        modules = lm.stats()["device"]["modules"]
    assert "secureinfer.device.endpoint" in modules
    assert not [m for m in modules if m.split(".")[1:2] in (["enclave"], ["api"], ["cli"], ["engine"])]


@pytest.mark.parametrize("package", ["device", "channel"])
def test_untrusted_code_never_imports_trusted_code(package):
    forbidden = {"enclave", "api", "cli", "engine"}
    for path in (SOURCE / package).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                # `from ..enclave import x` (level 2) or `from secureinfer.enclave import x` (level 0)
                parts = (node.module or "").split(".")
                top = parts[0] if node.level == 2 else (parts[1] if node.level == 0 and parts[0] == "secureinfer" and len(parts) > 1 else None)
                names = {alias.name for alias in node.names} if node.level == 2 and not node.module else set()
                assert top not in forbidden and not names & forbidden, f"{path.name}: from {'.' * node.level}{node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    assert not (parts[0] == "secureinfer" and len(parts) > 1 and parts[1] in forbidden), path.name

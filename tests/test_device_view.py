"""The device view: an auditor reading it sees exactly what the untrusted device received, sent and held."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from device_session import PROMPT, greedy_steps, start_device, tiny_model, whole_forward
from secureinfer.channel import open_channel


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def read_view(directory):
    manifest = json.loads((directory / "manifest.json").read_text())
    files = {name: load_file(directory / f"{name}.safetensors") for name in ("messages", "weights", "state")}
    return manifest, files


def test_view_of_a_model_run_holds_every_message_the_weights_and_the_kv_cache(tmp_path, model):
    directory = tmp_path / "view"
    with open_channel("process", record_view=directory, threads=torch.get_num_threads()) as channel:
        sent_weights = start_device(channel, model, batch=PROMPT.shape[0])
        steps, reference_cache = greedy_steps(channel, model, decode_steps=2)
        device_pid = channel.pid
    manifest, files = read_view(directory)
    messages = manifest["messages"]

    requests = ["hello", "put_weights", "new_cache", *["run"] * len(steps), "close"]
    assert [(m["index"], m["direction"], m["request"]) for m in messages] == [
        (index, direction, kind) for index, kind in enumerate(requests) for direction in ("in", "out")
    ]
    assert all(m["kind"] == "ok" for m in messages if m["direction"] == "out")
    assert manifest["device"]["pid"] == device_pid and manifest["config"] == model.config.to_dict()
    assert messages[0]["meta"] == {"config": model.config.to_dict()}

    runs = [m for m in messages if m["request"] == "run"]
    ops = [list(op) for op in whole_forward(model.config)]
    for number, (request, reply, step) in enumerate(zip(runs[::2], runs[1::2], steps)):
        assert request["step"] == reply["step"] == number and request["ops"] == ops
        assert list(request["tensors"]) == ["tokens"] and list(reply["tensors"]) == ["logits"]
        assert torch.equal(files["messages"][request["tensors"]["tokens"]["key"]], step.tokens)
        assert torch.equal(files["messages"][reply["tensors"]["logits"]["key"]], step.logits)

    # The weights as held, the tied LM head recorded as an alias rather than a second copy.
    assert files["weights"].keys() == sent_weights.keys()
    assert all(torch.equal(files["weights"][name], weight) for name, weight in sent_weights.items())
    assert manifest["weights"]["aliases"] == {"lm_head": "embed"}
    put = messages[2]["tensors"]
    assert all(torch.equal(files["messages"][put[name]["key"]], weight) for name, weight in sent_weights.items())

    # The KV cache of every position written: the keys and values the in-process model computed.
    positions = PROMPT.shape[1] + len(steps) - 1
    state = manifest["state"]
    assert state["kv_layers"] == list(range(model.config.num_layers)) and state["kv_positions"] == positions
    assert torch.equal(files["state"]["kv.k"], reference_cache.k[..., :positions, :])
    assert torch.equal(files["state"]["kv.v"], reference_cache.v[..., :positions, :])
    assert torch.equal(files["state"]["values.logits"], steps[-1].logits)


def test_device_sent_only_hello_holds_nothing_and_its_view_survives_the_enclave_vanishing(tmp_path, model):
    directory = tmp_path / "view"
    channel = open_channel("process", record_view=directory)
    channel.request("hello", {"config": model.config.to_dict()})
    process = channel.process
    del channel  # no close: the device only sees EOF, and must still write its view
    gc.collect()
    assert process.wait(timeout=10) == 0
    manifest, files = read_view(directory)

    assert [(m["direction"], m["kind"]) for m in manifest["messages"]] == [("in", "hello"), ("out", "ok")]
    assert files == {"messages": {}, "weights": {}, "state": {}}
    assert manifest["weights"] == {"file": "weights.safetensors", "tensors": {}, "aliases": {}}
    assert manifest["state"]["tensors"] == {} and manifest["state"]["kv_positions"] == 0

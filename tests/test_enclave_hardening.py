"""Enclave memory accounting and OS hardening, checked against what the kernel itself reports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from secureinfer.enclave.hardening import SecretMemory
from secureinfer.enclave.memory import CYCLES_PER_PAGE, PAGE_BYTES, EnclaveMemory

MIB = 1 << 20


def test_memory_counts_holdings_peak_and_releases():
    memory = EnclaveMemory()
    memory.hold("a", torch.zeros(MIB // 4))
    memory.hold("b", torch.zeros(2, MIB // 4))
    memory.observe("activations", 512)
    memory.release("b")
    memory.observe("activations", 1024)
    report = memory.report()
    assert (report["current_bytes"], report["peak_bytes"]) == (MIB + 1024, 3 * MIB + 512)
    assert report["budget_bytes"] is None and report["policy"] == "no limit" and report["over_budget_bytes"] == 0


def test_past_the_budget_the_excess_is_modelled_as_paged_every_step():
    memory = EnclaveMemory(budget_bytes=MIB)
    memory.hold("weights", torch.zeros(3 * MIB // 4))
    memory.observe("tail", 100)
    report = memory.report()
    over = 2 * MIB + 100
    assert report["over_budget_bytes"] == over
    assert report["paged_pages_per_step"] == -(-over // PAGE_BYTES) == 513
    assert report["paging_cycles_per_step"] == 513 * CYCLES_PER_PAGE


def test_process_becomes_undumpable():
    code = (
        "import ctypes; from secureinfer.enclave.hardening import make_undumpable;"
        "print(make_undumpable(), ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # 3 = PR_GET_DUMPABLE
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{'dumpable': False} 0"


def test_secret_memory_holds_the_values_in_secretmem_pages_or_says_why_not():
    secret = SecretMemory()
    source = torch.randn(1000, 7)
    copy = secret.copy(source)
    assert torch.equal(copy, source) and copy.data_ptr() != source.data_ptr()
    report = secret.report()
    if report["secret_bytes"]:
        maps = open("/proc/self/maps").read()
        address = f"{copy.data_ptr():x}"
        line = next(l for l in maps.splitlines() if int(l.split("-")[0], 16) <= copy.data_ptr() < int(l.split()[0].split("-")[1], 16))
        assert "secretmem" in line, (address, line)
    else:
        assert report["fallback_reason"]


def _secretmem_mappings() -> int:
    return sum("secretmem" in line for line in open("/proc/self/maps"))


@pytest.mark.parametrize("enabled", [True, False])
def test_secret_memory_is_given_back_when_its_last_tensor_goes(enabled):
    secret = SecretMemory(enabled=enabled)
    kind = "secret_bytes" if secret.enabled else "ordinary_bytes"
    before = _secretmem_mappings()
    held = secret.zeros((256, 1024))
    view = held[10:20]
    del held  # a view keeps the mapping alive
    assert secret.report()[kind] == 256 * 1024 * 4 and float(view.add_(1).sum()) == 10 * 1024
    if secret.enabled and secret.report()["secret_bytes"]:
        assert _secretmem_mappings() == before + 1
    del view
    assert secret.report()[kind] == 0 and _secretmem_mappings() == before


def test_a_runtime_reuses_the_kv_memory_of_a_finished_conversation_and_never_shares_a_live_one(tiny_gguf):
    from functools import partial

    from secureinfer.channel import open_channel
    from secureinfer.enclave import EnclaveRuntime
    from secureinfer.model import load_checkpoint
    from secureinfer.model.llama import LlamaWeights
    from secureinfer.plan import build_plan

    checkpoint = load_checkpoint(tiny_gguf, progress=False)
    weights = LlamaWeights.from_state_dict(checkpoint.config, checkpoint.weights)
    runtime = EnclaveRuntime(
        checkpoint.config, weights, build_plan("secureinfer", checkpoint.config), partial(open_channel, "inprocess"),
        pad_background=False,
    )  # fmt: skip
    try:
        first = runtime.new_cache(1, 24)
        first.k.fill_(7.0), first.v.fill_(-7.0)  # a conversation's keys and values
        alive = runtime.new_cache(1, 24)  # while `first` is still in use: memory of its own
        assert {alive.k.data_ptr(), alive.v.data_ptr()}.isdisjoint({first.k.data_ptr(), first.v.data_ptr()})
        assert not alive.k.any() and first.k.eq(7.0).all()
        del first
        alive.k.fill_(3.0), alive.v.fill_(-3.0)
        kept = alive.k.data_ptr()
        del alive
        held = runtime.secret.report()
        again = runtime.new_cache(1, 16)  # smaller, once the last conversation is gone: its memory, zeroed
        assert again.k.data_ptr() == kept and not again.k.any() and not again.v.any() and again.k.shape[3] == 16
        for _ in range(5):  # a long-running enclave: what it holds does not grow with the conversations
            del again
            again = runtime.new_cache(1, 16)
        assert runtime.secret.report() == held
        assert runtime.memory.held_bytes("kv_cache") == 2 * again.k.numel() * again.k.element_size()
    finally:
        runtime.close()


def test_secret_memory_can_be_switched_off():
    secret = SecretMemory(enabled=False)
    held = secret.zeros((4, 4))
    assert not held.any() and secret.report()["secret_bytes"] == 0 and secret.report()["ordinary_bytes"] == 64


@pytest.mark.parametrize("budget", [0, -5])
def test_a_non_positive_budget_is_refused(budget):
    with pytest.raises(ValueError):
        EnclaveMemory(budget)

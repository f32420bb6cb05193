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


def test_secret_memory_can_be_switched_off():
    secret = SecretMemory(enabled=False)
    secret.zeros((4, 4))
    assert secret.report()["secret_bytes"] == 0 and secret.report()["ordinary_bytes"] == 64


@pytest.mark.parametrize("budget", [0, -5])
def test_a_non_positive_budget_is_refused(budget):
    with pytest.raises(ValueError):
        EnclaveMemory(budget)

"""The enclave's blind/unblind steps: the compiled kernels give the torch steps' bits, refuse what does not fit,
and a device answer that cannot be unblinded is a clear error."""

from __future__ import annotations

import pytest
import torch

import secureinfer
from scheme_runs import forward_logits
from secureinfer.channel import DeviceProtocolError
from secureinfer.crypto import blind as blinding
from secureinfer.crypto.blind import KERNELS, blind, unblind
from secureinfer.crypto.field import FIELD_KERNELS, P
from secureinfer.crypto.freivalds import CHECK_KERNELS
from secureinfer.crypto.quant import activation_qmax, quantize_weight
from secureinfer.model import load_checkpoint

PROMPT = "once upon a time in a land"


def test_the_kernels_build_here(tiny_gguf):
    with secureinfer.load(tiny_gguf, "secureinfer", channel="inprocess", progress=False) as lm:
        compiled = lm.stats()["compiled_kernels"]
    # g++ and ninja are on this project's machines
    sources = (KERNELS, FIELD_KERNELS, CHECK_KERNELS)
    assert compiled == {source: {"compiled": True, "reason": "built"} for source in sorted(sources)}


def _activations(width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(width)
    rows = torch.randn(6, width, generator=generator) * torch.tensor([[1.0], [1e3], [1e-30], [0.0], [3.0], [1.0]])
    qmax = activation_qmax(width)
    rows[4, :] = ((torch.arange(width) % 41) - 20 + 0.5) * 2.0**-10  # with the row's scale 2^-10: ties k + 0.5
    rows[4, 0] = qmax * 2.0**-10  # the row's largest, which makes its scale exactly 2^-10
    rows[5, :3] = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, 1e-45])
    return rows


def test_the_vector_paths_run_here():
    assert blinding.native_kernels().avx512()  # this project's machines have AVX512: the tests below cover both paths


# 2752: a coarser qmax (52,841 -> 16.6 bits); 100: a row that ends part-way through a 16-lane vector
@pytest.mark.parametrize("width", [576, 1536, 2752, 100])
def test_blinding_gives_the_torch_steps_bits(width):
    x = _activations(width)
    r = torch.randint(0, P, x.shape, generator=torch.Generator().manual_seed(1))
    r[:, :4] = torch.tensor([0, 1, P - 2, P - 1])  # the sum wraps below 0 and past P - 1 wherever q has the sign
    x[:2, :4] = torch.tensor([-1.0, -1.0, 1.0, 1.0]) * x[:2].abs().amax(dim=1, keepdim=True)
    compiled, reference = blind(x.view(2, 3, width), r, native=True), blind(x.view(2, 3, width), r, native=False)
    scalar = blinding.native_kernels().quantize_pad(x, r, activation_qmax(width), P, False)
    for ours, in_scalar, theirs in zip(compiled, scalar, reference):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)
        assert torch.equal(in_scalar.view(theirs.shape), theirs)
    q, row_scale, padded = compiled
    assert row_scale.shape == (2, 3, 1) and int(q.abs().max()) == activation_qmax(width)
    ties = q[4, 1:42].tolist()  # k + 0.5 rounds to the even neighbour: -18.5 -> -18, -17.5 -> -18, ...
    assert ties[:4] == [-18, -18, -16, -16] and all(value % 2 == 0 for value in ties)
    assert bool(((padded >= 0) & (padded < P)).all()) and torch.equal((padded - r - q) % P, torch.zeros_like(q))
    qmax = activation_qmax(width)
    assert padded[0, :4].tolist() == [P - qmax, P - qmax + 1, qmax - 2, qmax - 1]


@pytest.mark.parametrize("own_columns", [0, 5, 21])  # 21: two full 8-lane vectors and a part
def test_unblinding_gives_the_torch_steps_bits(own_columns):
    generator = torch.Generator().manual_seed(2)
    columns = 11
    weight = quantize_weight(torch.randn(columns + own_columns, 8, generator=generator))
    u = torch.randint(0, P, (4, columns), generator=generator)
    signed = torch.tensor([0, 1, -1, P // 2, -(P // 2), 12345, -99999, 2**33, -(2**33), 7, -7])
    y = (u + signed) % P  # every signed residue the device's honest y can stand for, and the centring's edges
    y[3] = torch.tensor([-5, 2**40, -(2**40), P, 2 * P - 1, 3, 4, 5, 6, 7, 8])  # out of range: reduced the same
    own = torch.randint(-(2**40), 2**40, (4, own_columns), generator=generator).double() if own_columns else None
    row_scale = torch.rand(4, 1, generator=generator) * 1e-3
    compiled = unblind(y, u, own, row_scale, weight, native=True)
    reference = unblind(y, u, own, row_scale, weight, native=False)
    own_or_none = torch.empty(4, 0, dtype=torch.float64) if own is None else own
    scalar = blinding.native_kernels().unpad_rescale(y, u, own_or_none, row_scale.view(-1), weight.scale64, P, False)
    assert compiled.dtype == torch.float32 and compiled.shape == (4, columns + own_columns)
    assert torch.equal(compiled, reference) and torch.equal(scalar, reference)
    expected = signed.double() * row_scale[0].double() * weight.scale64[:columns]
    assert torch.equal(compiled[0, :columns], expected.float())


def test_the_kernels_refuse_tensors_that_do_not_fit():
    weight = quantize_weight(torch.randn(6, 8))
    u = torch.zeros(2, 6, dtype=torch.int64)
    kernels = blinding.native_kernels()
    scale = torch.ones(2)
    for y in (torch.zeros(1, 6, dtype=torch.int64), torch.zeros(2, 7, dtype=torch.int64), torch.zeros(2, 6)):
        with pytest.raises(RuntimeError, match="y "):
            kernels.unpad_rescale(y, u, torch.empty(2, 0, dtype=torch.float64), scale, weight.scale64, P, True)
    with pytest.raises(RuntimeError, match="column_scale"):
        kernels.unpad_rescale(u, u, torch.empty(2, 1, dtype=torch.float64), scale, weight.scale64, P, True)
    with pytest.raises(RuntimeError, match="r "):
        kernels.quantize_pad(torch.zeros(2, 6), torch.zeros(2, 5, dtype=torch.int64), 65535, P, True)


def test_the_torch_steps_give_the_same_tokens_where_the_kernels_are_not_used(tiny_gguf, monkeypatch):
    checkpoint = load_checkpoint(tiny_gguf, progress=False)
    ids = torch.tensor([checkpoint.tokenizer.encode(PROMPT)])
    runs = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(blinding, "native_kernels", lambda: None)
        with secureinfer.SecureLM(checkpoint, "secureinfer", channel="inprocess", enclave_share=0.3) as lm:
            runs.append((forward_logits(lm, ids), lm.generate(PROMPT, max_new_tokens=6, ignore_eos=True).tokens))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0])) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("answer", ["float32", "narrow", "empty"])
def test_a_product_that_cannot_be_unblinded_is_a_device_protocol_error(tiny_gguf, monkeypatch, answer):
    from secureinfer.device import endpoint

    honest = endpoint.blinded_product

    def dishonest(values, weights, op, layer):
        honest(values, weights, op, layer)
        if answer == "float32":
            values["y"] = values["y"].float()
        elif answer == "narrow":
            values["y"] = values["y"][..., :-1]
        else:
            values["y"] = values["y"][..., :0]

    monkeypatch.setattr(endpoint, "blinded_product", dishonest)
    with secureinfer.load(tiny_gguf, "secureinfer", channel="inprocess", progress=False) as lm:
        with pytest.raises(DeviceProtocolError, match="instead of int64") as caught:
            lm.generate(PROMPT, max_new_tokens=2)
    assert "restart the device" in caught.value.fix

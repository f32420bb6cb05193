"""The device side on a CUDA GPU (`device="cuda"`): the exact routes of the blinded products, every scheme against
transformers and against the CPU device, the view it records, and the bench beside transformers on the GPU.

These tests need a GPU that torch sees, so they skip on this project's CI machines, which have none; the README
records where and when they last ran on one, and what they measured there."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import secureinfer
from scheme_runs import forward_logits, padded_batch
from secureinfer.crypto.field import CHUNK, CUDA_BACKENDS, HORNER_FROM, P, fastest_backend, field_matmul, product_weight, signed_matmul
from secureinfer.model import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: these run the device side on one")

PROMPTS = ["the cat and the dog", "once upon a time in a land", "is it on"]
EXACT_SCHEMES = ("secureinfer", "secureinfer-enclave-qkv-ffn", "hardened")  # the device computes exact products alone
FLOAT_SCHEMES = ("plain", "kvshield", "kvshield-fold")  # the device runs float ops on float weights
MIXED_SCHEMES = ("plain-int8", "kvmix")  # the device runs float ops beside exact int8 products


@pytest.fixture(scope="module")
def checkpoint(tiny_gguf):
    return load_checkpoint(tiny_gguf, progress=False)


@pytest.mark.parametrize("inner", [CHUNK, 2 * CHUNK + 3])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_the_gpu_routes_multiply_field_elements_and_clear_values_exactly(backend, inner):
    rng = random.Random(0)
    rows = [[P - 1] * inner, [2**30 - 1] * inner, [rng.randrange(P) for _ in range(inner)], [P // 2] * inner, [P // 2 + 1] * inner]
    weight = torch.tensor([[rng.choice((-127, 127, rng.randrange(-127, 128))) for _ in range(3)] + [-127] for _ in range(inner)], dtype=torch.int8)
    expected = [[sum(x * int(weight[k, j]) for k, x in enumerate(row)) % P for j in range(4)] for row in rows]
    gpu_rows, gpu_weight = torch.tensor(rows).cuda(), weight.cuda()
    assert field_matmul(gpu_rows, product_weight(gpu_weight, backend), backend).cpu().tolist() == expected
    tiled = product_weight(gpu_weight.repeat(1, HORNER_FROM // len(rows) // 4 + 1), backend)  # recombined by Horner
    got = field_matmul(gpu_rows, tiled, backend).cpu()
    assert got.numel() > HORNER_FROM and (got.view(len(rows), -1, 4) == torch.tensor(expected)[:, None]).all()
    clear = [[65535] * inner, [-65535] * inner, [rng.randrange(-65535, 65536) for _ in range(inner)]]
    expected_clear = [[float(sum(x * int(weight[k, j]) for k, x in enumerate(row))) for j in range(4)] for row in clear]
    assert signed_matmul(torch.tensor(clear).cuda(), product_weight(gpu_weight, backend), backend).cpu().tolist() == expected_clear


def test_the_gpu_picks_one_of_its_own_routes():
    assert fastest_backend("cuda") in CUDA_BACKENDS


def _run(checkpoint, scheme: str, device: str) -> tuple[list, list]:
    batch, pad = padded_batch(checkpoint.tokenizer, PROMPTS)
    first = torch.tensor([checkpoint.tokenizer.encode(PROMPTS[0])])
    with secureinfer.SecureLM(checkpoint, scheme, device=device) as lm:
        assert lm.stats()["device"]["device"] == device
        logits = forward_logits(lm, batch, pad) + forward_logits(lm, first)
        tokens = [lm.generate(p, max_new_tokens=8, ignore_eos=True).tokens for p in PROMPTS]
    return logits, tokens


@pytest.mark.parametrize("scheme", EXACT_SCHEMES)
def test_blinded_schemes_on_the_gpu_equal_plain_int8_on_the_cpu_bit_for_bit(checkpoint, scheme):
    reference_logits, reference_tokens = _run(checkpoint, "plain-int8", "cpu")
    logits, tokens = _run(checkpoint, scheme, "cuda")
    assert all(torch.equal(ours, reference) for ours, reference in zip(logits, reference_logits))
    assert tokens == reference_tokens


@pytest.mark.parametrize("scheme", FLOAT_SCHEMES)
def test_float_schemes_on_the_gpu_match_transformers(checkpoint, tiny_hf_model, scheme):
    """Prefill of a left-padded batch, all positions, against transformers' fp32 forward on the CPU; then the
    decode steps against the same scheme on the CPU device."""
    batch, pad = padded_batch(checkpoint.tokenizer, PROMPTS)
    attention = (torch.arange(batch.shape[1])[None] >= pad[:, None]).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = tiny_hf_model(batch, attention_mask=attention, position_ids=positions).logits
    logits, _ = _run(checkpoint, scheme, "cuda")
    real = attention.bool()
    assert (logits[0][real] - expected[real]).abs().max() < 1e-4
    cpu_logits, _ = _run(checkpoint, scheme, "cpu")
    for ours, reference in zip(logits[1:], cpu_logits[1:]):
        assert (ours - reference).abs().max() < 1e-4


@pytest.mark.parametrize("scheme", MIXED_SCHEMES)
def test_int8_schemes_with_float_ops_on_the_gpu_stay_within_a_quantization_step_of_plain_int8_on_the_cpu(checkpoint, scheme):
    """The device quantizes activations it computed in float itself, so one rounding may fall the other way."""
    logits, _ = _run(checkpoint, scheme, "cuda")
    reference, _ = _run(checkpoint, "plain-int8", "cpu")
    for ours, theirs in zip(logits, reference):
        assert (ours - theirs).abs().max() / theirs.abs().max() < 1e-3


def test_the_gpu_device_records_the_view_the_cpu_device_records(tmp_path, checkpoint):
    """The recorder copies what the GPU holds to the CPU: the same weights and the same messages as a CPU device's."""
    for device in ("cpu", "cuda"):
        with secureinfer.SecureLM(checkpoint, "secureinfer", device=device, record_view=tmp_path / device) as lm:
            lm.generate(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
    views = {device: {part: load_file(tmp_path / device / f"{part}.safetensors") for part in ("weights", "messages")} for device in ("cpu", "cuda")}
    weights = views["cpu"]["weights"]
    assert weights and views["cuda"]["weights"].keys() == weights.keys()
    assert all(torch.equal(views["cuda"]["weights"][name], weights[name]) for name in weights)
    assert views["cuda"]["messages"].keys() == views["cpu"]["messages"].keys()


def test_the_bench_sets_plain_beside_transformers_on_the_gpu(tiny_gguf, tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "secureinfer", "bench", "--model", str(tiny_gguf), "--device", "cuda", "--scheme", "plain",
        "--scheme", "secureinfer", "--repeats", "1", "--max-new-tokens", "4", "--quiet", "--out", str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "cuda"
    assert {"plain", "secureinfer", "transformers generate"} <= report["results"].keys()

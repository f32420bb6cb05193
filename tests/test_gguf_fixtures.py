"""The GGUF fixtures are only useful if they are faithful, so check them against an independent
reader: transformers' own GGUF loader, and gguf's GGUFReader for the file layout."""

from __future__ import annotations

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_fixtures import (
    IM_END_ID,
    IM_START_ID,
    TINY_MERGES,
    TINY_TOKENS,
    TINY_VOCAB_SIZE,
    quantized_reference_model,
    tiny_llama_config,
    tiny_llama_model,
    write_corrupt_gguf,
    write_llama_gguf,
    write_not_gguf,
    write_truncated_gguf,
)

GGUF_NAME = "tiny.gguf"
# Every 7th id, so the prompt touches specials, raw bytes and merged tokens alike.
PROMPT_IDS = torch.arange(0, TINY_VOCAB_SIZE, 7)[None, :]


@pytest.fixture(scope="module")
def source_model():
    return tiny_llama_model()


def field_value(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def load_with_transformers(directory):
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_NAME, dtype=torch.float32)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(PROMPT_IDS).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_model_has_random_norm_weights(source_model):
    norm_weight = source_model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm_weight, torch.ones_like(norm_weight))


def test_file_layout_matches_llama_cpp(tmp_path, source_model):
    config = source_model.config
    reader = gguf.GGUFReader(write_llama_gguf(tmp_path / GGUF_NAME, source_model, context_length=96))

    assert field_value(reader, "GGUF.version") == 3
    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "general.file_type") == LlamaFileType.ALL_F32
    expected_hparams = {
        "llama.block_count": config.num_hidden_layers,
        "llama.context_length": 96,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.vocab_size": TINY_VOCAB_SIZE,
        "llama.rope.dimension_count": config.head_dim,
    }
    assert {key: field_value(reader, key) for key in expected_hparams} == expected_hparams
    assert field_value(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert field_value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)

    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_value(reader, "tokenizer.ggml.pre") == "smollm"
    assert field_value(reader, "tokenizer.ggml.tokens") == list(TINY_TOKENS)
    assert field_value(reader, "tokenizer.ggml.merges") == list(TINY_MERGES)
    assert field_value(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]

    tensor_names = {tensor.name for tensor in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= tensor_names
    assert "output.weight" not in tensor_names  # tied embeddings
    assert len(tensor_names) == 2 + 9 * config.num_hidden_layers


def test_arch_override_renames_architecture_keys(tmp_path, source_model):
    reader = gguf.GGUFReader(write_llama_gguf(tmp_path / GGUF_NAME, source_model, arch="gpt2"))

    assert field_value(reader, "general.architecture") == "gpt2"
    assert field_value(reader, "gpt2.block_count") == source_model.config.num_hidden_layers
    assert not any(key.startswith("llama.") for key in reader.fields)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_1"])
def test_quantized_file_quantizes_matrices_only(tmp_path, source_model, quant):
    reader = gguf.GGUFReader(write_llama_gguf(tmp_path / GGUF_NAME, source_model, quant=quant))

    assert field_value(reader, "general.file_type") == LlamaFileType[f"MOSTLY_{quant}"]
    for tensor in reader.tensors:
        expected = GGMLQuantizationType[quant] if len(tensor.shape) == 2 else GGMLQuantizationType.F32
        assert tensor.tensor_type == expected, tensor.name
    # GGUF lists dims innermost first, so a (vocab, hidden) matrix reads as [hidden, vocab].
    token_embd = next(tensor for tensor in reader.tensors if tensor.name == "token_embd.weight")
    assert list(token_embd.shape) == [source_model.config.hidden_size, TINY_VOCAB_SIZE]


def test_tokenizer_loads_in_transformers(tmp_path, source_model):
    write_llama_gguf(tmp_path / GGUF_NAME, source_model)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_NAME)

    assert len(tokenizer) == TINY_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)

    sentence = "Hello, the world! Is this and that, you see?  Yes: 42 \u00e9t\u00e9."
    ids = tokenizer(sentence)["input_ids"]
    assert ids[0] != IM_START_ID  # no automatic BOS, as with SmolLM2
    assert tokenizer.convert_ids_to_tokens(ids)[5] == "\u0120the"  # merges are applied
    assert tokenizer.decode(ids) == sentence


def test_chat_template_uses_chatml_special_ids(tmp_path, source_model):
    write_llama_gguf(tmp_path / GGUF_NAME, source_model)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=GGUF_NAME)
    messages = [{"role": "user", "content": "hi there"}]

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids.count(IM_START_ID) == 2
    assert ids.count(IM_END_ID) == 1
    assert ids[0] == IM_START_ID


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
def test_f32_file_reproduces_source_logits(tmp_path, tie_word_embeddings):
    model = tiny_llama_model(tiny_llama_config(tie_word_embeddings=tie_word_embeddings))
    write_llama_gguf(tmp_path / GGUF_NAME, model)
    loaded = load_with_transformers(tmp_path)

    assert loaded.config.tie_word_embeddings is tie_word_embeddings
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("quant", "max_relative_error"), [("Q8_0", 5e-2), ("Q4_1", 0.5)])
def test_quantized_file_matches_rounded_source(tmp_path, source_model, quant, max_relative_error):
    write_llama_gguf(tmp_path / GGUF_NAME, source_model, quant=quant)
    loaded_logits = logits(load_with_transformers(tmp_path))

    # Exact up to float32 noise against the same weights rounded in memory...
    torch.testing.assert_close(
        loaded_logits, logits(quantized_reference_model(source_model, quant)), atol=1e-5, rtol=0
    )
    # ...and only a quantization-sized step away from the unrounded source.
    assert 0 < relative_error(loaded_logits, logits(source_model)) < max_relative_error


@pytest.mark.parametrize(
    "make_bad_file",
    [
        lambda good, bad: write_not_gguf(bad),
        lambda good, bad: write_truncated_gguf(good, bad),
        lambda good, bad: write_corrupt_gguf(good, bad),
    ],
    ids=["not_gguf", "truncated", "corrupt"],
)
def test_bad_files_are_rejected_by_gguf_reader(tmp_path, source_model, make_bad_file):
    good = write_llama_gguf(tmp_path / GGUF_NAME, source_model)
    bad = make_bad_file(good, tmp_path / "bad.gguf")

    # gguf 0.19 raises ValueError (bad magic, truncated data) or IndexError (garbled counts).
    with pytest.raises((ValueError, IndexError)):
        gguf.GGUFReader(bad)

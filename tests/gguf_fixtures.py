"""Tiny, real-format GGUF files of a random-weight LLaMA, for tests.

The files are written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a LLaMA model with a
GPT-2-style byte-level BPE tokenizer (as for SmolLM2): same tensor names, the same q/k row
permutation, the same metadata keys. That lets a GGUF loader be checked against transformers' own
GGUF loader and against the HF model the file was made from.

Plain functions only; test modules wrap them in fixtures as they need.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from transformers import LlamaConfig, LlamaForCausalLM

# --- tokenizer ---------------------------------------------------------------------------------

# Same ids as SmolLM2-Instruct: unknown is <|endoftext|>, BOS opens a turn, EOS/pad close one.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
BOS_TOKEN_ID = IM_START_ID
EOS_TOKEN_ID = IM_END_ID
PAD_TOKEN_ID = IM_END_ID
UNKNOWN_TOKEN_ID = ENDOFTEXT_ID

# Earlier merges must produce the pieces later ones use; each merge adds one token to the vocab.
TINY_MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "Ġ s", "a t",
    "e n", "Ġ w", "o r", "i s", "Ġ c", "e s", "i t", "a n", "Ġ o", "Ġ b",
    "e d", "Ġ f", "in g", "Ġ p", "o u", "Ġa n", "Ġan d", "Ġ m", "l l", "Ġo f",
    "Ġ i", "Ġ h", "a r", "Ġ d", "Ġi n", "a l", "Ġt o", "l e", "Ġ l", "o w",
    "Ġ n", "Ġ e", "i c", "Ġ g", "a s", "Ġi s", "Ġ y", "Ġy ou", "Ġ T", "ĠT he",
    "Ġh e", "Ġw as", "Ġf or", "Ġb e", "Ġo n", "Ġt h", "Ġth at", "Ġw it", "Ġwit h", "l d",
    "Ġw or",
)  # fmt: skip


def _byte_level_alphabet() -> list[str]:
    """The 256 characters GPT-2's byte-level BPE spells bytes with, in GPT-2's vocab order.

    Printable bytes stand for themselves; the rest are shifted past U+00FF so that no token ever
    contains whitespace or control characters (a space becomes "Ġ").
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + offset) for offset in range(len(shifted))]


TINY_TOKENS: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    *_byte_level_alphabet(),
    *("".join(merge.split(" ")) for merge in TINY_MERGES),
)
TINY_VOCAB_SIZE = len(TINY_TOKENS)
assert len(set(TINY_TOKENS)) == TINY_VOCAB_SIZE, "a merge re-creates an existing token"

# ChatML as SmolLM2 writes it, minus SmolLM2's default system prompt so rendered prompts stay short.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- model -------------------------------------------------------------------------------------


def tiny_llama_config(**overrides) -> LlamaConfig:
    """A 2-layer GQA LLaMA small enough to run in milliseconds; `overrides` replace any field."""
    settings = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama_model(config: LlamaConfig | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A float32 model in eval mode whose every weight, norms included, is random but reproducible.

    Norm weights are drawn around 1 rather than left at 1, so a loader that drops or misplaces
    them changes the logits; matrices get std 0.08 so activations neither vanish nor blow up.
    """
    model = LlamaForCausalLM(config or tiny_llama_config()).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # tied embeddings are yielded once
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1.0 + 0.1 * noise if parameter.ndim == 1 else 0.08 * noise)
    return model.eval()


def quantized_reference_model(model: LlamaForCausalLM, quant: str) -> LlamaForCausalLM:
    """A copy of `model` with every 2-D weight rounded through `quant` and back.

    This is exactly what a correct reader of `write_llama_gguf(..., quant=quant)` must reconstruct
    (quantization works within rows, so the q/k row permutation does not change the rounding),
    which lets a loader of a quantized file be held to float32 tolerances, not quantization ones.
    """
    quant_type = GGMLQuantizationType[quant]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.ndim == 2:
                packed = gguf.quants.quantize(parameter.numpy(), quant_type)
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(packed, quant_type)))
    return reference


# --- GGUF writing ------------------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: regroup q/k rows from HF's rotate-half RoPE layout to the
    interleaved-pairs layout GGML's RoPE expects."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names, q/k permuted, in HF (out, in) layout."""
    config = model.config
    state = {name: tensor.detach().to(torch.float32).numpy() for name, tensor in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for block in range(config.num_hidden_layers):
        hf = f"model.layers.{block}"
        gg = f"blk.{block}"
        tensors |= {
            f"{gg}.attn_norm.weight": state[f"{hf}.input_layernorm.weight"],
            f"{gg}.attn_q.weight": llama_cpp_permute(
                state[f"{hf}.self_attn.q_proj.weight"], config.num_attention_heads
            ),
            f"{gg}.attn_k.weight": llama_cpp_permute(
                state[f"{hf}.self_attn.k_proj.weight"], config.num_key_value_heads
            ),
            f"{gg}.attn_v.weight": state[f"{hf}.self_attn.v_proj.weight"],
            f"{gg}.attn_output.weight": state[f"{hf}.self_attn.o_proj.weight"],
            f"{gg}.ffn_norm.weight": state[f"{hf}.post_attention_layernorm.weight"],
            f"{gg}.ffn_gate.weight": state[f"{hf}.mlp.gate_proj.weight"],
            f"{gg}.ffn_up.weight": state[f"{hf}.mlp.up_proj.weight"],
            f"{gg}.ffn_down.weight": state[f"{hf}.mlp.down_proj.weight"],
        }
    tensors["output_norm.weight"] = state["model.norm.weight"]
    # llama.cpp leaves `output.weight` out for tied models; readers then reuse token_embd.
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    return tensors


def _add_tokenizer(writer: GGUFWriter) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(list(TINY_TOKENS))
    writer.add_token_types(
        [TokenType.CONTROL if token in SPECIAL_TOKENS else TokenType.NORMAL for token in TINY_TOKENS]
    )
    writer.add_token_merges(list(TINY_MERGES))
    writer.add_bos_token_id(BOS_TOKEN_ID)
    writer.add_eos_token_id(EOS_TOKEN_ID)
    writer.add_unk_token_id(UNKNOWN_TOKEN_ID)
    writer.add_pad_token_id(PAD_TOKEN_ID)
    # SmolLM2 prompts start with the chat template's <|im_start|>, never an automatic BOS.
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_llama_gguf(
    path: str | Path,
    model: LlamaForCausalLM,
    *,
    arch: str = "llama",
    context_length: int | None = None,
    quant: str | None = None,
) -> Path:
    """Write `model` as a GGUF v3 file the way llama.cpp's converter would, and return its path.

    `arch` only renames `general.architecture` and the `{arch}.*` keys, so e.g. "gpt2" gives an
    unsupported-architecture file whose content is otherwise valid. `quant` names a
    GGMLQuantizationType gguf can quantize to ("Q8_0", "Q4_1", ...): 2-D matrices are stored in it,
    1-D norm weights stay F32, as in a real quantized file; None stores everything F32.
    """
    path = Path(path)
    config = model.config
    quant_type = GGMLQuantizationType[quant] if quant else None
    file_type = LlamaFileType[f"MOSTLY_{quant}"] if quant else LlamaFileType.ALL_F32

    writer = GGUFWriter(path, arch)
    writer.add_type("model")
    writer.add_name("tiny-random-llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(context_length or config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    _add_tokenizer(writer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for name, weight in _gguf_tensors(model).items():
        if quant_type is not None and weight.ndim == 2:
            # Quantized data comes back as uint8 rows of packed blocks; given raw_dtype, the writer
            # turns that byte shape back into the element shape for the tensor header.
            writer.add_tensor(name, gguf.quants.quantize(weight, quant_type), raw_dtype=quant_type)
        else:
            writer.add_tensor(name, weight)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- bad inputs --------------------------------------------------------------------------------

# GGUF header: magic (4 bytes), version (uint32), tensor count (uint64), metadata kv count (uint64).
_GGUF_COUNTS_OFFSET = 8


def write_not_gguf(path: str | Path) -> Path:
    """A file of the size and look of something real that is not GGUF (wrong magic)."""
    path = Path(path)
    path.write_bytes(b"PK\x03\x04" + b"this is a zip archive, not a GGUF model\n" * 64)
    return path


def write_truncated_gguf(src: str | Path, dst: str | Path, keep_fraction: float = 0.6) -> Path:
    """`src` cut short, as by an interrupted download: a valid header, missing data."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: int(len(data) * keep_fraction)])
    return dst


def write_corrupt_gguf(src: str | Path, dst: str | Path) -> Path:
    """`src` at full length with a valid magic and version but garbage counts and metadata."""
    data = bytearray(Path(src).read_bytes())
    # 0xFF makes the counts and the first key's length enormous, so a reader cannot walk the metadata.
    data[_GGUF_COUNTS_OFFSET : _GGUF_COUNTS_OFFSET + 64] = b"\xff" * 64
    dst = Path(dst)
    dst.write_bytes(bytes(data))
    return dst

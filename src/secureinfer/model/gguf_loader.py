"""Read a llama.cpp GGUF file: metadata, config, and weights dequantized to float32 under transformers' names."""

from __future__ import annotations

from pathlib import Path
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ModelLoadError
from .config import ModelConfig

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama",)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def hf_tensor_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def unpermute_rope_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave, back to transformers' half-split RoPE layout.

    The same reshape transformers' GGUF loader applies, so the result is bit-identical to it.
    """
    dim = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


class GGUFModel:
    """One pass over a GGUF file: `GGUFReader` opens it once; everything is read from that reader."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(path)
            self.metadata = {name: field.contents() for name, field in self.reader.fields.items()}
        except Exception as exc:  # GGUFReader raises ValueError, IndexError, struct errors... on damage
            raise _corrupt(path, exc) from exc
        self.architecture = str(self.metadata.get("general.architecture", "?"))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{path} holds a '{self.architecture}' model, which secureinfer does not run",
                f"use a GGUF of a supported architecture ({', '.join(SUPPORTED_ARCHITECTURES)})",
            )
        names = {t.name for t in self.reader.tensors}
        try:
            self.config = ModelConfig.from_gguf_metadata(self.metadata, has_output_tensor="output.weight" in names)
        except (KeyError, ValueError) as exc:
            raise ModelLoadError(
                f"{path} lacks the metadata key {exc}", "re-convert the model with a current llama.cpp"
            ) from exc

    def tensor_types(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.reader.tensors:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts

    def state_dict(self, progress: bool = True) -> dict[str, torch.Tensor]:
        from gguf import dequantize

        cfg, out = self.config, {}
        tensors = self.reader.tensors
        for tensor in tqdm(tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress, leave=False):
            name = hf_tensor_name(tensor.name)
            if name is None:
                continue
            try:
                weights = dequantize(tensor.data, tensor.tensor_type)
            except Exception as exc:
                raise _corrupt(self.path, exc) from exc
            if ".attn_q." in tensor.name:
                weights = unpermute_rope_rows(weights, cfg.num_heads)
            elif ".attn_k." in tensor.name:
                weights = unpermute_rope_rows(weights, cfg.num_kv_heads)
            out[name] = torch.from_numpy(np.copy(weights))
        missing = _expected_names(cfg) - out.keys()
        if missing:
            raise ModelLoadError(
                f"{self.path} is missing {len(missing)} tensors (e.g. {sorted(missing)[0]})",
                "use a complete llama.cpp conversion of the model",
            )
        return out


def _expected_names(cfg: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.num_layers):
        names.update(f"model.layers.{i}.{hf}.weight" for hf in _LAYER_TENSORS.values())
    return names


def _corrupt(path: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is a truncated or corrupt GGUF file ({type(exc).__name__}: {exc})",
        "download or convert the model file again",
    )

"""Read a transformers-style model: a directory with config.json, *.safetensors and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import ModelLoadError
from .config import ModelConfig


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no config.json", "point --model at a transformers model directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc})", "restore the model's config.json") from exc
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise ModelLoadError(
            f"{directory} holds a '{model_type}' model, which secureinfer does not run", "use a LLaMA-family model"
        )
    try:
        return ModelConfig.from_hf_config(data)
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path} lacks {exc}", "restore the model's config.json") from exc


def safetensors_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory} has no *.safetensors weights", "save the model with safetensors")
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of one or many (sharded) files, as float32."""
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            shard = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file ({exc})", "save the weights again") from exc
        out.update({name: t if t.dtype == torch.float32 else t.float() for name, t in shard.items()})
    return out

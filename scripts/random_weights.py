"""Give a transformers directory that holds a LLaMA model's config.json and tokenizer random weights of its shapes.

For timing where the real weights cannot go (a lent GPU machine takes 64 MiB of files; the bundled GGUF is 98 MB):
random weights change no cost, since every op does the same work whatever the values (`bench.scaled_models`).
transformers' own initialisation, seed 0; a tied LM head is left out, as the loaders expect.

    python scripts/random_weights.py DIR
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

directory = Path(sys.argv[1])
config = LlamaConfig.from_pretrained(directory)
torch.manual_seed(0)
weights = LlamaForCausalLM(config).state_dict()
if config.tie_word_embeddings:
    del weights["lm_head.weight"]
save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(directory / "model.safetensors"))
print(f"{directory}: {sum(t.numel() for t in weights.values()) / 1e6:.1f} M random parameters")

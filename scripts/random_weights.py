"""Give a transformers directory that holds a LLaMA model's config.json and tokenizer random weights of its shapes.

For timing where the real weights cannot go (a lent GPU machine takes 64 MiB of files; the bundled GGUF is 98 MB):
random weights change no cost, since every op does the same work whatever the values (`bench.scaled_models`).
`bench.scaled_models.random_weights` (transformers' initialisation, seed 0); a tied LM head is left out, as the
loaders expect. Needs `src` on PYTHONPATH, as `cuda_check.sh` sets it.

    python scripts/random_weights.py DIR
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from secureinfer.bench.scaled_models import random_weights
from secureinfer.model.hf_loader import read_hf_config

directory = Path(sys.argv[1])
config = read_hf_config(directory)
weights = random_weights(config)
if config.tie_word_embeddings:
    del weights["lm_head.weight"]
save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(directory / "model.safetensors"))
print(f"{directory}: {sum(t.numel() for t in weights.values()) / 1e6:.1f} M random parameters")

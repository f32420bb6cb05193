"""Driving a device through a channel with the tiny model, as the enclave does; shared by the channel and view tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gguf_fixtures import PAD_TOKEN_ID, tiny_llama_model
from secureinfer.channel import Channel
from secureinfer.model.config import ModelConfig
from secureinfer.model.kernels import flat_weights
from secureinfer.model.llama import KVCache, Llama
from secureinfer.model.ops import LAYER_OPS

# Two rows, the first left-padded by two, so the device also builds a padding mask.
PROMPT = torch.tensor([[PAD_TOKEN_ID, PAD_TOKEN_ID, 40, 41, 42], [50, 51, 52, 53, 54]])
PROMPT_PAD = [2, 0]
MAX_LEN = 16


def tiny_model() -> Llama:
    reference = tiny_llama_model()
    return Llama.from_state_dict(ModelConfig.from_hf_config(reference.config.to_dict()), reference.state_dict())


def whole_forward(config: ModelConfig) -> list[tuple[str, int | None]]:
    """Every op of a forward pass, in `Llama.forward`'s order: the `plain` plan's single device segment."""
    layers = [(op, layer) for layer in range(config.num_layers) for op in LAYER_OPS]
    return [("embed", None), *layers, ("final_norm", None), ("lm_head", None)]


def start_device(channel: Channel, model: Llama, batch: int) -> dict[str, Tensor]:
    """hello, put_weights (the tied LM head as an alias, not sent twice), new_cache for every layer.

    Returns the weights actually sent.
    """
    channel.request("hello", {"config": model.config.to_dict()})
    weights = flat_weights(model.weights)
    aliases = {"lm_head": "embed"} if weights["lm_head"] is weights["embed"] else {}
    sent = {name: w for name, w in weights.items() if name not in aliases}
    channel.request("put_weights", {"aliases": aliases}, sent)
    layers = list(range(model.config.num_layers))
    channel.request("new_cache", {"batch": batch, "max_len": MAX_LEN, "layers": layers})
    return sent


def run_meta(
    step: int, start: int, tokens: Tensor, pad: list[int] | None, last_only: bool, ops: list, returns: list[str]
) -> dict:
    batch, length = tokens.shape
    return {"step": step, "start": start, "batch": batch, "length": length, "pad": pad,
            "last_only": last_only, "ops": ops, "returns": returns}  # fmt: skip


@dataclass
class Step:
    tokens: Tensor  # what the enclave sent
    logits: Tensor  # what the device returned
    expected: Tensor  # what the in-process model computes


def greedy_steps(channel: Channel, model: Llama, decode_steps: int) -> tuple[list[Step], KVCache]:
    """A prefill of PROMPT (logits for every position) then greedy decode steps, each a whole-forward `run`.

    Returns the steps and the in-process model's KV cache after them.
    """
    ops = whole_forward(model.config)
    reference_cache = model.new_cache(PROMPT.shape[0], MAX_LEN)
    pad_tensor = torch.tensor(PROMPT_PAD)
    tokens, start, steps = PROMPT, 0, []
    for step in range(1 + decode_steps):
        last_only = step > 0
        expected = model.forward(tokens, reference_cache, start, pad_tensor, last_only=last_only)
        meta = run_meta(step, start, tokens, PROMPT_PAD, last_only, ops, ["logits"])
        _, returned = channel.request("run", meta, {"tokens": tokens})
        steps.append(Step(tokens, returned["logits"], expected))
        start += tokens.shape[1]
        tokens = expected[:, -1].argmax(-1, keepdim=True)
    return steps, reference_cache

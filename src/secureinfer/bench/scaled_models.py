"""Measured points of the scaling study: random-weight models of the LLaMA-2-shaped configs, timed through the
boundary exactly as the bench times the real model (same runners, round-robin within each model).

Only shapes whose blinded products the field handles exactly (every inner dimension <= 2048) and that fit this
machine's time are run; the others are listed with the reason. Random weights change no cost: every op does the
same work whatever the values. The prompt is the bench's chat prompt in the bundled tokenizer, so the measured
models take its vocabulary (49,152 for SmolLM2) instead of LLaMA-2's 32,000.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..model import Checkpoint
from ..model.config import ModelConfig
from ..plan import build_plan
from .analytic import exactness
from .speed import bench_cases, summarize, time_round_robin

SCHEMES = ("plain", "enclave", "secureinfer", "hardened")
MAX_PARAMETERS = 400_000_000  # a few minutes per model on 2 cores


def random_checkpoint(config: ModelConfig, like: Checkpoint, seed: int = 0) -> Checkpoint:
    """transformers' own random initialisation of `config`, with `like`'s tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config.to_hf_config()))
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    name = f"random d={config.hidden_size} L={config.num_layers}"
    return Checkpoint(config, weights, like.tokenizer, Path(name), "random", {"seed": seed})


def why_not_measured(config: ModelConfig) -> str | None:
    exact = exactness(build_plan("secureinfer", config))
    if exact != "yes":
        return f"blinded products not exact: {exact.removeprefix('no (').rstrip(')')}"
    if config.num_parameters() > MAX_PARAMETERS:
        return f"{config.num_parameters() / 1e6:,.0f} M parameters: past this bench's {MAX_PARAMETERS / 1e6:,.0f} M"
    return None


def measure(configs: dict[str, ModelConfig], real: Checkpoint, args) -> list[dict]:
    """Per config: decode speed per scheme (median of `args.repeats`), latency vs `plain`, and the per-token time
    breakdown; or why it was not run."""
    schemes = tuple(dict.fromkeys(args.scheme or SCHEMES))
    if "plain" not in schemes:
        schemes = ("plain", *schemes)  # every ratio is to plain, measured beside it
    rows = []
    for name, config in configs.items():
        # The bundled tokenizer's vocabulary, so its chat prompt is valid input (LLaMA-2's 32,000 ids would not
        # hold ChatML's): the LM head is the one cost this changes, and the analytic rows keep 32,000.
        config = dataclasses.replace(config, vocab_size=real.config.vocab_size)
        reason = why_not_measured(config)
        if reason is not None:
            rows.append({"config": name, "parameters": config.num_parameters(), "skipped": reason})
            continue
        checkpoint = real if config == real.config else random_checkpoint(config, real)
        cases = bench_cases(checkpoint.tokenizer, config.max_position_embeddings, None, None, args.max_new_tokens)
        runners = time_round_robin(checkpoint, schemes, cases, args, references=False)
        decode = {r.name: summarize(r.decode_tok_s[cases[0].key]) for r in runners}
        plain = decode["plain"]["median"]
        rows.append({
            "config": name, "parameters": config.num_parameters(), "vocab_size": config.vocab_size, "new_tokens": cases[0].new_tokens,
            "prompt_tokens": len(cases[0].ids), "decode_tok_s": decode,
            "latency_vs_plain": {scheme: plain / d["median"] for scheme, d in decode.items()},
            "measured_per_token": {r.name: r.extra[cases[0].key]["measured_per_token"] for r in runners},
            "offline_pad_ms_per_token": {r.name: r.extra[cases[0].key]["offline_pad_ms_per_token"] for r in runners},
        })  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    measured = [r for r in rows if "skipped" not in r]
    schemes = list(measured[0]["decode_tok_s"]) if measured else []
    lines = [
        "Scaling, measured (random weights, the bundled tokenizer's vocabulary; decode tokens/s, median; latency vs "
        "`plain` beside it; round-robin within each model)",
        "",
        "| config | parameters | " + " | ".join(schemes) + " | enclave / device / transfer ms per token (secureinfer) |",
        "|---|---|" + "---|" * (len(schemes) + 1),
    ]
    for r in rows:
        size = f"{r['parameters'] / 1e6:,.0f} M"
        if "skipped" in r:
            lines.append(f"| {r['config']} | {size} | " + " | ".join("-" for _ in schemes) + f" | not run: {r['skipped']} |")
            continue
        cells = [f"{r['decode_tok_s'][s]['median']:.1f} ({r['latency_vs_plain'][s]:.2f}x)" for s in schemes]
        split = r["measured_per_token"].get("secureinfer")
        times = "-" if split is None else " / ".join(
            f"{split[k] * 1000:.1f}" for k in ("enclave_compute_s", "device_compute_s", "transfer_s")
        )  # fmt: skip
        lines.append(f"| {r['config']} | {size} | " + " | ".join(cells) + f" | {times} |")
    return "\n".join(lines)

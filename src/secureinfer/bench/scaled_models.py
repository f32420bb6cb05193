"""Measured points of the scaling study: random-weight models of the LLaMA-2-shaped configs, timed through the
boundary exactly as the bench times the real model (same runners, round-robin within each model).

Shapes up to `MAX_PARAMETERS` are run, the others listed with the reason. Random weights change no cost: every op
does the same work whatever the values. The prompt is the bench's chat prompt in the bundled tokenizer, so the
measured models take its vocabulary (49,152 for SmolLM2) instead of LLaMA-2's 32,000.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from ..model import Checkpoint
from ..model.config import ModelConfig
from .speed import bench_cases, summarize, time_round_robin

SCHEMES = ("plain", "enclave", "secureinfer", "hardened")
MAX_PARAMETERS = 1_500_000_000  # LLaMA-2-shaped d=2048 (1.4B with this vocabulary); 7B would need ~60 GB
# With every runner alive at once, a model needs ~33 bytes per parameter here (10 GB at 303M: the checkpoint,
# `plain`'s fp32 device, `enclave`'s fp32 copy, each blinded scheme's int8 copies on both sides). Past this, each
# scheme runs round-robin beside its own `plain` instead, in turn (~18 GB at 1.4B for a pair).
ALL_AT_ONCE_PARAMETERS = 500_000_000


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers' own random initialisation of `config`, as a state dict (a tied LM head shares the embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config.to_hf_config()))
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def random_checkpoint(config: ModelConfig, like: Checkpoint, seed: int = 0) -> Checkpoint:
    """`random_weights` of `config`, with `like`'s tokenizer."""
    name = f"random d={config.hidden_size} L={config.num_layers}"
    return Checkpoint(config, random_weights(config, seed), like.tokenizer, Path(name), "random", {"seed": seed})


def why_not_measured(config: ModelConfig) -> str | None:
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
        rows.append(_measure_model(name, config, real, schemes, args))
    return rows


def _measure_model(name: str, config: ModelConfig, real: Checkpoint, schemes: tuple[str, ...], args) -> dict:
    """One model's row; its random checkpoint is freed on return, before the next model is made."""
    checkpoint = real if config == real.config else random_checkpoint(config, real)
    cases = bench_cases(checkpoint.tokenizer, config.max_position_embeddings, None, None, args.max_new_tokens)
    if config.num_parameters() <= ALL_AT_ONCE_PARAMETERS:
        groups = [schemes]
    else:
        groups = [("plain", scheme) for scheme in schemes if scheme != "plain"] or [("plain",)]
    figures: dict[str, dict] = {}
    for group in groups:
        # each later group's plain only sets the ratios of the schemes beside it
        figures |= {scheme: f for scheme, f in _time_group(checkpoint, group, cases, args).items() if scheme not in figures}
        # A closed SecureLM sits in reference cycles, and collection thresholds count objects, not the gigabytes
        # they hold: without this the bench was killed for memory by the fourth model.
        gc.collect()
    return {
        "config": name, "parameters": config.num_parameters(), "vocab_size": config.vocab_size, "new_tokens": cases[0].new_tokens,
        "prompt_tokens": len(cases[0].ids), "round_robin": "all at once" if len(groups) == 1 else "each beside plain",
        **{field: {scheme: f[field] for scheme, f in figures.items()} for field in next(iter(figures.values()))},
    }  # fmt: skip


def _time_group(checkpoint: Checkpoint, group: tuple[str, ...], cases, args) -> dict[str, dict]:
    """Each scheme of `group` (plain first) timed round-robin, with its latency against this group's plain. Returns
    figures only, so the runners and their copies of the model are freed before the next group loads its own."""
    key = cases[0].key
    runners = time_round_robin(checkpoint, group, cases, args, references=False)
    decode = {r.name: summarize(r.decode_tok_s[key]) for r in runners}
    plain = decode[runners[0].name]["median"]
    return {
        r.name: {
            "decode_tok_s": decode[r.name],
            "latency_vs_plain": plain / decode[r.name]["median"],
            "enclave_share": r.enclave_share,  # None: the scheme blinds nothing
            "measured_per_token": r.extra[key]["measured_per_token"],
            "offline_pad_ms_per_token": r.extra[key]["offline_pad_ms_per_token"],
        }
        for r in runners
    }


def _shares(measured: list[dict]) -> dict[str, float]:
    """Each blinded scheme's enclave share, as the first measured model ran it (every model runs the same defaults)."""
    if not measured:
        return {}
    return {scheme: share for scheme, share in measured[0]["enclave_share"].items() if share is not None}


def markdown(rows: list[dict]) -> str:
    measured = [r for r in rows if "skipped" not in r]
    schemes = list(measured[0]["decode_tok_s"]) if measured else []
    lines = [
        "Scaling, measured (random weights, the bundled tokenizer's vocabulary; decode tokens/s, median; latency vs "
        "the `plain` it ran beside; round-robin within each model, all at once or each scheme beside `plain`)",
        "",
        *([f"Enclave share of blinded products: {shares}", ""] if (shares := _shares(measured)) else []),
        "| config | parameters | " + " | ".join(schemes) + " | enclave / device / transfer ms per token (secureinfer) "
        "| round-robin |",
        "|---|---|" + "---|" * (len(schemes) + 2),
    ]
    for r in rows:
        size = f"{r['parameters'] / 1e6:,.0f} M"
        if "skipped" in r:
            lines.append(f"| {r['config']} | {size} | " + " | ".join("-" for _ in schemes) + f" | not run: {r['skipped']} | - |")
            continue
        cells = [f"{r['decode_tok_s'][s]['median']:.1f} ({r['latency_vs_plain'][s]:.2f}x)" for s in schemes]
        split = r["measured_per_token"].get("secureinfer")
        times = "-" if split is None else " / ".join(
            f"{split[k] * 1000:.1f}" for k in ("enclave_compute_s", "device_compute_s", "transfer_s")
        )  # fmt: skip
        lines.append(f"| {r['config']} | {size} | " + " | ".join(cells) + f" | {times} | {r['round_robin']} |")
    return "\n".join(lines)

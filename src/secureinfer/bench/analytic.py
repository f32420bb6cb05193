"""Analytic per-token costs for the bench: cost curves over context, a breakdown by op class, and the
scaling study (LLaMA-2-7B-shaped models and smaller ones of the same proportions), without downloads.

Everything here is computed from plans (`plan_costs`, `op_flops`); nothing runs a model, except the scaling
study's measured points when asked for (scaled_models.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..crypto.quant import activation_qmax
from ..model.config import ModelConfig
from ..plan import PRESETS, build_plan
from ..model.ops import weight_names
from ..plan.costs import op_flops, outsourced, plan_costs, weight_shape
from ..plan.plan import DEVICE, ENCLAVE, LAST_POSITION_OPS, Plan
from . import source_commit

CONTEXTS = (32, 64, 128, 256, 512, 1024, 2048)
SCALING_CONTEXTS = (32, 128, 512, 2048)
MIB = 1 << 20
EPC_LINES = (96 * MIB, 128 * MIB)  # enclave memory marks: a usable SGX1 EPC and the whole 128 MiB EPC
OP_CLASSES = {
    "embed": "embedding",
    "attn_norm": "norms/elementwise", "ffn_norm": "norms/elementwise", "final_norm": "norms/elementwise",
    "attn_residual": "norms/elementwise", "ffn_residual": "norms/elementwise", "swiglu": "norms/elementwise",
    "qkv_proj": "projections", "o_proj": "projections", "gate_up_proj": "projections", "down_proj": "projections",
    "rope": "attention", "attention": "attention",
    "lm_head": "LM head",
    "sample": "sampling",
}  # fmt: skip
PAD_CLASS = "pad precompute (offline)"


def pad_flops(plan: Plan, tokens: int = 1) -> int:
    """Offline FLOPs of the one-time pads a forward of `tokens` positions consumes: u = r W per row, i.e. the
    blinded product itself again (2 per multiply-add) on the device's columns, done ahead of time in the enclave."""
    return sum(
        outsourced(plan, p.op, p.layer, op_flops(p.op, plan.config, 0) * (1 if p.op in LAST_POSITION_OPS else tokens))
        for p in plan.placements
        if p.transform == "blinded"
    )


def blinded_inner_dim(plan: Plan) -> int | None:
    """The largest inner dimension of a blinded product (None: the plan blinds nothing)."""
    dims = [
        weight_shape(name, plan.config)[1]
        for p in plan.placements
        if p.transform == "blinded"
        for name in weight_names(p.op, p.layer)
    ]
    return max(dims, default=None)


def activation_bits(plan: Plan) -> str:
    """The coarsest fixed point a blinded input gets: past an inner dimension of 2048 inputs are quantized more
    coarsely so that the product still unpads exactly (`quant.activation_qmax`)."""
    inner = blinded_inner_dim(plan)
    if inner is None:
        return "-"
    return f"{math.log2(2 * activation_qmax(inner) + 1):.1f} (inner dim {inner})"


def decode_costs(plan: Plan, context: int) -> dict:
    """One decode step at `context` cached positions, with the offline pad work it consumes."""
    costs = plan_costs(plan, context)
    return {
        "context": context,
        "enclave_flops": costs.enclave_flops,
        "offline_pad_flops": pad_flops(plan),
        "device_flops": costs.device_flops,
        "round_trips": costs.round_trips,
        "bytes": costs.bytes_to_device + costs.bytes_from_device,
        "enclave_weight_bytes": costs.enclave_weight_bytes,
        "enclave_kv_bytes": costs.enclave_kv_bytes,
        "enclave_resident_bytes": costs.enclave_resident_bytes,
    }


def breakdown(plan: Plan, context: int) -> dict[str, dict[str, int]]:
    """Decode-step FLOPs per side and op class; the enclave's offline pad work is a class of its own."""
    out = {side: dict.fromkeys(dict.fromkeys(OP_CLASSES.values()), 0) for side in (ENCLAVE, DEVICE)}
    for p in plan.placements:
        work = op_flops(p.op, plan.config, context)
        on_side = outsourced(plan, p.op, p.layer, work) if p.transform == "blinded" else work
        out[p.side][OP_CLASSES[p.op]] += on_side
        out[ENCLAVE][OP_CLASSES[p.op]] += work - on_side  # the enclave's own columns of a blinded product
    out[ENCLAVE][PAD_CLASS] = pad_flops(plan)
    return out


def model_analytic(config: ModelConfig, schemes, breakdown_context: int, enclave_shares: dict | None = None) -> dict:
    """Cost curves over context (clipped to the model's window) and the op-class breakdown at one context, each
    scheme at its enclave share (`enclave_shares`; 0 where not given)."""
    contexts = [c for c in CONTEXTS if c <= config.max_position_embeddings]
    shares = enclave_shares or {}
    plans = {scheme: build_plan(scheme, config).with_enclave_share(shares.get(scheme, 0.0)) for scheme in schemes}
    return {
        "curve": {scheme: [decode_costs(plan, c) for c in contexts] for scheme, plan in plans.items()},
        "breakdown_context": breakdown_context,
        "breakdown": {scheme: breakdown(plan, breakdown_context) for scheme, plan in plans.items()},
    }


def llama2_shaped(hidden: int, layers: int) -> ModelConfig:
    """LLaMA-2-7B's proportions at width `hidden`: head_dim 128, MHA, FFN 2.6875 d rounded to a multiple of 64,
    vocab 32000, untied; at hidden 4096 and 32 layers it is LLaMA-2-7B's shape."""
    heads = hidden // 128
    return ModelConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=64 * round(2.6875 * hidden / 64), num_layers=layers,
        num_heads=heads, num_kv_heads=heads, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip


SCALED_SHAPES = ((512, 8), (768, 12), (1024, 16), (2048, 24), (4096, 32))


def scaling_configs(model: ModelConfig, model_name: str) -> dict[str, ModelConfig]:
    configs = {model_name: model}
    for hidden, layers in SCALED_SHAPES:
        name = "LLaMA-2-7B shape" if (hidden, layers) == (4096, 32) else f"LLaMA-2-shaped d={hidden} L={layers}"
        configs[name] = llama2_shaped(hidden, layers)
    return configs


def scaling(configs: dict[str, ModelConfig], schemes=tuple(PRESETS), contexts=SCALING_CONTEXTS) -> dict:
    """Per config: size and the coarsest blinded input's fixed point; per config, scheme and context: the per-token costs and
    which enclave-memory lines the resident bytes cross."""
    out = {"contexts": list(contexts), "epc_lines_bytes": list(EPC_LINES), "configs": [], "rows": []}
    for name, config in configs.items():
        plans = {scheme: build_plan(scheme, config) for scheme in schemes}
        out["configs"].append({
            "name": name, "parameters": config.num_parameters(), "hidden": config.hidden_size,
            "ffn": config.intermediate_size, "layers": config.num_layers,
            "largest_inner_dim": max(config.hidden_size, config.q_size, config.intermediate_size),
            "activation_bits": activation_bits(build_plan("secureinfer", config)),
        })  # fmt: skip
        for scheme, plan in plans.items():
            for context in contexts:
                costs = decode_costs(plan, context)
                resident = costs["enclave_resident_bytes"]
                crosses = [f"{line // MIB} MiB" for line in EPC_LINES if resident > line]
                out["rows"].append({"config": name, "scheme": scheme, **costs, "crosses": crosses, "activation_bits": activation_bits(plan)})
    return out


def scaling_markdown(report: dict) -> str:
    lines = [
        "Scaling, analytic (per decode token; enclave FLOPs online + offline pads; resident = enclave weights + KV cache)",
        "",
        "| config | parameters | d | FFN | layers | `secureinfer` activation bits |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        lines.append(f"| {c['name']} | {c['parameters'] / 1e6:,.0f} M | {c['hidden']} | {c['ffn']} | {c['layers']} | {c['activation_bits']} |")
    lines += [
        "",
        "| config | scheme | context | enclave GFLOPs (online + pads) | device GFLOPs | round trips | bytes | "
        "enclave resident MiB | crosses | activation bits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['config']} | {r['scheme']} | {r['context']} | {r['enclave_flops'] / 1e9:.4f} + {r['offline_pad_flops'] / 1e9:.4f} "
            f"| {r['device_flops'] / 1e9:.4f} | {r['round_trips']} | {r['bytes']:,} | {r['enclave_resident_bytes'] / MIB:,.1f} "
            f"| {', '.join(r['crosses']) or '-'} | {r['activation_bits']} |"
        )
    return "\n".join(lines)


def analytic_markdown(analytic: dict) -> str:
    lines = ["Per decode token by context, analytic: enclave GFLOPs (online + offline pads) / device GFLOPs / bytes", ""]
    curve = analytic["curve"]
    contexts = [point["context"] for point in next(iter(curve.values()))]
    lines += ["| scheme | " + " | ".join(str(c) for c in contexts) + " |", "|---|" + "---|" * len(contexts)]
    for scheme, points in curve.items():
        cells = [
            f"{p['enclave_flops'] / 1e9:.4f} + {p['offline_pad_flops'] / 1e9:.4f} / {p['device_flops'] / 1e9:.4f} / {p['bytes']:,}"
            for p in points
        ]
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    first = next(iter(analytic["breakdown"].values()))
    columns = [(side, cls) for side, classes in first.items() for cls in classes]
    lines += [
        "",
        f"FLOPs by op class at context {analytic['breakdown_context']} (per decode token, MFLOPs):",
        "",
        "| scheme | " + " | ".join(f"{side}: {cls}" for side, cls in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for scheme, sides in analytic["breakdown"].items():
        lines.append(f"| {scheme} | " + " | ".join(f"{sides[side][cls] / 1e6:,.2f}" for side, cls in columns) + " |")
    return "\n".join(lines)


def run_scaling(args) -> dict:
    from ..model import load_checkpoint
    from .speed import DEFAULT_SCHEMES

    checkpoint = load_checkpoint(args.model, progress=not args.quiet)
    schemes = tuple(dict.fromkeys(args.scheme or DEFAULT_SCHEMES))
    configs = scaling_configs(checkpoint.config, Path(checkpoint.source).stem)
    report = {
        **checkpoint.identity(),
        "source_commit": source_commit(),
        "scaling": scaling(configs, schemes),
        "analytic": model_analytic(checkpoint.config, schemes, min(256, checkpoint.config.max_position_embeddings)),
    }
    text = f"code {report['source_commit'] or 'unknown'}\n\n" + scaling_markdown(report["scaling"])
    if args.scaling_measured:
        from . import scaled_models  # runs models: only when asked for

        report["scaling"]["measured"] = scaled_models.measure(configs, checkpoint, args)
        text += "\n\n" + scaled_models.markdown(report["scaling"]["measured"])
    if args.plots:
        from .plots import write_plots

        report["plots"] = [str(p) for p in write_plots(report, args.plots)]
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else text + "\n\n" + analytic_markdown(report["analytic"]))
    return report

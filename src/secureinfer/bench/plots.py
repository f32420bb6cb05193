"""PNG plots of a bench report, drawn from the report's own numbers (so they match its JSON and markdown).

(a) per-token cost vs context, per scheme; (b) FLOPs by op class and side, per scheme; (c) scaling: enclave
memory and FLOPs vs model size with the EPC lines; (d) measured decode speed vs prompt length (a sweep).
Each is drawn when its section is in the report.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1 << 20


def write_plots(report: dict, directory: str | Path) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    if "analytic" in report:
        drawn += [_cost_vs_context(report["analytic"], out / "cost_vs_context.png")]
        drawn += [_breakdown(report["analytic"], out / "breakdown_by_op_class.png")]
    if "scaling" in report:
        drawn += [_scaling(report["scaling"], out / "scaling.png")]
    if "sweep" in report:
        drawn += [_sweep(report["sweep"], out / "decode_vs_prompt_length.png")]
    return drawn


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cost_vs_context(analytic: dict, path: Path) -> Path:
    panels = (
        ("enclave FLOPs, online", lambda p: p["enclave_flops"]),
        ("enclave FLOPs, offline pads", lambda p: p["offline_pad_flops"]),
        ("device FLOPs", lambda p: p["device_flops"]),
        ("bytes crossing", lambda p: p["bytes"]),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(18, 4.5))
    for ax, (title, value) in zip(axes, panels):
        for scheme, points in analytic["curve"].items():
            values = [value(p) for p in points]
            if any(values):  # log axes: a scheme with none of this cost (plain's enclave FLOPs) is left out
                ax.plot([p["context"] for p in points], values, marker="o", label=scheme)
        ax.set(xscale="log", yscale="log", xlabel="context (cached positions)", title=f"{title} per token")
        ax.legend(fontsize=6)
    return _save(fig, path)


def _breakdown(analytic: dict, path: Path) -> Path:
    schemes = list(analytic["breakdown"])
    sides = list(next(iter(analytic["breakdown"].values())))
    fig, axes = plt.subplots(1, len(sides), figsize=(14, 5), sharey=True)
    for ax, side in zip(axes, sides):
        bottom = [0.0] * len(schemes)
        for cls in analytic["breakdown"][schemes[0]][side]:
            heights = [analytic["breakdown"][s][side][cls] for s in schemes]
            ax.bar(schemes, heights, bottom=bottom, label=cls)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set(title=f"{side} FLOPs per token at context {analytic['breakdown_context']}", ylabel="FLOPs")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _scaling(scaling: dict, path: Path) -> Path:
    context = max(scaling["contexts"])
    rows = [r for r in scaling["rows"] if r["context"] == context]
    size = {c["name"]: c["parameters"] for c in scaling["configs"]}
    measured = sorted((r for r in scaling.get("measured", []) if "skipped" not in r), key=lambda r: r["parameters"])
    fig, axes = plt.subplots(1, 3 if measured else 2, figsize=(21 if measured else 14, 5))
    memory, flops = axes[:2]
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        mine = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: size[r["config"]])
        x = [size[r["config"]] for r in mine]
        if any(r["enclave_resident_bytes"] for r in mine):  # log axes: schemes that hold nothing are left out
            memory.plot(x, [r["enclave_resident_bytes"] / MIB for r in mine], marker="o", label=scheme)
        flops.plot(x, [r["enclave_flops"] + r["offline_pad_flops"] for r in mine], marker="o", label=scheme)
    for line in scaling["epc_lines_bytes"]:
        memory.axhline(line / MIB, color="gray", linestyle="--")
        memory.annotate(f"{line // MIB} MiB", (min(size.values()), line / MIB), fontsize=8)
    memory.set(xscale="log", yscale="log", xlabel="parameters", ylabel="MiB",
               title=f"enclave resident memory (weights + KV) at context {context}")  # fmt: skip
    flops.set(xscale="log", yscale="log", xlabel="parameters", title="enclave FLOPs per token (online + offline pads)")
    memory.legend(fontsize=7)
    flops.legend(fontsize=7)
    if measured:
        latency = axes[2]
        for scheme in measured[0]["latency_vs_plain"]:
            latency.plot([r["parameters"] for r in measured], [r["latency_vs_plain"][scheme] for r in measured],
                         marker="o", label=scheme)  # fmt: skip
        latency.set(xscale="log", xlabel="parameters", ylabel="x plain",
                    title="measured decode latency vs plain (random weights)")  # fmt: skip
        latency.legend(fontsize=7)
    return _save(fig, path)


def _sweep(cases: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ("-", "--", ":", "-.")  # one per generation length; one colour per runner
    for new_tokens, style in zip(dict.fromkeys(c["new_tokens"] for c in cases), styles):
        mine = [c for c in cases if c["new_tokens"] == new_tokens]
        for index, runner in enumerate(mine[0]["results"]):
            ax.plot(
                [c["prompt_tokens"] for c in mine], [c["results"][runner]["decode_tok_s"]["median"] for c in mine],
                marker="o", linestyle=style, color=f"C{index}", label=f"{runner}, {new_tokens} new",
            )  # fmt: skip
    ax.set(xscale="log", xlabel="prompt tokens", ylabel="decode tokens/s (median)", title="measured decode speed")
    ax.legend(fontsize=6)
    return _save(fig, path)

"""Issue 7's targets, judged against one bench case's measurements. The bounds are fixed: a missed target is
a result to report, never a reason to move the bound.

T1 `plain` decodes at least as fast as transformers' `generate`.
T2 online decode latency (pads made before the request): `secureinfer` <= 1.3x `plain`'s, `hardened` <= 1.5x.
T3 `secureinfer`'s enclave work per token (online + offline pads) <= 1/5 of the `enclave` baseline's.
T4 `secureinfer` crosses the boundary at most 4 times per layer + 1 per token, and transfer is < 10% of decode time.
"""

from __future__ import annotations

import operator

RELATIONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}
PLAIN_VS_TRANSFORMERS, SECUREINFER_LATENCY, HARDENED_LATENCY = 1.0, 1.3, 1.5
ENCLAVE_WORK_FRACTION, TRANSFER_FRACTION = 1 / 5, 0.10


def target(key: str, name: str, measured: float | None, relation: str, bound: float, unit: str = "x", why_missing: str = "") -> dict:
    """`met` is None when the run did not measure it (a runner it needs was not selected)."""
    return {
        "id": key, "name": name, "measured": measured, "relation": relation, "bound": bound, "unit": unit,
        "met": None if measured is None else RELATIONS[relation](measured, bound),
        **({"not_measured": why_missing} if measured is None else {}),
    }  # fmt: skip


def round_trip_bound(num_layers: int) -> int:
    return 4 * num_layers + 1


def judge(case: dict, num_layers: int, transformers: str) -> list[dict]:
    """The targets for one case: `case` holds `results` (per runner), `ratios` and `analytic_per_token`."""
    results, ratios, analytic = case["results"], case["ratios"], case["analytic_per_token"]

    def measured(runner: str, value):
        return value(results[runner]) if runner in results else None

    def needs(*runners: str) -> str:
        return f"run with --scheme {' --scheme '.join(runners)}"

    def latency_vs_plain(scheme: str):
        # Latency per token is 1 / decode speed, so the latency ratio is plain's speed over the scheme's.
        return 1 / ratios[scheme]["decode_vs_plain"] if scheme in results and "plain" in results else None

    def work_per_token(r: dict) -> float:
        return r["measured_per_token"]["enclave_compute_s"] + r["offline_pad_ms_per_token"] / 1000

    secure, baseline = analytic["secureinfer"], analytic["enclave"]
    enclave_time = measured("enclave", lambda r: r["measured_per_token"]["enclave_compute_s"])
    secure_time = measured("secureinfer", work_per_token)
    return [
        target(
            "T1", "plain decode speed vs transformers generate",
            ratios["plain"].get("decode_vs_transformers") if "plain" in results and transformers in results else None,
            ">=", PLAIN_VS_TRANSFORMERS, why_missing=needs("plain"),
        ),
        target("T2", "secureinfer decode latency vs plain", latency_vs_plain("secureinfer"), "<=", SECUREINFER_LATENCY,
               why_missing=needs("plain", "secureinfer")),
        target("T2", "hardened decode latency vs plain", latency_vs_plain("hardened"), "<=", HARDENED_LATENCY,
               why_missing=needs("plain", "hardened")),
        target(
            "T3", "secureinfer enclave FLOPs per token (online + offline pads) vs enclave's, analytic",
            (secure["enclave_flops"] + secure["offline_pad_flops"]) / baseline["enclave_flops"], "<=", ENCLAVE_WORK_FRACTION,
        ),
        target(
            "T3", "secureinfer enclave time per token (compute + offline pads) vs enclave's compute, measured",
            secure_time / enclave_time if secure_time is not None and enclave_time else None, "<=", ENCLAVE_WORK_FRACTION,
            why_missing=needs("enclave", "secureinfer"),
        ),
        target(
            "T4", "secureinfer round trips per token", measured("secureinfer", lambda r: r["measured_per_token"]["round_trips"]),
            "<=", round_trip_bound(num_layers), unit="", why_missing=needs("secureinfer"),
        ),
        target(
            "T4", "secureinfer transfer time per token vs decode time per token",
            # Decode time per token is 1 / decode speed; transfer per token includes the prompt's, amortized.
            measured("secureinfer", lambda r: r["measured_per_token"]["transfer_s"] * r["decode_tok_s"]["median"]),
            "<", TRANSFER_FRACTION, unit="", why_missing=needs("secureinfer"),
        ),
    ]


def describe(t: dict) -> str:
    if t["met"] is None:
        return f"- [ ] {t['id']} {t['name']}: not measured ({t['not_measured']}); bound {t['relation']} {t['bound']:g}{t['unit']}"
    verdict = "met" if t["met"] else "missed"
    return (
        f"- [{'x' if t['met'] else ' '}] {t['id']} {t['name']}: {t['measured']:.4g}{t['unit']} "
        f"(bound {t['relation']} {t['bound']:g}{t['unit']}): {verdict}"
    )


def cell(t: dict) -> str:
    """A compact form for the sweep's table."""
    if t["met"] is None:
        return "-"
    return f"{t['measured']:.4g}{t['unit']} {'met' if t['met'] else 'missed'}"

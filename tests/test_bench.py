"""The speed bench on the tiny model: every runner reports, and each scheme's measured traffic matches its plan."""

from __future__ import annotations

from argparse import Namespace

import pytest

from secureinfer.bench.speed import DEFAULT_SCHEMES, ENGINE, TRANSFORMERS, run_speed_bench, to_markdown


@pytest.fixture(scope="module")
def report(tiny_gguf):
    args = Namespace(
        model=str(tiny_gguf), scheme=None, threads=None, channel="process", device="cpu", quiet=True,
        max_new_tokens=6, repeats=2, json=True, out=None, prompt_lengths=None, gen_lengths=None, pads="online", plots=None,
    )  # fmt: skip
    return run_speed_bench(args)


def test_every_runner_is_timed_side_by_side(report):
    assert set(report["results"]) == {ENGINE, TRANSFORMERS, *DEFAULT_SCHEMES} >= {"secureinfer", "hardened"}
    for result in report["results"].values():
        assert len(result["decode_tok_s"]["runs"]) == 2 and result["decode_tok_s"]["median"] > 0
    assert set(report["ratios"]["plain"]) == {"decode_vs_transformers", "decode_vs_plain", "decode_vs_enclave"}
    assert report["ratios"]["plain"]["decode_vs_plain"] == 1.0


def test_scheme_traffic_is_measured_and_matches_the_analytic_figures(report):
    for scheme in DEFAULT_SCHEMES:
        measured, analytic = (report["results"][scheme][k] for k in ("measured_per_token", "analytic_per_token"))
        for key in ("round_trips", "bytes_to_device", "bytes_from_device"):
            assert measured[key] == pytest.approx(analytic[key]), (scheme, key)
    plain = report["results"]["plain"]["measured_per_token"]
    assert plain["round_trips"] == 1 and plain["device_compute_s"] > 0 and plain["enclave_compute_s"] == 0
    assert report["results"]["enclave"]["measured_per_token"]["enclave_compute_s"] > 0
    hardened, secure = report["results"]["hardened"], report["results"]["secureinfer"]
    assert hardened["integrity_ms_per_token"] > 0 and secure["integrity_ms_per_token"] == 0
    assert secure["offline_pad_macs_per_token"] > 0 and secure["offline_pad_ms_per_token"] >= secure["stalled_pad_ms_per_token"]


def test_the_markdown_shows_the_breakdown(report):
    text = to_markdown(report)
    assert "| plain |" in text and "transfer ms" in text and "second load" in text

"""The speed bench on the tiny model: every runner reports, and each scheme's measured traffic matches its plan."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from secureinfer.bench.speed import DEFAULT_SCHEMES, ENGINE, TRANSFORMERS, run_speed_bench, to_markdown


@pytest.fixture(scope="module")
def report(tiny_gguf):
    args = Namespace(
        model=str(tiny_gguf), scheme=None, threads=None, channel="process", device="cpu", quiet=True,
        max_new_tokens=6, repeats=2, json=True, out=None, prompt_lengths=None, gen_lengths=None, pads="online", plots=None, enclave_share=None,
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
    assert "| plain |" in text and "transfer ms" in text and "second load" in text and "T4 secureinfer round trips per token" in text


def test_online_pads_keep_the_request_from_making_any(report):
    """The default run made every pad before timing: none is made on the request path, all are counted offline."""
    assert report["pads"] == "online"
    for scheme in ("secureinfer", "hardened", "kvmix"):
        result = report["results"][scheme]
        assert result["stalled_pad_ms_per_token"] == 0, scheme
        assert result["offline_pad_ms_per_token"] > 0 and result["offline_pad_macs_per_token"] > 0, scheme


def test_the_targets_are_judged_against_this_runs_numbers(report):
    targets = {(t["id"], t["name"]): t for t in report["targets"]}
    round_trips = targets["T4", "secureinfer round trips per token"]
    assert round_trips["bound"] == 4 * 2 + 1  # the tiny model has 2 layers
    assert round_trips["measured"] == report["results"]["secureinfer"]["measured_per_token"]["round_trips"]
    assert round_trips["met"] == (round_trips["measured"] <= 9)
    latency = targets["T2", "secureinfer decode latency vs plain"]
    speeds = {name: report["results"][name]["decode_tok_s"]["median"] for name in ("plain", "secureinfer")}
    assert latency["measured"] == pytest.approx(speeds["plain"] / speeds["secureinfer"])
    assert latency["met"] == (latency["measured"] <= 1.3)
    text = to_markdown(report)
    assert all(f"{t['id']} {t['name']}" in text for t in report["targets"])


def test_the_report_names_the_model_by_file_and_hash_not_by_a_path_of_this_machine(report, tiny_gguf):
    from secureinfer.model.checkpoint import file_sha256

    assert report["model"] == tiny_gguf.name and report["model_sha256"] == file_sha256(tiny_gguf)
    assert str(tiny_gguf.parent) not in json.dumps(report)


def test_host_steal_is_read_off_proc_stat_per_run_and_for_the_whole_bench(report):
    from secureinfer.bench.steal import CpuTimes, parse_cpu_times, steal_share

    before = parse_cpu_times("cpu  100 0 50 800 10 0 5 35 7 0\ncpu0 50 0 25 400 5 0 2 18 3 0\nintr 1\n")
    after = parse_cpu_times("cpu  160 0 70 900 10 0 5 55 9 0\ncpu0 80 0 35 450 5 0 2 28 4 0\n")
    # guest (7, 9) is inside user already: totals 1000 and 1200, steal 35 and 55, so 20 of 200 ticks
    assert before == CpuTimes(steal=35, total=1000) and after == CpuTimes(steal=55, total=1200)
    assert steal_share(before, after) == pytest.approx(0.1)
    assert steal_share(before, before) is None and steal_share(None, after) is None
    assert parse_cpu_times("cpu  1 2 3 4\n") is None and parse_cpu_times("intr 5\n") is None
    assert 0 <= report["cpu_steal_share"] <= 1  # Linux: the whole bench spans many ticks
    for name, result in report["results"].items():
        steal = result["cpu_steal_share"]  # None only where every run was shorter than a clock tick
        assert steal is None or (len(steal["runs"]) <= 2 and 0 <= steal["min"] <= steal["max"] <= 1), name
    assert "host steal, % of CPU time" in to_markdown(report) and "(steal)" in to_markdown(report)

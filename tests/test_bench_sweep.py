"""The bench's context sweep, scaling study and plots on the tiny model; and its CLI errors."""

from __future__ import annotations

import dataclasses
from argparse import Namespace

import pytest
import torch

from secureinfer.bench import scaled_models
from secureinfer.bench.analytic import EPC_LINES, MIB, scaling, scaling_configs
from secureinfer.bench.speed import TRANSFORMERS, bench_cases, run_speed_bench, sweep_prompt
from secureinfer.errors import InvalidRequestError
from secureinfer.model import load_checkpoint
from secureinfer.plan import build_plan
from test_cli import assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_gguf):
    return load_checkpoint(tiny_gguf, progress=False)


@pytest.mark.parametrize("tokens", [1, 8, 37, 100, 7000])  # 7000: longer than the text, so it repeats
def test_sweep_prompts_have_exactly_the_requested_tokens(tiny_checkpoint, tokens):
    text, ids = sweep_prompt(tiny_checkpoint.tokenizer, tokens)
    assert len(ids) == tokens and tiny_checkpoint.tokenizer.encode(text) == ids


def test_a_sweep_that_outgrows_the_context_is_refused(tiny_checkpoint):
    with pytest.raises(InvalidRequestError, match="needs 130 positions"):
        bench_cases(tiny_checkpoint.tokenizer, 128, (32, 120), (4, 10), 64)


@pytest.fixture(scope="module")
def sweep(tiny_gguf, tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    args = Namespace(
        model=str(tiny_gguf), scheme=["plain", "secureinfer"], threads=None, channel="inprocess", device="cpu",
        quiet=True, max_new_tokens=64, repeats=1, json=True, out=None, prompt_lengths=(8, 24), gen_lengths=(3, 5),
        pads="inline", plots=str(plots), enclave_share=None,
    )  # fmt: skip
    return run_speed_bench(args)


def test_the_sweep_times_every_case_side_by_side(sweep):
    assert [(c["prompt_tokens"], c["new_tokens"]) for c in sweep["sweep"]] == [(8, 3), (8, 5), (24, 3), (24, 5)]
    assert sweep["pads"] == "inline"
    for case in sweep["sweep"]:
        assert set(case["results"]) >= {TRANSFORMERS, "plain", "secureinfer"}
        secure = case["results"]["secureinfer"]
        assert len(secure["decode_tok_s"]["runs"]) == 1 and secure["decode_tok_s"]["median"] > 0
        # Traffic follows the case's own prompt: the prefill's bytes spread over its own new tokens.
        measured, analytic = secure["measured_per_token"], secure["analytic_per_token"]
        assert measured["bytes_to_device"] == pytest.approx(analytic["bytes_to_device"])
        context = case["prompt_tokens"] + case["new_tokens"] // 2
        assert case["analytic_per_token"]["secureinfer"]["context"] == context
    longer, shorter = (c["results"]["secureinfer"]["analytic_per_token"]["enclave_flops"] for c in sweep["sweep"][3:1:-1])
    assert longer > shorter  # attention grows with the context, and it sits in the enclave


def test_plots_are_written(sweep):
    names = {p.rsplit("/", 1)[-1] for p in sweep["plots"]}
    assert names == {"cost_vs_context.png", "breakdown_by_op_class.png", "decode_vs_prompt_length.png"}
    for path in sweep["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC


def test_scaling_flags_epc_crossings_and_the_blinded_inputs_precision(tiny_checkpoint):
    report = scaling(scaling_configs(tiny_checkpoint.config, "tiny"))
    configs = {c["name"]: c for c in report["configs"]}
    assert configs["LLaMA-2-7B shape"]["parameters"] == pytest.approx(6.74e9, rel=0.01)
    # 17-bit inputs up to an inner dimension of 2048; past it, as many bits as keep |x W| < P/2
    assert configs["tiny"]["activation_bits"].startswith("17.0 ")
    assert configs["LLaMA-2-shaped d=1024 L=16"]["activation_bits"] == "16.6 (inner dim 2752)"
    assert configs["LLaMA-2-7B shape"]["activation_bits"] == "14.6 (inner dim 11008)"
    for row in report["rows"]:
        crossed = {f"{line // MIB} MiB" for line in EPC_LINES if row["enclave_resident_bytes"] > line}
        assert set(row["crosses"]) == crossed
        assert row["enclave_resident_bytes"] == row["enclave_weight_bytes"] + row["enclave_kv_bytes"]
    rows = {(r["config"], r["scheme"], r["context"]): r for r in report["rows"]}
    assert rows["tiny", "enclave", 32]["crosses"] == []  # a tiny model fits any EPC
    assert rows["LLaMA-2-7B shape", "enclave", 2048]["crosses"] == ["96 MiB", "128 MiB"]
    assert rows["LLaMA-2-7B shape", "plain", 2048]["activation_bits"] == "-"  # nothing blinded, nothing to limit
    assert rows["LLaMA-2-7B shape", "secureinfer", 32]["round_trips"] == len(build_plan("secureinfer", scaling_configs(
        tiny_checkpoint.config, "tiny")["LLaMA-2-7B shape"]).device_segments) == 4 * 32 + 1


def test_bench_cli_refuses_bad_lengths(tiny_gguf, tmp_path):
    assert_one_line_error(run_cli(["bench", "--prompt-lengths", "abc"]), "--prompt-lengths")
    # --quiet: a first load of the model would print its progress bar to stderr
    assert_one_line_error(run_cli(["bench", "--model", str(tiny_gguf), "--prompt-lengths", "200", "--quiet"]), "context holds 128")
    assert_one_line_error(run_cli(["bench", "--model", str(tiny_gguf), "--scaling-measured"]), "without --scaling")
    scaling_run = run_cli(["bench", "--scaling", "--model", str(tiny_gguf), "--plots", str(tmp_path), "--quiet"])
    assert scaling_run.returncode == 0, scaling_run.stderr
    assert "LLaMA-2-7B shape" in scaling_run.stdout and (tmp_path / "scaling.png").read_bytes().startswith(PNG_MAGIC)


def test_bench_out_gets_its_folder_made_first_and_a_folder_is_refused_before_any_work(tiny_gguf, tmp_path):
    """A report the bench cannot write must fail before the minutes of measuring, not after them."""
    out = tmp_path / "not" / "yet" / "scaling.json"
    run = run_cli(["bench", "--scaling", "--model", str(tiny_gguf), "--out", str(out), "--quiet"])
    assert run.returncode == 0, run.stderr
    assert "LLaMA-2-7B shape" in out.read_text()
    refused = run_cli(["bench", "--model", str(tiny_gguf), "--out", str(tmp_path), "--quiet"])
    assert_one_line_error(refused, "is a directory")
    assert "give the path of a JSON file" in refused.stderr and refused.stdout == ""


def test_scaled_models_are_timed_beside_plain_in_groups_or_skipped_with_the_reason(tiny_checkpoint, monkeypatch):
    config = tiny_checkpoint.config
    # an FFN two field slices wide: blinded and checked exactly like any other (its inputs quantize more coarsely)
    wider = dataclasses.replace(config, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=4096)
    deeper = dataclasses.replace(config, num_layers=16)
    assert config.num_parameters() < wider.num_parameters() < deeper.num_parameters()
    monkeypatch.setattr(scaled_models, "ALL_AT_ONCE_PARAMETERS", config.num_parameters())
    monkeypatch.setattr(scaled_models, "MAX_PARAMETERS", wider.num_parameters())
    args = Namespace(scheme=["secureinfer", "hardened"], channel="inprocess", device="cpu", threads=None, pads="online",
                     repeats=1, max_new_tokens=3, enclave_share=None)  # fmt: skip
    rows = scaled_models.measure({"tiny": config, "tiny, wider FFN": wider, "tiny, deeper": deeper}, tiny_checkpoint, args)
    together, in_pairs, skipped = rows
    assert (together["round_robin"], in_pairs["round_robin"]) == ("all at once", "each beside plain")
    for row, model in ((together, config), (in_pairs, wider)):
        assert set(row["decode_tok_s"]) == {"plain", "secureinfer", "hardened"}  # plain joins: every ratio is to it
        assert row["latency_vs_plain"]["plain"] == 1.0 and row["latency_vs_plain"]["hardened"] > 0
        assert row["measured_per_token"]["secureinfer"]["round_trips"] == 4 * model.num_layers + 1
        # the shares each scheme ran at: an in-process device takes every column; plain blinds nothing
        assert row["enclave_share"] == {"plain": None, "secureinfer": 0.0, "hardened": 0.0}
    assert skipped["skipped"] == f"{deeper.num_parameters() / 1e6:,.0f} M parameters: past this bench's {wider.num_parameters() / 1e6:,.0f} M"
    text = scaled_models.markdown(rows)
    assert "not run: " in text and "| each beside plain |" in text and "| all at once |" in text
    assert "Enclave share of blinded products: {'secureinfer': 0.0, 'hardened': 0.0}" in text
    other = scaled_models.random_checkpoint(config, tiny_checkpoint, seed=1)
    assert other.tokenizer is tiny_checkpoint.tokenizer and set(other.weights) >= {"model.embed_tokens.weight"}
    assert not torch.equal(other.weights["model.embed_tokens.weight"], tiny_checkpoint.weights["model.embed_tokens.weight"])



def test_reports_name_the_commit_they_measured():
    import subprocess
    from pathlib import Path

    from secureinfer.bench import source_commit

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    assert source_commit().removesuffix("+changes") == head.stdout.strip()

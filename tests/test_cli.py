"""The command line through a real subprocess: every bad input is one line (problem; fix) on stderr
and exit code 2, never a traceback; good runs print what the Python API computes."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gguf_fixtures import (
    TINY_VOCAB_SIZE,
    write_corrupt_gguf,
    write_llama_gguf,
    write_not_gguf,
    write_truncated_gguf,
)
from secureinfer import cli
from secureinfer.api import SecureLM

EXIT_USAGE = 2


def run_cli(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "secureinfer", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def run_cli_concurrently(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Each run spends ~2 s importing torch; running them side by side keeps the module fast."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_cli, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_one_line_error(result: subprocess.CompletedProcess, keyword: str) -> None:
    """Exit 2, nothing on stdout, and stderr is a single `problem; fix` line whose problem names `keyword`."""
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    problem, separator, fix = lines[0].rpartition("; ")
    assert separator and fix.strip(), f"no fix in {lines[0]!r}"
    assert keyword in problem, f"{keyword!r} not in {problem!r}"


# --- bad input ---------------------------------------------------------------------------------

# Case name -> (arguments, a word the problem must contain). "{name}" is a path from `model_files`.
BAD_INPUT_CASES: dict[str, tuple[list[str], str]] = {
    "missing-model": (["generate", "hi", "--model", "/nonexistent/x.gguf"], "does not exist"),
    "info-missing-model": (["info", "/nonexistent/x.gguf"], "does not exist"),
    "not-gguf": (["generate", "hi", "--model", "{not_gguf}"], "not a GGUF"),
    "truncated-gguf": (["generate", "hi", "--model", "{truncated}"], "corrupt"),
    "corrupt-gguf": (["generate", "hi", "--model", "{corrupt}"], "corrupt"),
    "info-corrupt-gguf": (["info", "{corrupt}"], "corrupt"),
    "unsupported-architecture": (["generate", "hi", "--model", "{gpt2}"], "'gpt2'"),
    "empty-prompt": (["generate", "", "--model", "{tiny}"], "empty"),
    "blank-prompt": (["generate", "   ", "--model", "{tiny}"], "empty"),
    "prompt-over-context": (["generate", "x" * 40, "--model", "{short}"], "40 tokens"),
    "system-without-chat": (["generate", "hi", "--model", "{tiny}", "--system", "be brief"], "--system"),
    "temperature-not-a-number": (["generate", "hi", "--model", "{tiny}", "--temperature", "abc"], "--temperature"),
    "temperature-negative": (["generate", "hi", "--model", "{tiny}", "--temperature", "-1"], "--temperature"),
    "top-p-zero": (["generate", "hi", "--model", "{tiny}", "--top-p", "0"], "--top-p"),
    "top-p-above-one": (["generate", "hi", "--model", "{tiny}", "--top-p", "2"], "--top-p"),
    "max-new-tokens-zero": (["generate", "hi", "--model", "{tiny}", "--max-new-tokens", "0"], "--max-new-tokens"),
    "seed-negative": (["generate", "hi", "--model", "{tiny}", "--seed", "-3"], "--seed"),
    "threads-zero": (["generate", "hi", "--model", "{tiny}", "--threads", "0"], "--threads"),
    "enclave-share-one": (["generate", "hi", "--model", "{tiny}", "--scheme", "secureinfer", "--enclave-share", "1"], "--enclave-share"),
    "unknown-scheme": (["generate", "hi", "--model", "{tiny}", "--scheme", "nope"], "scheme 'nope'"),
    "chat-bad-option": (["chat", "--model", "{tiny}", "--top-k", "-1"], "--top-k"),
    "missing-adapter": (["generate", "hi", "--model", "{tiny}", "--adapter", "/nonexistent/adapter"], "/nonexistent/adapter"),
    "quality-missing-text": (["quality", "--model", "{tiny}", "--text", "/nonexistent/t.txt"], "cannot read the text"),
    "quality-window-over-context": (["quality", "--model", "{short}", "--window", "4096"], "window"),
    "quality-unknown-scheme": (["quality", "--model", "{tiny}", "--scheme", "nope"], "scheme 'nope'"),
    "audit-unknown-scheme": (["audit", "--model", "{tiny}", "--scheme", "nope"], "scheme 'nope'"),
    "extraction-without-a-report": (
        ["audit", "--extraction-only", "--model", "{tiny}", "--out", "/nonexistent/report"], "/nonexistent/report"
    ),
    "extraction-with-no-queries": (["audit", "--extraction-only", "--quick", "--model", "{tiny}"], "no extraction queries"),
}
if not torch.cuda.is_available():  # where torch sees a GPU these run instead (tests/test_cuda.py)
    BAD_INPUT_CASES |= {
        "generate-cuda-without-a-gpu": (["generate", "hi", "--model", "{tiny}", "--device", "cuda"], "no CUDA GPU"),
        "bench-cuda-without-a-gpu": (["bench", "--model", "{tiny}", "--device", "cuda", "--repeats", "1"], "no CUDA GPU"),
    }


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_gguf, short_context_gguf, tiny_hf_model) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("cli-models")
    files = {
        "tiny": tiny_gguf,
        "short": short_context_gguf,
        "not_gguf": write_not_gguf(directory / "not.gguf"),
        "truncated": write_truncated_gguf(tiny_gguf, directory / "truncated.gguf"),
        "corrupt": write_corrupt_gguf(tiny_gguf, directory / "corrupt.gguf"),
        "gpt2": write_llama_gguf(directory / "gpt2.gguf", tiny_hf_model, arch="gpt2"),
    }
    return {name: str(path) for name, path in files.items()}


@pytest.fixture(scope="module")
def bad_input_runs(model_files) -> dict[str, subprocess.CompletedProcess]:
    commands = {
        name: [arg.format(**model_files) for arg in args] + ["--quiet"]
        for name, (args, _) in BAD_INPUT_CASES.items()
    }
    return run_cli_concurrently(commands)


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_line_with_a_fix(bad_input_runs, case):
    assert_one_line_error(bad_input_runs[case], keyword=BAD_INPUT_CASES[case][1])


# --- good runs ---------------------------------------------------------------------------------


def test_generate_json_matches_the_python_api(tiny_gguf, tiny_lm):
    result = run_cli(["generate", "hello", "--model", str(tiny_gguf), "--json", "--max-new-tokens", "5", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert {"text", "tokens", "prompt_tokens", "finish_reason", "ttft_s", "decode_tok_s"} <= report.keys()
    expected = tiny_lm.generate("hello", max_new_tokens=5)
    assert report["tokens"] == expected.tokens
    assert report["text"] == expected.text
    assert report["prompt_tokens"] == expected.prompt_tokens
    assert len(report["tokens"]) == 5 or report["finish_reason"] == "eos"
    assert all(isinstance(token, int) for token in report["tokens"])
    assert report["ttft_s"] > 0 and report["decode_tok_s"] > 0


def test_stream_prints_the_same_text_as_a_plain_run(tiny_gguf, tiny_lm):
    args = ["generate", "hello", "--model", str(tiny_gguf), "--max-new-tokens", "40", "--quiet"]
    runs = run_cli_concurrently({"plain": args, "stream": args + ["--stream"]})
    assert [r.returncode for r in runs.values()] == [0, 0], [r.stderr for r in runs.values()]
    # The text holds partial UTF-8 sequences (replacement characters), which the stream must not split.
    expected = tiny_lm.generate("hello", max_new_tokens=40).text
    assert runs["plain"].stdout == runs["stream"].stdout == expected + "\n"


def test_info_json_describes_the_tiny_model(tiny_gguf, tiny_hf_model):
    result = run_cli(["info", str(tiny_gguf), "--json", "--quiet"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    hf = tiny_hf_model.config
    config = report["config"]
    assert (config["num_layers"], config["num_heads"], config["num_kv_heads"]) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
    )
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (
        hf.hidden_size,
        hf.intermediate_size,
        hf.head_dim,
    )
    assert config["vocab_size"] == hf.vocab_size == report["tokenizer_vocab"] == TINY_VOCAB_SIZE
    assert config["max_position_embeddings"] == hf.max_position_embeddings
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    assert config["tie_word_embeddings"] is True
    assert report["parameters"] == sum(p.numel() for p in tiny_hf_model.parameters())
    assert report["format"] == "gguf"
    assert report["chat_template"] is True


def test_chat_repl_answers_each_turn_and_resets(tiny_gguf):
    result = run_cli(
        ["chat", "--model", str(tiny_gguf), "--max-new-tokens", "5", "--quiet"],
        stdin="hello\n/reset\nagain\n/exit\nnever read\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert sum(line.startswith("assistant> ") for line in lines) == 2
    assert "(conversation cleared)" in lines


def test_chat_repl_keeps_the_conversation(tiny_gguf, monkeypatch, capsys):
    calls: list[tuple[list[dict], object]] = []
    real_stream = SecureLM.stream

    def recording_stream(self, prompt, **options):
        stream = real_stream(self, prompt, **options)
        calls.append((copy.deepcopy(prompt), stream))  # the REPL appends to the same list later
        return stream

    monkeypatch.setattr(SecureLM, "stream", recording_stream)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/reset\nthird question\n"))

    exit_code = cli.main(
        ["chat", "--model", str(tiny_gguf), "--system", "Be brief.", "--max-new-tokens", "6", "--quiet"]
    )

    assert exit_code == 0
    system = {"role": "system", "content": "Be brief."}
    first_reply = calls[0][1].result.text
    assert [messages for messages, _ in calls] == [
        [system, {"role": "user", "content": "first question"}],
        [
            system,
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "second question"},
        ],
        [system, {"role": "user", "content": "third question"}],
    ]
    assert f"assistant> {first_reply}\n" in capsys.readouterr().out


# --- the trust boundary from the command line ------------------------------------------------


def test_quality_compares_schemes_against_plain(tmp_path, model_files):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog lay by the door " * 8)
    out = tmp_path / "quality.json"
    args = ["quality", "--model", model_files["tiny"], "--scheme", "plain-int8", "--scheme", "secureinfer"]
    result = run_cli(args + ["--text", str(text), "--window", "32", "--stride", "16", "--new-tokens", "4", "--out", str(out), "--quiet"])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    schemes = report["schemes"]
    assert list(schemes) == ["plain", "plain-int8", "secureinfer"]
    assert schemes["plain"]["perplexity_change_vs_plain"] == 0
    assert schemes["secureinfer"]["perplexity"] == schemes["plain-int8"]["perplexity"]  # bit-equal pipelines
    assert schemes["secureinfer"]["continuations"] == schemes["plain-int8"]["continuations"]
    assert "| secureinfer |" in result.stdout and "| plain-int8 |" in result.stdout


def test_plan_prints_the_placement_and_costs_of_each_baseline(model_files):
    results = run_cli_concurrently(
        {
            scheme: ["plan", "--scheme", scheme, "--model", str(model_files["tiny"]), "--context", "16", "--json", "--quiet"]
            for scheme in ("plain", "enclave", "secureinfer")
        }
        | {"table": ["plan", "--scheme", "plain", "--model", str(model_files["tiny"]), "--quiet"]}
        | {"shared": ["plan", "--scheme", "secureinfer", "--enclave-share", "0.5", "--model", str(model_files["tiny"]),
                      "--context", "16", "--json", "--quiet"]}  # fmt: skip
    )
    plain, enclave = (json.loads(results[s].stdout) for s in ("plain", "enclave"))
    secure, shared = (json.loads(results[s].stdout) for s in ("secureinfer", "shared"))
    assert (secure["enclave_share"], shared["enclave_share"]) == (0.0, 0.5)
    # half of every blinded product's columns: half the device's FLOPs and returned bytes move into the enclave
    assert shared["costs"]["device_flops"] * 2 == secure["costs"]["device_flops"]
    assert shared["costs"]["bytes_from_device"] * 2 == secure["costs"]["bytes_from_device"]
    assert shared["costs"]["bytes_to_device"] == secure["costs"]["bytes_to_device"]
    assert {row["placement"] for row in plain["placements"] if row["op"] != "sample"} == {"device"}
    assert {row["placement"] for row in enclave["placements"]} == {"enclave"}
    assert (plain["costs"]["round_trips"], enclave["costs"]["round_trips"]) == (1, 0)
    assert plain["costs"]["device_flops"] + plain["costs"]["enclave_flops"] == enclave["costs"]["enclave_flops"]
    table = results["table"].stdout
    assert results["table"].returncode == 0 and "round trips" in table and "qkv_proj" in table


def test_generate_records_the_device_view_and_honours_the_epc_budget(tmp_path, model_files):
    view = tmp_path / "view"
    result = run_cli(
        ["generate", "hello", "--model", str(model_files["tiny"]), "--scheme", "plain", "--record-view", str(view),
         "--epc", "90MiB", "--max-new-tokens", "3", "--json", "--quiet"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((view / "manifest.json").read_text())
    runs = [m for m in manifest["messages"] if m["kind"] == "run"]
    assert len(runs) == len(json.loads(result.stdout)["tokens"])


def test_attack_reads_the_prompt_back_from_a_recorded_plain_view_and_nothing_from_a_blinded_one(tmp_path, model_files):
    prompt = "the cat and the dog sat on the mat"
    views = {}
    for scheme in ("plain", "secureinfer"):
        views[scheme] = tmp_path / scheme
        result = run_cli(
            ["generate", prompt, "--model", model_files["tiny"], "--scheme", scheme, "--record-view", str(views[scheme]),
             "--max-new-tokens", "2", "--quiet"]
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    tiny = ["--model", model_files["tiny"], "--quiet"]
    results = run_cli_concurrently({
        "inversion": ["attack", "kv-inversion", str(views["plain"]), *tiny],
        "json": ["attack", "kv-inversion", str(views["plain"]), *tiny, "--json"],
        "blinded": ["attack", "kv-inversion", str(views["secureinfer"]), *tiny],
        "traffic": ["attack", "traffic", str(views["secureinfer"]), *tiny],
        "plain traffic": ["attack", "traffic", str(views["plain"]), *tiny],
        "missing": ["attack", "kv-inversion", str(tmp_path / "nope"), *tiny],
        "unknown": ["attack", "telepathy", str(views["plain"]), *tiny],
    })  # fmt: skip
    assert all(results[name].returncode == 0 for name in ("inversion", "json", "blinded", "traffic")), results
    assert prompt in results["inversion"].stdout and "in clear" in results["inversion"].stdout
    data = json.loads(results["json"].stdout)
    assert data["attack"] == "kv_inversion" and data["nothing_to_attack"] is None and len(data["tokens"]) == 1
    assert results["blinded"].stdout.startswith("nothing to attack: the device held no KV cache")
    assert "chi-square uniformity p =" in results["traffic"].stdout and "0 pairs" in results["traffic"].stdout
    assert results["plain traffic"].stdout.startswith("nothing to attack")
    assert_one_line_error(results["missing"], "does not exist")
    assert results["unknown"].returncode == EXIT_USAGE and "telepathy" in results["unknown"].stderr


def test_every_conversation_attack_of_the_audit_is_a_command():
    from secureinfer.attacks.audit import CONVERSATION_ATTACKS
    from secureinfer.cli import ATTACK_NAMES

    assert {name.replace("-", "_") for name in ATTACK_NAMES} == {*CONVERSATION_ATTACKS, "traffic"}


@pytest.mark.parametrize("value", ["12Q", "-1", "0", "lots"])
def test_a_bad_epc_value_is_one_line(model_files, value):
    assert_one_line_error(run_cli(["generate", "hi", "--model", str(model_files["tiny"]), "--epc", value]), "--epc")


def test_plan_with_a_budget_runs_the_partition_planner_and_explains_a_miss(model_files, tmp_path):
    tiny = str(model_files["tiny"])
    out = tmp_path / "plan.json"
    results = run_cli_concurrently(
        {
            "fits": ["plan", "--model", tiny, "--epc", "64MiB", "--protect", "adapters,conversation", "--out", str(out), "--quiet"],
            "tight": ["plan", "--model", tiny, "--epc", "1KiB", "--protect", "conversation", "--quiet"],
            "bad": ["plan", "--model", tiny, "--protect", "secrets", "--quiet"],
        }
    )  # fmt: skip
    fits = results["fits"]
    assert fits.returncode == 0 and "**chosen**" in fits.stdout and "`secureinfer`" in fits.stdout
    report = json.loads(out.read_text())
    assert report["chosen"] is not None and report["protect"] == ["adapters", "conversation"]
    tight = results["tight"]
    assert tight.returncode == 2 and "| preset |" in tight.stdout
    assert "raise --epc" in tight.stderr and len(tight.stderr.strip().splitlines()) == 1
    assert results["bad"].returncode == 2 and "secrets" in results["bad"].stderr

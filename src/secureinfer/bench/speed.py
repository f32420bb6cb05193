"""Speed, side by side in one run: our in-process engine, transformers' `generate`, and each scheme
through the real trust boundary. Same weights, threads and prompt for all.

Runs go round-robin over the runners, so drift on a shared machine hits all alike. Decode speed is
(tokens - 1) / (time of last token - time of first token); time to first token includes prefill.
For schemes, the channel's measured round trips and bytes are reported next to the plan's
analytic figures, with a time breakdown (enclave compute, device compute, transfer).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..api import SecureLM
from ..engine import GenerationConfig, Generator
from ..model import Checkpoint, Llama, load_checkpoint

BENCH_MESSAGES = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]
DECODE_TARGET, DECODE_STRETCH, SECOND_LOAD_LIMIT_S = 1.0, 1.5, 2.0
ENGINE, TRANSFORMERS = "engine (in-process)", "transformers generate"
DEFAULT_SCHEMES = (
    "plain", "enclave", "plain-int8", "kvshield", "kvshield-fold", "kvmix", "secureinfer", "secureinfer-enclave-qkv-ffn",
    "hardened",
)


@dataclass
class Runner:
    name: str
    run: Callable[[int], tuple[float, float]]  # new tokens -> (ttft_s, decode_tok_s)
    threads: int = 1  # torch threads in this process while it runs
    ttft_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def time(self, new_tokens: int) -> None:
        torch.set_num_threads(self.threads)
        ttft, decode = self.run(new_tokens)
        self.ttft_s.append(ttft)
        self.decode_tok_s.append(decode)

    def summary(self) -> dict:
        return {"ttft_s": summarize(self.ttft_s), "decode_tok_s": summarize(self.decode_tok_s), **self.extra}


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


class _TokenClock:
    """A transformers streamer that only notes when each generated token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True  # the first call carries the prompt, not a generated token

    def end(self):
        pass


def transformers_runner(checkpoint: Checkpoint, prompt_ids: list[int]) -> Runner:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**checkpoint.config.to_hf_config())).eval()
    model.load_state_dict(checkpoint.weights, strict=not checkpoint.config.tie_word_embeddings)
    model.generation_config.eos_token_id = None  # exactly the requested steps, as ours with ignore_eos

    def run(new_tokens: int) -> tuple[float, float]:
        clock = _TokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                torch.tensor([prompt_ids]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock
            )
        return clock.times[0] - start, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])

    return Runner(TRANSFORMERS, run, torch.get_num_threads())


def generator_runner(name: str, generator: Generator) -> Runner:
    def run(new_tokens: int) -> tuple[float, float]:
        result = generator.generate(BENCH_MESSAGES, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
        return result.ttft_s, result.decode_tok_s

    return Runner(name, run, torch.get_num_threads())


def scheme_runner(lm: SecureLM, prompt_tokens: int) -> Runner:
    """Times a scheme and, per run, compares its measured channel traffic with the plan's analytic costs."""
    runner = generator_runner(lm.scheme, lm.generator)
    runner.threads = lm.threads or runner.threads
    timed = runner.run

    def run(new_tokens: int) -> tuple[float, float]:
        lm.runtime.reset_stats()
        ttft_s, decode_tok_s = timed(new_tokens)
        stats = lm.stats()
        prefill = lm.costs(context=prompt_tokens, tokens=prompt_tokens)
        decode = lm.costs(context=prompt_tokens + new_tokens // 2)
        steps = new_tokens - 1  # forwards after the prefill
        per_token = lambda total: total / new_tokens  # noqa: E731 - one forward per generated token
        runner.extra = {
            "measured_per_token": {
                "round_trips": per_token(stats["channel"]["round_trips_by_kind"].get("run", 0)),
                "bytes_to_device": per_token(stats["channel"]["payload_bytes_sent"]),
                "bytes_from_device": per_token(stats["channel"]["payload_bytes_received"]),
                **{k: per_token(v) for k, v in stats["time"].items()},
            },
            "analytic_per_token": {
                "round_trips": per_token(prefill.round_trips + steps * decode.round_trips),
                "bytes_to_device": per_token(prefill.bytes_to_device + steps * decode.bytes_to_device),
                "bytes_from_device": per_token(prefill.bytes_from_device + steps * decode.bytes_from_device),
                "enclave_flops": decode.enclave_flops,
                "device_flops": decode.device_flops,
            },
            "enclave_memory": stats["memory"],
            # Offline pad work runs in the background thread (overlapping device waits) except for stalls,
            # which sit on the critical path; both are reported per token, apart from online enclave time.
            "offline_pad_ms_per_token": per_token(stats["pads"]["offline_s"]) * 1000,
            "stalled_pad_ms_per_token": per_token(stats["pads"]["stall_s"]) * 1000,
            "offline_pad_macs_per_token": per_token(stats["pads"]["offline_macs"]),
            "integrity_ms_per_token": per_token(stats["integrity"]["seconds"]) * 1000,
        }
        return ttft_s, decode_tok_s

    runner.run = run
    return runner


def run_speed_bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    first = load_checkpoint(args.model, progress=not args.quiet)
    second = load_checkpoint(args.model, progress=False)
    tokenizer = second.tokenizer
    prompt_ids = tokenizer.apply_chat_template(BENCH_MESSAGES)
    engine = Generator(Llama.from_state_dict(second.config, second.weights), tokenizer, second.config.max_position_embeddings)
    runners = [generator_runner(ENGINE, engine), transformers_runner(second, prompt_ids)]
    base_threads = torch.get_num_threads()
    schemes = []
    for scheme in dict.fromkeys(args.scheme or DEFAULT_SCHEMES):
        schemes.append(SecureLM(second, scheme, channel=args.channel, device=args.device, threads=args.threads))
        torch.set_num_threads(base_threads)  # a scheme may split the cores for itself; the runners set their own
        runners.append(scheme_runner(schemes[-1], len(prompt_ids)))
    try:
        for runner in runners:
            torch.set_num_threads(runner.threads)
            runner.run(4)  # warm-up: allocator, thread pools, the device's first step
        for _ in range(args.repeats):
            for runner in runners:
                runner.time(args.max_new_tokens)
    finally:
        for lm in schemes:
            lm.close()

    results = {runner.name: runner.summary() for runner in runners}
    report = {
        "model": str(second.source),
        "threads": {runner.name: runner.threads for runner in runners},
        "channel": args.channel,
        "device": args.device,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load": {
            "first_s": first.details["load_s"],
            "first_cache_hit": first.details.get("cache_hit"),
            "second_s": second.details["load_s"],
        },
        "results": results,
        "ratios": _ratios(results),
    }
    decode_ratio = report["ratios"][ENGINE]["decode_vs_transformers"]
    report["targets"] = {
        f"engine decode >= {DECODE_TARGET}x transformers": decode_ratio >= DECODE_TARGET,
        f"engine decode >= {DECODE_STRETCH}x transformers (stretch)": decode_ratio >= DECODE_STRETCH,
        f"second load < {SECOND_LOAD_LIMIT_S} s": second.details["load_s"] < SECOND_LOAD_LIMIT_S,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else to_markdown(report))
    return report


def _ratios(results: dict) -> dict:
    def median(name: str, metric: str) -> float | None:
        return results[name][metric]["median"] if name in results else None

    out = {}
    for name in results:
        decode = median(name, "decode_tok_s")
        out[name] = {
            f"decode_vs_{ref}": decode / median(ref_name, "decode_tok_s")
            for ref, ref_name in (("transformers", TRANSFORMERS), ("plain", "plain"), ("enclave", "enclave"))
            if ref_name in results
        }
    return out


def to_markdown(report: dict) -> str:
    results, ratios = report["results"], report["ratios"]
    lines = [
        f"{Path(report['model']).name}: {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, "
        f"{report['channel']} channel, device {report['device']}, threads per process {report['threads']}; "
        f"median (min-max) of {report['repeats']} runs, round-robin",
        "",
        "| runner | time to first token, ms | decode, tokens/s | decode vs transformers | vs plain | vs enclave |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        ttft, decode = result["ttft_s"], result["decode_tok_s"]
        ratio = ratios[name]
        cell = lambda key: f"{ratio[key]:.2f}x" if key in ratio else "-"  # noqa: E731
        lines.append(
            f"| {name} | {ttft['median'] * 1000:.1f} ({ttft['min'] * 1000:.1f}-{ttft['max'] * 1000:.1f}) "
            f"| {decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f}) "
            f"| {cell('decode_vs_transformers')} | {cell('decode_vs_plain')} | {cell('decode_vs_enclave')} |"
        )
    schemes = {name: r for name, r in results.items() if "measured_per_token" in r}
    if schemes:
        lines += [
            "",
            "Per generated token (last run), measured / analytic:",
            "",
            "| scheme | round trips | bytes to device | bytes from device | enclave compute ms | device compute ms "
            "| transfer ms | offline pads ms (stalled) | integrity checks ms | enclave peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in schemes.items():
            m, a = r["measured_per_token"], r["analytic_per_token"]
            lines.append(
                f"| {name} | {m['round_trips']:.2f} / {a['round_trips']:.2f} "
                f"| {m['bytes_to_device']:,.0f} / {a['bytes_to_device']:,.0f} "
                f"| {m['bytes_from_device']:,.0f} / {a['bytes_from_device']:,.0f} "
                f"| {m['enclave_compute_s'] * 1000:.2f} | {m['device_compute_s'] * 1000:.2f} | {m['transfer_s'] * 1000:.2f} "
                f"| {r['offline_pad_ms_per_token']:.2f} ({r['stalled_pad_ms_per_token']:.2f}) "
                f"| {r['integrity_ms_per_token']:.2f} | {r['enclave_memory']['peak_bytes'] / (1 << 20):,.1f} |"
            )
    load = report["load"]
    lines += [
        "",
        f"model load: first {load['first_s']:.2f} s (cache hit: {load['first_cache_hit']}), second {load['second_s']:.2f} s",
        "",
        *[f"- [{'x' if met else ' '}] {target}" for target, met in report["targets"].items()],
    ]
    return "\n".join(lines)

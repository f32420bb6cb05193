"""Speed, side by side in one run: our in-process engine, transformers' `generate`, and each scheme
through the real trust boundary. Same weights, threads and prompt for all.

Runs go round-robin over the cases (prompt length x new tokens) and runners, so drift on a shared machine
hits all alike. Decode speed is
(tokens - 1) / (time of last token - time of first token); time to first token includes prefill.
For schemes, the channel's measured round trips and bytes are reported next to the plan's
analytic figures, with a time breakdown (enclave compute, device compute, transfer), and issue 7's targets
are judged against the measurements (targets.py).
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
from ..data import EVAL_TEXT
from ..device.endpoint import torch_device
from ..engine import GenerationConfig, Generator
from ..errors import InvalidRequestError
from ..model import Checkpoint, Llama, load_checkpoint
from ..model.ops import weight_names
from ..plan import PRESETS, build_plan
from ..plan.plan import LAST_POSITION_WEIGHTS
from . import source_commit
from .steal import read_cpu_times, steal_share
from .analytic import analytic_markdown, decode_costs, model_analytic, pad_flops
from .targets import cell, describe, judge, target

BENCH_MESSAGES = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]
DECODE_TARGET, DECODE_STRETCH, SECOND_LOAD_LIMIT_S = 1.0, 1.5, 2.0
ENGINE, TRANSFORMERS = "engine (in-process)", "transformers generate"
DEFAULT_SCHEMES = (
    "plain", "enclave", "plain-int8", "kvshield", "kvshield-fold", "kvmix", "secureinfer", "secureinfer-enclave-qkv-ffn",
    "hardened",
)


@dataclass(frozen=True)
class Case:
    """One request shape of the bench: what the generator is given, its token ids, and how many tokens to make."""

    prompt: str | tuple  # raw text, or chat messages
    ids: tuple[int, ...]
    new_tokens: int

    @property
    def key(self) -> tuple[int, int]:
        return len(self.ids), self.new_tokens


@dataclass
class Runner:
    name: str
    run: Callable[[Case], tuple[float, float]]  # -> (ttft_s, decode_tok_s)
    threads: int = 1  # torch threads in this process while it runs
    enclave_share: float | None = None  # a blinded scheme's share of each product done in the enclave
    ttft_s: dict = field(default_factory=dict)  # per case key
    decode_tok_s: dict = field(default_factory=dict)
    steal_shares: dict = field(default_factory=dict)  # per case key: the host's steal share during each run, or None
    extra: dict = field(default_factory=dict)  # per case key: the last run's measured detail

    def time(self, case: Case) -> None:
        torch.set_num_threads(self.threads)
        before = read_cpu_times()
        ttft, decode = self.run(case)
        self.steal_shares.setdefault(case.key, []).append(steal_share(before, read_cpu_times()))
        self.ttft_s.setdefault(case.key, []).append(ttft)
        self.decode_tok_s.setdefault(case.key, []).append(decode)

    def summary(self, case: Case) -> dict:
        steals = [share for share in self.steal_shares[case.key] if share is not None]
        return {
            "ttft_s": summarize(self.ttft_s[case.key]),
            "decode_tok_s": summarize(self.decode_tok_s[case.key]),
            "cpu_steal_share": summarize(steals) if steals else None,
            **self.extra.get(case.key, {}),
        }


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


def transformers_runner(checkpoint: Checkpoint, device: str = "cpu") -> Runner:
    """transformers' `generate` on `device`: the schemes' device side, so that T1 sets `plain` beside
    transformers on the same hardware (on a GPU, the GPU-only baseline of the papers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**checkpoint.config.to_hf_config())).eval()
    model.load_state_dict(checkpoint.weights, strict=not checkpoint.config.tie_word_embeddings)
    model.to(torch_device(device))  # a clear error where the device is missing, as the schemes give
    model.generation_config.eos_token_id = None  # exactly the requested steps, as ours with ignore_eos

    def run(case: Case) -> tuple[float, float]:
        clock = _TokenClock()  # generate hands it each token copied to the CPU, so a GPU's times are synchronised
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                torch.tensor([case.ids], device=device), max_new_tokens=case.new_tokens, do_sample=False, pad_token_id=0,
                streamer=clock,
            )  # fmt: skip
        return clock.times[0] - start, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])

    return Runner(TRANSFORMERS, run, torch.get_num_threads())


def generator_runner(name: str, generator: Generator) -> Runner:
    def run(case: Case) -> tuple[float, float]:
        prompt = case.prompt if isinstance(case.prompt, str) else list(case.prompt)
        result = generator.generate(prompt, GenerationConfig(max_new_tokens=case.new_tokens, ignore_eos=True))
        return result.ttft_s, result.decode_tok_s

    return Runner(name, run, torch.get_num_threads())


def top_up_pads(pads, case: Case) -> None:
    """Online mode's offline phase, untimed: make every pad the request will take before it starts.

    A layer weight pads every prompt position in the prefill and one per later step; last-position weights
    (the LM head) one per generated token. The extra `low_water` rows keep the background refill thread
    asleep, so no pad is made while the request runs.
    """
    prompt_tokens, new_tokens = case.key
    for name in pads.weights_t:
        rows = new_tokens if name in LAST_POSITION_WEIGHTS else prompt_tokens + new_tokens - 1
        missing = rows + pads.low_water - pads.available(name)
        if missing > 0:
            pads.refill(name, missing)


def scheme_runner(lm: SecureLM, pads: str = "online") -> Runner:
    """Times a scheme and, per run, compares its measured channel traffic with the plan's analytic costs.

    `pads`: "online" makes the request's pads before it is timed (their cost is reported as offline work);
    "inline" leaves them to the background thread and to stalls during the request (end to end)."""
    runner = generator_runner(lm.scheme, lm.generator)
    runner.threads = lm.threads or runner.threads
    runner.enclave_share = lm.plan.enclave_share if lm.plan.blinded_weights else None
    timed = runner.run

    def run(case: Case) -> tuple[float, float]:
        lm.runtime.reset_stats()
        if pads == "online":
            top_up_pads(lm.runtime.pads, case)  # after the reset: its work shows in the offline pad figures
        ttft_s, decode_tok_s = timed(case)
        stats = lm.stats()
        prompt_tokens, new_tokens = case.key
        prefill = lm.costs(context=prompt_tokens, tokens=prompt_tokens)
        decode = lm.costs(context=prompt_tokens + new_tokens // 2)
        steps = new_tokens - 1  # forwards after the prefill
        per_token = lambda total: total / new_tokens  # noqa: E731 - one forward per generated token
        runner.extra[case.key] = {
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
                "offline_pad_flops": pad_flops(lm.plan),
                "device_flops": decode.device_flops,
            },
            "enclave_memory": stats["memory"],
            # Offline pad work runs before the request (online mode) or in the background thread, overlapping
            # device waits, except for stalls, which sit on the critical path; all reported per token, apart
            # from online enclave time.
            "offline_pad_ms_per_token": per_token(stats["pads"]["offline_s"]) * 1000,
            "stalled_pad_ms_per_token": per_token(stats["pads"]["stall_s"]) * 1000,
            "offline_pad_macs_per_token": per_token(stats["pads"]["offline_macs"]),
            "integrity_ms_per_token": per_token(stats["integrity"]["seconds"]) * 1000,
        }
        return ttft_s, decode_tok_s

    runner.run = run
    return runner


def sweep_prompt(tokenizer, tokens: int) -> tuple[str, list[int]]:
    """Text from the shipped evaluation text (repeated if short) that encodes to exactly `tokens` ids.

    Cutting the ids and decoding can re-encode differently at the cut (a split word merges otherwise), so the
    cut moves until the text round-trips to the requested count."""
    text = EVAL_TEXT.read_text(encoding="utf-8")
    source = text
    while len(ids := tokenizer.encode(source)) < tokens + 16:
        source += "\n\n" + text
    cut = tokens
    for _ in range(16):
        prompt = tokenizer.decode(ids[:cut])
        encoded = tokenizer.encode(prompt)
        if len(encoded) == tokens:
            return prompt, encoded
        cut += tokens - len(encoded)
    raise InvalidRequestError(
        f"could not cut the evaluation text to exactly {tokens} tokens", "pick a slightly different --prompt-lengths value"
    )


def bench_cases(tokenizer, context_length: int, prompt_lengths, gen_lengths, max_new_tokens: int) -> list[Case]:
    """Every (prompt, new tokens) pair; without lengths, the chat prompt and --max-new-tokens as before."""
    gens = gen_lengths or (max_new_tokens,)
    if prompt_lengths:
        longest = max(prompt_lengths) + max(gens)
        if longest > context_length:
            raise InvalidRequestError(
                f"a {max(prompt_lengths)}-token prompt with {max(gens)} new tokens needs {longest} positions, but the "
                f"model's context holds {context_length}",
                f"pick --prompt-lengths and --gen-lengths that add up to at most {context_length}",
            )
        prompts = [sweep_prompt(tokenizer, n) for n in prompt_lengths]
    else:
        prompts = [(tuple(BENCH_MESSAGES), tokenizer.apply_chat_template(BENCH_MESSAGES))]
        if len(prompts[0][1]) + max(gens) > context_length:
            raise InvalidRequestError(
                f"the {len(prompts[0][1])}-token chat prompt with {max(gens)} new tokens exceeds the model's context of "
                f"{context_length}",
                "pass a smaller --max-new-tokens or --gen-lengths",
            )
    return [Case(prompt, tuple(ids), gen) for prompt, ids in prompts for gen in gens]


def run_speed_bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    first = load_checkpoint(args.model, progress=not args.quiet)
    second = load_checkpoint(args.model, progress=False)
    config, tokenizer = second.config, second.tokenizer
    cases = bench_cases(tokenizer, config.max_position_embeddings, args.prompt_lengths, args.gen_lengths, args.max_new_tokens)
    schemes = tuple(dict.fromkeys(args.scheme or DEFAULT_SCHEMES))
    started = read_cpu_times()
    runners = time_round_robin(second, schemes, cases, args)
    bench_steal = steal_share(started, read_cpu_times())
    reports = [case_report(case, runners, config) for case in cases]
    headline = reports[0]
    load_target = target(
        "load", "time of a second load of the model", second.details["load_s"], "<", SECOND_LOAD_LIMIT_S, unit=" s"
    )
    shares = {runner.name: runner.enclave_share for runner in runners if runner.enclave_share is not None}
    report = {
        **second.identity(),
        "source_commit": source_commit(),
        "threads": {runner.name: runner.threads for runner in runners},
        "enclave_share": shares,
        "channel": args.channel,
        "device": args.device,
        "pads": args.pads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "cpu_steal_share": bench_steal,  # the whole timed part, warm-up included; per run in each result
        "load": {
            "first_s": first.details["load_s"],
            "first_cache_hit": first.details.get("cache_hit"),
            "second_s": second.details["load_s"],
        },
        **headline,  # the first case, as the bench reported before sweeps existed
        "targets": headline["targets"] + [load_target],
        "analytic": model_analytic(config, schemes, headline["prompt_tokens"] + headline["new_tokens"] // 2, shares),
    }
    if len(reports) > 1:
        report["sweep"] = reports
    if args.plots:
        from .plots import write_plots  # matplotlib only when asked for

        report["plots"] = [str(p) for p in write_plots(report, args.plots)]
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else to_markdown(report))
    return report


def time_round_robin(checkpoint: Checkpoint, schemes, cases: list[Case], args, references: bool = True) -> list[Runner]:
    """Time each scheme (through the boundary, as `args` says) on `checkpoint`, and with `references` our
    in-process engine and transformers' `generate`: every repeat runs every case on every runner in turn, so
    drift on a shared machine hits all alike."""
    config = checkpoint.config
    runners = []
    if references:
        engine = Generator(Llama(config, checkpoint.fused_weights), checkpoint.tokenizer, config.max_position_embeddings)
        runners += [generator_runner(ENGINE, engine), transformers_runner(checkpoint, args.device)]
    base_threads = torch.get_num_threads()
    lms = []
    try:
        for scheme in schemes:
            lms.append(
                SecureLM(
                    checkpoint, scheme, channel=args.channel, device=args.device, threads=args.threads,
                    enclave_share=args.enclave_share,
                )
            )  # fmt: skip
            torch.set_num_threads(base_threads)  # a scheme may split the cores for itself; the runners set their own
            runners.append(scheme_runner(lms[-1], args.pads))
        warm_up = Case(cases[0].prompt, cases[0].ids, 4)
        for runner in runners:
            torch.set_num_threads(runner.threads)
            runner.run(warm_up)  # allocator, thread pools, the device's first step
        for _ in range(args.repeats):
            for case in cases:
                for runner in runners:
                    runner.time(case)
    finally:
        for lm in lms:
            lm.close()
        torch.set_num_threads(base_threads)
    return runners


def case_report(case: Case, runners: list[Runner], config) -> dict:
    results = {runner.name: runner.summary(case) for runner in runners}
    prompt_tokens, new_tokens = case.key
    context = prompt_tokens + new_tokens // 2  # the middle of decode, as the runners' analytic figures
    report = {
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "results": results,
        "ratios": _ratios(results),
        # Every preset, whichever ran: T3's analytic bound needs `enclave` and `secureinfer` in any run.
        "analytic_per_token": {scheme: decode_costs(build_plan(scheme, config), context) for scheme in PRESETS},
    }
    engine_ratio = report["ratios"][ENGINE]["decode_vs_transformers"]
    report["targets"] = [
        target("engine", "decode speed vs transformers generate", engine_ratio, ">=", DECODE_TARGET),
        target("engine", "decode speed vs transformers generate (stretch)", engine_ratio, ">=", DECODE_STRETCH),
        *judge(report, config.num_layers, TRANSFORMERS),
    ]
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
    lines = [
        f"{report['model']}: {report['channel']} channel, device {report['device']}, pads {report['pads']}, "
        f"threads per process {report['threads']}; enclave share of blinded products {report.get('enclave_share', {})}; "
        f"median (min-max) of {report['repeats']} runs, round-robin; "
        f"code {report.get('source_commit') or 'unknown'}; {_steal_words(report.get('cpu_steal_share'))}",
        "",
        *case_markdown(report),
    ]
    if "sweep" in report:
        lines += ["", *sweep_markdown(report["sweep"])]
    load = report["load"]
    lines += [
        "",
        f"model load: first {load['first_s']:.2f} s (cache hit: {load['first_cache_hit']}), second {load['second_s']:.2f} s",
        "",
        f"Targets ({report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, pads {report['pads']}):",
        *[describe(t) for t in report["targets"]],
        "",
        analytic_markdown(report["analytic"]),
    ]
    return "\n".join(lines)


def _steal_words(share: float | None) -> str:
    if share is None:
        return "host steal time not readable here"
    return f"the host took {share * 100:.1f}% of this VM's CPU time while it ran (steal)"


def case_markdown(case: dict) -> list[str]:
    results, ratios = case["results"], case["ratios"]
    lines = [
        f"{case['prompt_tokens']}-token prompt, {case['new_tokens']} new tokens:",
        "",
        "| runner | time to first token, ms | decode, tokens/s | decode vs transformers | vs plain | vs enclave "
        "| host steal, % of CPU time (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        ttft, decode, steal = result["ttft_s"], result["decode_tok_s"], result.get("cpu_steal_share")
        ratio = ratios[name]
        cell = lambda key: f"{ratio[key]:.2f}x" if key in ratio else "-"  # noqa: E731
        steal_cell = f"{steal['median'] * 100:.1f} ({steal['max'] * 100:.1f})" if steal else "-"
        lines.append(
            f"| {name} | {ttft['median'] * 1000:.1f} ({ttft['min'] * 1000:.1f}-{ttft['max'] * 1000:.1f}) "
            f"| {decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f}) "
            f"| {cell('decode_vs_transformers')} | {cell('decode_vs_plain')} | {cell('decode_vs_enclave')} | {steal_cell} |"
        )
    schemes = {name: r for name, r in results.items() if "measured_per_token" in r}
    if schemes:
        lines += [
            "",
            "Per generated token (last run), measured / analytic; enclave and device FLOPs analytic, per decode step:",
            "",
            "| scheme | round trips | bytes to device | bytes from device | enclave compute ms | device compute ms "
            "| transfer ms | offline pads ms (stalled) | integrity checks ms | enclave peak MiB "
            "| enclave MFLOPs (online + pads) | device MFLOPs |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in schemes.items():
            m, a = r["measured_per_token"], r["analytic_per_token"]
            lines.append(
                f"| {name} | {m['round_trips']:.2f} / {a['round_trips']:.2f} "
                f"| {m['bytes_to_device']:,.0f} / {a['bytes_to_device']:,.0f} "
                f"| {m['bytes_from_device']:,.0f} / {a['bytes_from_device']:,.0f} "
                f"| {m['enclave_compute_s'] * 1000:.2f} | {m['device_compute_s'] * 1000:.2f} | {m['transfer_s'] * 1000:.2f} "
                f"| {r['offline_pad_ms_per_token']:.2f} ({r['stalled_pad_ms_per_token']:.2f}) "
                f"| {r['integrity_ms_per_token']:.2f} | {r['enclave_memory']['peak_bytes'] / (1 << 20):,.1f} "
                f"| {a['enclave_flops'] / 1e6:,.2f} + {a['offline_pad_flops'] / 1e6:,.2f} | {a['device_flops'] / 1e6:,.2f} |"
            )
    return lines


def sweep_markdown(cases: list[dict]) -> list[str]:
    """Every case side by side: speed per runner, then the targets per case."""
    runners = list(cases[0]["results"])
    lines = [
        "Sweep: time to first token ms / decode tokens/s (medians) per runner",
        "",
        "| prompt | new | " + " | ".join(runners) + " |",
        "|---|---|" + "---|" * len(runners),
    ]
    for case in cases:
        cells = [
            f"{r['ttft_s']['median'] * 1000:.1f} / {r['decode_tok_s']['median']:.1f}" for r in case["results"].values()
        ]
        lines.append(f"| {case['prompt_tokens']} | {case['new_tokens']} | " + " | ".join(cells) + " |")
    names = [f"{t['id']} {t['name']}" for t in cases[0]["targets"]]
    lines += [
        "",
        "Sweep: targets per case",
        "",
        "| prompt | new | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for case in cases:
        lines.append(f"| {case['prompt_tokens']} | {case['new_tokens']} | " + " | ".join(cell(t) for t in case["targets"]) + " |")
    return lines

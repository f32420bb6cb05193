"""Our engine against transformers' `generate`: same weights, same threads, same prompt, in one run.

Runs alternate between the two engines so drift on a shared machine hits both alike. Decode speed
is (tokens - 1) / (time of last token - time of first token); time to first token includes prefill.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import SecureLM
from ..engine import GenerationConfig
from ..model import load_checkpoint

BENCH_MESSAGES = [{"role": "user", "content": "Explain in detail how a steam engine works, step by step."}]
DECODE_TARGET, DECODE_STRETCH, SECOND_LOAD_LIMIT_S = 1.0, 1.5, 2.0


@dataclass
class Timing:
    ttft_s: float
    decode_tok_s: float


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


def _transformers_model(lm: SecureLM):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**lm.config.to_hf_config())).eval()
    model.load_state_dict(lm.checkpoint.weights, strict=not lm.config.tie_word_embeddings)
    model.generation_config.eos_token_id = None  # exactly the requested steps, as ours with ignore_eos
    return model


def time_transformers(model, prompt_ids: list[int], new_tokens: int) -> Timing:
    clock = _TokenClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            streamer=clock,
        )
    decode_s = clock.times[-1] - clock.times[0]
    return Timing(clock.times[0] - start, (len(clock.times) - 1) / decode_s)


def time_ours(lm: SecureLM, new_tokens: int) -> Timing:
    result = lm.generator.generate(BENCH_MESSAGES, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True))
    return Timing(result.ttft_s, result.decode_tok_s)


def run_speed_bench(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    first = load_checkpoint(args.model, progress=not args.quiet)
    second = load_checkpoint(args.model, progress=False)
    lm = SecureLM(second, args.scheme)
    reference = _transformers_model(lm)
    prompt_ids = lm.tokenizer.apply_chat_template(BENCH_MESSAGES)

    time_ours(lm, 4), time_transformers(reference, prompt_ids, 4)  # warm-up: allocator, thread pools
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_ours(lm, args.max_new_tokens))
        theirs.append(time_transformers(reference, prompt_ids, args.max_new_tokens))

    report = {
        "model": str(second.source),
        "scheme": args.scheme,
        "threads": torch.get_num_threads(),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "load": {
            "first_s": first.details["load_s"],
            "first_cache_hit": first.details.get("cache_hit"),
            "second_s": second.details["load_s"],
        },
        "secureinfer": {
            "ttft_s": summarize([t.ttft_s for t in ours]),
            "decode_tok_s": summarize([t.decode_tok_s for t in ours]),
        },
        "transformers": {
            "ttft_s": summarize([t.ttft_s for t in theirs]),
            "decode_tok_s": summarize([t.decode_tok_s for t in theirs]),
        },
    }
    decode_ratio = report["secureinfer"]["decode_tok_s"]["median"] / report["transformers"]["decode_tok_s"]["median"]
    report["ratios"] = {
        "decode_speedup": decode_ratio,
        "ttft_speedup": report["transformers"]["ttft_s"]["median"] / report["secureinfer"]["ttft_s"]["median"],
    }
    report["targets"] = {
        f"decode >= {DECODE_TARGET}x transformers": decode_ratio >= DECODE_TARGET,
        f"decode >= {DECODE_STRETCH}x transformers (stretch)": decode_ratio >= DECODE_STRETCH,
        f"second load < {SECOND_LOAD_LIMIT_S} s": second.details["load_s"] < SECOND_LOAD_LIMIT_S,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else to_markdown(report))
    return report


def to_markdown(report: dict) -> str:
    def row(name: str, side: dict) -> str:
        ttft, decode = side["ttft_s"], side["decode_tok_s"]
        return (
            f"| {name} | {ttft['median'] * 1000:.1f} ({ttft['min'] * 1000:.1f}-{ttft['max'] * 1000:.1f}) "
            f"| {decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f}) |"
        )

    ratios, load = report["ratios"], report["load"]
    lines = [
        f"{report['model']}: {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens, "
        f"{report['threads']} threads, median (min-max) of {report['repeats']} runs",
        "",
        "| engine | time to first token, ms | decode, tokens/s |",
        "|---|---|---|",
        row("secureinfer (plain)", report["secureinfer"]),
        row("transformers generate", report["transformers"]),
        "",
        f"decode speed-up {ratios['decode_speedup']:.2f}x, time-to-first-token speed-up {ratios['ttft_speedup']:.2f}x",
        f"model load: first {load['first_s']:.2f} s (cache hit: {load['first_cache_hit']}), second {load['second_s']:.2f} s",
        "",
        *[f"- [{'x' if met else ' '}] {target}" for target, met in report["targets"].items()],
    ]
    return "\n".join(lines)

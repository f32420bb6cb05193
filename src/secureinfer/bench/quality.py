"""Quality, side by side: each scheme's perplexity on a shipped text and its greedy continuations, held to `plain`.

Perplexity is the strided (sliding-window) kind: the text is cut into windows of at most `window`
positions, `stride` apart; each window scores only the tokens the previous one did not, so every
token is scored once, with as much of the preceding text as the window holds as its context.
Log-probabilities are taken in float64 from the scheme's own logits, through the trust boundary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..api import SecureLM, _check_choice
from ..data import EVAL_TEXT
from ..errors import InvalidRequestError
from ..model import Checkpoint, load_checkpoint
from ..plan import PRESETS
from . import source_commit
from .speed import DEFAULT_SCHEMES

DEFAULT_TEXT = EVAL_TEXT
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def is_prime(n):",
    "Water boils at a lower temperature on a mountain because",
    "Once upon a time, a small robot",
    "The three primary colours of light are",
)
REFERENCE = "plain"  # fp32 on the device: what quantized and blinded schemes are held to


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored
    mean_nll: float  # nats per scored token
    perplexity: float


def perplexity(
    lm: SecureLM, token_ids: Sequence[int], window: int = 1024, stride: int = 512, progress: bool = False
) -> PerplexityResult:
    """Strided perplexity of `token_ids` under `lm`, scoring tokens 1..n-1 (the first has no context).

    With `stride == window` the windows do not overlap and each window's first token, having no
    context in it, is not scored (as in transformers' recipe).
    """
    context = lm.config.max_position_embeddings
    _require_int("window", window, 2, context, f"an integer from 2 to the model's context ({context})")
    _require_int("stride", stride, 1, window, f"an integer from 1 to window ({window})")
    ids = _token_tensor(token_ids, lm.config.vocab_size)
    n = ids.shape[1]
    windows = 1 + math.ceil(max(0, n - window) / stride)  # the last one reaches the end of the text
    nll, scored, scored_until = torch.zeros((), dtype=torch.float64), 0, 1
    begins = range(0, windows * stride, stride)
    for begin in tqdm(begins, desc=f"perplexity ({lm.scheme})", unit="window", disable=not progress, leave=False):
        end = min(begin + window, n)
        first = max(scored_until, begin + 1)
        logits = lm.runtime.forward(ids[:, begin:end], lm.runtime.new_cache(1, end - begin), 0, last_only=False)[0]
        # Position i's logits predict token i + 1.
        logprobs = torch.log_softmax(logits[first - 1 - begin : end - 1 - begin].double(), dim=-1)
        nll -= logprobs.gather(1, ids[0, first:end, None]).sum()
        scored, scored_until = scored + end - first, end
    mean_nll = nll.item() / scored
    return PerplexityResult(tokens=scored, mean_nll=mean_nll, perplexity=math.exp(mean_nll))


def greedy_agreement(reference_tokens: list[list[int]], candidate_tokens: list[list[int]]) -> dict:
    """How far each candidate continuation agrees with the reference for the same prompt.

    Fractions are over the longer of the two continuations, so a truncated candidate never counts
    as agreeing in full. Two empty continuations agree in full.
    """
    for name, rows in (("reference_tokens", reference_tokens), ("candidate_tokens", candidate_tokens)):
        if not isinstance(rows, (list, tuple)) or not all(
            isinstance(row, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in row)
            for row in rows
        ):
            raise InvalidRequestError(f"{name} is not a list of token-id lists", "pass one list of ints per prompt")
    if len(reference_tokens) != len(candidate_tokens) or not reference_tokens:
        raise InvalidRequestError(
            f"got {len(reference_tokens)} reference and {len(candidate_tokens)} candidate continuations",
            "pass one continuation per prompt on each side, for at least one prompt",
        )
    identical, prefix, positionwise, divergence = [], [], [], []
    for ref, cand in zip(reference_tokens, candidate_tokens):
        longest = max(len(ref), len(cand))
        matches = [a == b for a, b in zip(ref, cand)]
        common = matches.index(False) if False in matches else len(matches)
        identical.append(list(ref) == list(cand))
        divergence.append(None if identical[-1] else common)
        prefix.append(common / longest if longest else 1.0)
        positionwise.append(sum(matches) / longest if longest else 1.0)
    return {
        "prompts": len(identical),
        "identical": sum(identical) / len(identical),  # fraction of prompts with the same continuation
        "prefix_agreement": sum(prefix) / len(prefix),  # mean fraction agreeing before the first divergence
        "position_agreement": sum(positionwise) / len(positionwise),  # mean fraction agreeing position by position
        "first_divergence": divergence,  # per prompt: the first differing position, None if identical
    }


def compare_quality(
    checkpoint: Checkpoint,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    text: str | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    new_tokens: int = 32,
    *,
    window: int = 1024,
    stride: int = 512,
    progress: bool = False,
    **runtime_options,
) -> dict:
    """Each scheme's perplexity on `text` (default: the shipped DEFAULT_TEXT) and greedy continuations of
    `prompts`, against `plain`'s, which runs first whether listed or not. Runtime options go to `SecureLM`."""
    for scheme in schemes:
        _check_choice("scheme", scheme, tuple(PRESETS))
    if not prompts:
        raise InvalidRequestError("no prompts to continue", "pass at least one prompt")
    text = DEFAULT_TEXT.read_text(encoding="utf-8") if text is None else text
    token_ids = checkpoint.tokenizer.encode(text)
    threads = torch.get_num_threads()
    results: dict[str, dict] = {}
    for scheme in tqdm(list(dict.fromkeys([REFERENCE, *schemes])), desc="schemes", disable=not progress):
        with SecureLM(checkpoint, scheme, **runtime_options) as lm:
            began = time.perf_counter()
            scored = perplexity(lm, token_ids, window, stride, progress)
            perplexity_s = time.perf_counter() - began
            continuations = [
                lm.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True).tokens
                for prompt in tqdm(prompts, desc=f"greedy ({scheme})", unit="prompt", disable=not progress, leave=False)
            ]
            generation_s = time.perf_counter() - began - perplexity_s
        torch.set_num_threads(threads)  # a scheme may have split the cores for itself
        results[scheme] = {
            "perplexity": scored.perplexity,
            "mean_nll": scored.mean_nll,
            "tokens_scored": scored.tokens,
            "perplexity_s": perplexity_s,
            "continuations": continuations,
            "continuation_texts": [checkpoint.tokenizer.decode(c) for c in continuations],
            "generation_s": generation_s,
        }
    reference = results[REFERENCE]
    for result in results.values():
        result["perplexity_change_vs_plain"] = result["perplexity"] / reference["perplexity"] - 1
        result["agreement_vs_plain"] = greedy_agreement(reference["continuations"], result["continuations"])
    return {
        **checkpoint.identity(),
        "source_commit": source_commit(),
        "text_tokens": len(token_ids),
        "window": window,
        "stride": stride,
        "prompts": list(prompts),
        "new_tokens": new_tokens,
        "reference": REFERENCE,
        "schemes": results,
    }


def quality_markdown(report: dict) -> str:
    lines = [
        f"{report['model']}: perplexity on {report['text_tokens']} tokens (window {report['window']}, "
        f"stride {report['stride']}); greedy continuations of {len(report['prompts'])} prompts, "
        f"{report['new_tokens']} new tokens each, against {report['reference']}"
        + (f"; adapter {report['adapter']} on every scheme" if report.get("adapter") else ""),
        "",
        "| scheme | perplexity | vs plain | identical continuations | agreeing prefix | position-wise agreement "
        "| perplexity time, s | generation time, s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["schemes"].items():
        agreement = r["agreement_vs_plain"]
        lines.append(
            f"| {name} | {r['perplexity']:.4f} | {r['perplexity_change_vs_plain']:+.3%} "
            f"| {agreement['identical']:.0%} | {agreement['prefix_agreement']:.1%} | {agreement['position_agreement']:.1%} "
            f"| {r['perplexity_s']:.1f} | {r['generation_s']:.1f} |"
        )
    return "\n".join(lines)


def _require_int(option: str, value, low: int, high: int, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{option}={value!r} is invalid", f"use {rule}")


def _token_tensor(token_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise InvalidRequestError(
            "token_ids is not a sequence of token ids", "pass a list of ints, e.g. tokenizer.encode(text)"
        )
    if len(token_ids) < 2:
        raise InvalidRequestError(f"got {len(token_ids)} token(s); perplexity needs at least 2", "pass a longer text")
    bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"token id {bad[0]!r} is not an int in [0, {vocab_size})", "pass ids from the model's tokenizer"
        )
    return torch.tensor([list(token_ids)], dtype=torch.int64)


def run_quality(args) -> dict:
    """The `secureinfer quality` command: compare_quality on the CLI's options, printed as markdown or JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    text = None
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"cannot read the text {args.text!r}: {exc}", "pass a UTF-8 text file") from None
    report = compare_quality(
        load_checkpoint(args.model, progress=not args.quiet),
        args.scheme or DEFAULT_SCHEMES,
        text,
        new_tokens=args.new_tokens,
        window=args.window,
        stride=args.stride,
        progress=not args.quiet,
        adapter=args.adapter,
        channel=args.channel,
        device=args.device,
        threads=args.threads,
        enclave_share=args.enclave_share,
    )
    report["adapter"] = args.adapter
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else quality_markdown(report))
    return report

"""The generation loop over any causal model: prefill, incremental decode, stop conditions, streaming and timing."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Iterator, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import InvalidRequestError
from ..model.tokenizer import ChatTokenizer
from .perturbation import LogitPerturbation
from .sampling import GenerationConfig, Sampler


class CausalModel(Protocol):
    """What the loop needs from a model; the in-process engine and every protected runtime provide it."""

    def new_cache(self, batch_size: int, max_len: int): ...

    def forward(self, tokens: Tensor, cache, start: int, pad: Tensor | None = None) -> Tensor: ...


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # generated ids; an EOS that ended generation is not included
    prompt_tokens: int
    finish_reason: str  # "eos", "stop" (a stop string), "length" (max_new_tokens or the context end)
    ttft_s: float
    decode_tok_s: float
    # With `logprobs=n`: per generated token {"token", "logprob", "top": [[id, logprob], ...]}, from the
    # distribution callers are shown (perturbed, when the scheme perturbs logits).
    logprobs: list[dict] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class TextStream:
    """Iterates over text deltas as they are generated; `result` holds the full `GenerationResult` afterwards."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        # The one underlying generator, not a wrapper: a caller that stops reading early must not close it.
        return self._chunks

    def finish(self) -> GenerationResult:
        """Run the rest of the generation (if any) and return the full result."""
        for _ in self._chunks:
            pass
        if self.result is None:
            raise RuntimeError("the stream was closed before it finished; read it to the end or call finish()")
        return self.result


class Generator:
    """Runs requests against one model and tokenizer."""

    def __init__(
        self,
        model: CausalModel,
        tokenizer: ChatTokenizer,
        context_length: int,
        perturbation: LogitPerturbation | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.perturbation = perturbation

    def _choose(self, logits: Tensor, histories: list[list[int]], sampler: Sampler, config: GenerationConfig):
        """Sample from the distribution callers are shown; returns the tokens and, if asked, their logprobs."""
        if self.perturbation is not None:
            logits = self.perturbation(logits, histories)
        chosen = sampler(logits)
        if not config.logprobs:
            return chosen, [None] * len(chosen)
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(logprobs, config.logprobs, dim=-1)
        reports = [
            {
                "token": int(token),
                "logprob": float(row[token]),
                "top": [[int(i), float(v)] for i, v in zip(ids, values)],
            }
            for token, row, ids, values in zip(chosen.tolist(), logprobs, top.indices, top.values)
        ]
        return chosen, reports

    def prompt_ids(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("the prompt is empty", "pass some text to generate from")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.tokenizer.apply_chat_template(prompt)
        if len(ids) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but the model's context holds {self.context_length}",
                f"shorten the prompt below {self.context_length} tokens",
            )
        return ids

    def stream(self, prompt: str | Sequence[dict[str, str]], config: GenerationConfig) -> TextStream:
        ids = self.prompt_ids(prompt)  # validated now, so a bad request fails before iteration starts
        stream = TextStream(iter(()))
        stream._chunks = self._run(ids, config, stream)
        return stream

    def generate(self, prompt: str | Sequence[dict[str, str]], config: GenerationConfig) -> GenerationResult:
        return self.stream(prompt, config).finish()

    def generate_batch(
        self, prompts: Sequence[str | Sequence[dict[str, str]]], config: GenerationConfig
    ) -> list[GenerationResult]:
        """Several prompts in one batch, left-padded to the longest; each row stops on its own."""
        if not prompts:
            raise InvalidRequestError("the batch is empty", "pass at least one prompt")
        ids = [self.prompt_ids(p) for p in prompts]
        longest = max(map(len, ids))
        budget = min(config.max_new_tokens, self.context_length - longest)
        pad = torch.tensor([longest - len(row) for row in ids])
        filler = next(iter(self.tokenizer.eos_token_ids), 0)  # any id: padding is masked out
        tokens = torch.tensor([[filler] * int(p) + row for p, row in zip(pad, ids)])
        cache = self.model.new_cache(len(ids), longest + budget)
        sampler = Sampler(config)
        start = time.perf_counter()
        logits = self.model.forward(tokens, cache, 0, pad=pad)
        rows = [_BatchRow() for _ in ids]
        histories = [list(row) for row in ids]
        first_token_at = None
        for step in range(budget):
            chosen, reports = self._choose(logits[:, -1], histories, sampler, config)
            first_token_at = first_token_at or time.perf_counter()
            for row, history, token, report in zip(rows, histories, chosen.tolist(), reports):
                history.append(token)
                row.accept(token, report, self.tokenizer, config)
            if all(row.finish for row in rows) or step == budget - 1:
                break
            logits = self.model.forward(chosen[:, None], cache, longest + step, pad=pad)
        elapsed = time.perf_counter() - start
        return [
            GenerationResult(
                text=row.text,
                tokens=row.tokens,
                prompt_tokens=len(prompt),
                finish_reason=row.finish or "length",
                ttft_s=(first_token_at or start) - start,
                decode_tok_s=len(row.tokens) / elapsed if elapsed > 0 else 0.0,
                logprobs=row.logprobs if config.logprobs else None,
            )
            for row, prompt in zip(rows, ids)
        ]

    def _tokens(
        self, prompt: list[int], config: GenerationConfig, clock: list[float], reports: list[dict | None]
    ) -> Iterator[int]:
        """Yields generated ids; `clock` receives the time each one was ready, `reports` its logprobs.

        Lazy on purpose: the next forward runs only when the consumer asks for another token, so a
        consumer that stops (EOS, stop string) costs no wasted step.
        """
        budget = min(config.max_new_tokens, self.context_length - len(prompt))
        cache = self.model.new_cache(1, len(prompt) + budget)
        sampler = Sampler(config)
        logits = self.model.forward(torch.tensor([prompt]), cache, 0)
        position = len(prompt)
        history = list(prompt)
        for step in range(budget):
            chosen, (report,) = self._choose(logits[:, -1], [history], sampler, config)
            token = int(chosen[0])
            history.append(token)
            reports.append(report)
            clock.append(time.perf_counter())
            yield token
            if step == budget - 1:
                return
            logits = self.model.forward(torch.tensor([[token]]), cache, position)
            position += 1

    def _run(self, prompt: list[int], config: GenerationConfig, stream: TextStream) -> Iterator[str]:
        start = time.perf_counter()
        clock: list[float] = []
        reports: list[dict | None] = []
        generated: list[int] = []
        emitted, finish = 0, "length"
        holdback = max((len(s) for s in config.stop), default=1) - 1
        text = ""
        for token in self._tokens(prompt, config, clock, reports):
            if token in self.tokenizer.eos_token_ids and not config.ignore_eos:
                finish = "eos"
                break
            generated.append(token)
            text = self.tokenizer.decode(generated)
            cut = _first_stop(text, config.stop, search_from=max(0, emitted - holdback))
            if cut is not None:
                text, finish = text[:cut], "stop"
                break
            # Hold back what might be the start of a stop string or half of a multi-byte character.
            ready = len(text) - holdback
            while ready > emitted and text[ready - 1] == "\ufffd":
                ready -= 1
            if ready > emitted:
                yield text[emitted:ready]
                emitted = ready
        if len(text) > emitted:
            yield text[emitted:]
        decode_s = clock[-1] - clock[0] if len(clock) > 1 else 0.0
        stream.result = GenerationResult(
            text=text,
            tokens=generated,
            prompt_tokens=len(prompt),
            finish_reason=finish,
            ttft_s=(clock[0] - start) if clock else 0.0,
            decode_tok_s=(len(clock) - 1) / decode_s if decode_s > 0 else 0.0,
            logprobs=reports[: len(generated)] if config.logprobs else None,
        )


class _BatchRow:
    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list[dict | None] = []
        self.text = ""
        self.finish: str | None = None

    def accept(self, token: int, report: dict | None, tokenizer: ChatTokenizer, config: GenerationConfig) -> None:
        if self.finish:
            return
        if token in tokenizer.eos_token_ids and not config.ignore_eos:
            self.finish = "eos"
            return
        self.tokens.append(token)
        self.logprobs.append(report)
        self.text = tokenizer.decode(self.tokens)
        cut = _first_stop(self.text, config.stop, search_from=0)
        if cut is not None:
            self.text, self.finish = self.text[:cut], "stop"


def _first_stop(text: str, stops: tuple[str, ...], search_from: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else None

"""The generation loop on the tiny GGUF model: streaming, stop conditions (length, stop strings, EOS,
the context end), batching, the chat template, and greedy decoding checked against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import secureinfer
from secureinfer.plan import PRESETS
from gguf_fixtures import EOS_TOKEN_ID
from secureinfer import InvalidRequestError

PROMPT = "hello"
# Three prompts of different token lengths, so a batch needs left padding.
BATCH_PROMPTS = ("hello", "The cat sat on the mat", "Once upon a time, in the land of the Tok")
SHORT_CONTEXT = 32  # the context length of `short_context_gguf`


class ForcedTokens:
    """Wraps a model so that chosen generated tokens are forced: `forced[step] = id` makes generated
    token number `step` (0-based) that id, in every batch row or only in `rows`.

    Every other step is left exactly as the real model computes it. This gives runs the random tiny
    model never makes on its own (EOS, a multi-byte character split over tokens); with nothing
    forced it just counts forward calls.
    """

    def __init__(self, model, forced: dict[int, int], rows: list[int] | None = None):
        self.model, self.forced, self.rows = model, forced, rows
        self.forward_calls = 0

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_cache(batch_size, max_len)

    def forward(self, tokens, cache, start, pad=None):
        logits = self.model.forward(tokens, cache, start, pad=pad)
        # Forward call 0 is the prefill, which yields the logits of generated token 0, and so on.
        if self.forward_calls in self.forced:
            logits = logits.clone()
            rows = slice(None) if self.rows is None else self.rows
            logits[rows, :, self.forced[self.forward_calls]] = logits.max() + 10.0
        self.forward_calls += 1
        return logits


@pytest.fixture
def force_tokens(tiny_lm, monkeypatch):
    """Installs a `ForcedTokens` wrapper around the tiny model for one test and returns it."""

    def install(forced: dict[int, int], rows: list[int] | None = None) -> ForcedTokens:
        wrapper = ForcedTokens(real_model, forced, rows)
        monkeypatch.setattr(tiny_lm.generator, "model", wrapper)
        return wrapper

    real_model = tiny_lm.generator.model
    return install


@pytest.fixture(scope="module")
def unconstrained(tiny_lm):
    """The greedy continuation of PROMPT with no stop condition but length."""
    result = tiny_lm.generate(PROMPT, max_new_tokens=40)
    assert result.finish_reason == "length"
    return result


@pytest.fixture(scope="module")
def short_lm(short_context_gguf):
    return secureinfer.load(short_context_gguf, progress=False)


def prompt_of_tokens(lm, count: int) -> str:
    # "x" has no merges in the tiny vocabulary, so each one is a token.
    prompt = "x" * count
    assert len(lm.tokenizer.encode(prompt)) == count
    return prompt


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=40),
        # Sampled output of a random model is full of partial UTF-8 sequences, which the stream holds back.
        dict(max_new_tokens=40, temperature=1.0, seed=1),
        dict(max_new_tokens=40, temperature=0.8, top_k=50, top_p=0.9, seed=2),
    ],
    ids=["greedy", "sampled", "sampled-top-k-top-p"],
)
def test_stream_chunks_add_up_to_the_result(tiny_lm, options):
    stream = tiny_lm.stream(PROMPT, **options)
    chunks = list(stream)
    assert stream.result is not None
    assert "".join(chunks) == stream.result.text
    assert all(chunks)  # no empty deltas
    # The stream is the same run `generate` makes.
    generated = tiny_lm.generate(PROMPT, **options)
    assert (stream.result.tokens, stream.result.text) == (generated.tokens, generated.text)


def test_a_character_split_over_tokens_is_streamed_whole(tiny_lm, force_tokens):
    text = "a€é🙂b"  # 3-, 2- and 4-byte characters; byte-level BPE spells each byte as one token here
    ids = tiny_lm.tokenizer.encode(text)
    assert len(ids) == len(text.encode())
    force_tokens(dict(enumerate(ids)))
    stream = tiny_lm.stream(PROMPT, max_new_tokens=len(ids))
    chunks = list(stream)
    assert stream.result.text == text
    assert "".join(chunks) == text
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_lm):
    first = tiny_lm.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=7)
    again = tiny_lm.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=7)
    other = tiny_lm.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=8)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens


@pytest.mark.parametrize("bad_prompt", ["", "   \n"])
def test_stream_rejects_a_bad_prompt_before_iteration(tiny_lm, bad_prompt):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_lm.stream(bad_prompt)  # not iterated: the request is checked when the stream is made


def test_stream_runs_the_model_only_when_iterated(tiny_lm, force_tokens):
    counter = force_tokens({})
    stream = tiny_lm.stream(PROMPT, max_new_tokens=5)
    assert counter.forward_calls == 0
    chunks = iter(stream)
    next(chunks)
    assert counter.forward_calls >= 1
    list(chunks)
    # One prefill plus one decode step per token after the first: no wasted step at the end.
    assert counter.forward_calls == len(stream.result.tokens) == 5


def test_finish_after_reading_part_of_the_stream_returns_the_whole_result(tiny_lm, unconstrained):
    stream = tiny_lm.stream(PROMPT, max_new_tokens=40)
    first_chunk = next(iter(stream))  # e.g. a caller that only waits for the first text
    result = stream.finish()
    assert result.text.startswith(first_chunk)
    assert result.tokens == unconstrained.tokens


# --- length ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [1, 2, 17])
def test_max_new_tokens_is_exact_with_ignore_eos(tiny_lm, max_new_tokens):
    result = tiny_lm.generate(PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True)
    assert len(result.tokens) == max_new_tokens
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(tiny_lm.tokenizer.encode(PROMPT))


# --- stop strings ------------------------------------------------------------------------------


def test_stop_string_cuts_the_text_before_its_first_occurrence(tiny_lm, unconstrained):
    text = unconstrained.text
    middle = len(text) // 2
    stop = text[middle - 1 : middle + 2]  # spans tokens, so it must be matched across deltas
    assert len(stop) == 3
    expected = text[: text.index(stop)]

    stream = tiny_lm.stream(PROMPT, max_new_tokens=40, stop=(stop,))
    chunks = list(stream)
    result = stream.result
    assert result.text == expected
    assert result.finish_reason == "stop"
    # Nothing of the stop string leaked into the stream ahead of the cut.
    assert "".join(chunks) == expected
    # It stops at the token that completes the stop string: not before, and no step wasted after.
    completing = next(
        n for n in range(1, len(unconstrained.tokens) + 1)
        if stop in tiny_lm.tokenizer.decode(unconstrained.tokens[:n])
    )
    assert result.tokens == unconstrained.tokens[:completing]


def test_the_earliest_of_several_stop_strings_wins(tiny_lm, unconstrained):
    text = unconstrained.text
    early, late = text[1:3], text[len(text) // 2 :][:3]
    assert text.index(early) < text.index(late)
    result = tiny_lm.generate(PROMPT, max_new_tokens=40, stop=(late, early))
    assert result.text == text[: text.index(early)]
    assert result.finish_reason == "stop"


def test_absent_stop_string_changes_nothing(tiny_lm, unconstrained):
    absent = "never in this output"
    assert absent not in unconstrained.text
    stream = tiny_lm.stream(PROMPT, max_new_tokens=40, stop=(absent,))
    assert "".join(stream) == unconstrained.text
    assert (stream.result.tokens, stream.result.finish_reason) == (unconstrained.tokens, "length")


# --- EOS ---------------------------------------------------------------------------------------


def test_generation_ends_at_eos_without_emitting_it(tiny_lm, unconstrained, force_tokens):
    force_tokens({3: EOS_TOKEN_ID})
    stream = tiny_lm.stream(PROMPT, max_new_tokens=40)
    chunks = list(stream)
    result = stream.result
    assert result.finish_reason == "eos"
    assert result.tokens == unconstrained.tokens[:3]
    assert EOS_TOKEN_ID not in result.tokens
    assert result.text == tiny_lm.tokenizer.decode(unconstrained.tokens[:3])
    assert "<|im_end|>" not in result.text
    assert "".join(chunks) == result.text


def test_ignore_eos_generates_through_eos(tiny_lm, force_tokens):
    force_tokens({3: EOS_TOKEN_ID})
    result = tiny_lm.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert len(result.tokens) == 8
    assert result.finish_reason == "length"
    assert "<|im_end|>" not in result.text


# --- the context limit -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt_tokens", [SHORT_CONTEXT, SHORT_CONTEXT + 8])
def test_prompt_that_fills_the_context_is_rejected(short_lm, prompt_tokens):
    prompt = prompt_of_tokens(short_lm, prompt_tokens)
    with pytest.raises(InvalidRequestError, match=rf"{prompt_tokens} tokens.*{SHORT_CONTEXT}"):
        short_lm.stream(prompt)


def test_generation_stops_at_the_context_end(short_lm):
    result = short_lm.generate(prompt_of_tokens(short_lm, 28), max_new_tokens=100, ignore_eos=True)
    assert result.finish_reason == "length"
    assert result.prompt_tokens == 28
    assert len(result.tokens) == SHORT_CONTEXT - 28


def test_batch_stops_at_the_context_end_of_its_longest_prompt(short_lm):
    results = short_lm.generate_batch([prompt_of_tokens(short_lm, 28), "x"], max_new_tokens=100)
    assert [len(r.tokens) for r in results] == [SHORT_CONTEXT - 28] * 2
    assert all(r.finish_reason == "length" for r in results)


# --- batches -----------------------------------------------------------------------------------


def assert_batch_matches_single_runs(lm, options: dict) -> list:
    """Compares a batch run of BATCH_PROMPTS with one run per prompt, and returns the batch results."""
    batch = lm.generate_batch(list(BATCH_PROMPTS), **options)
    singles = [lm.generate(prompt, **options) for prompt in BATCH_PROMPTS]
    for got, want in zip(batch, singles, strict=True):
        assert (got.tokens, got.text, got.finish_reason, got.prompt_tokens) == (
            want.tokens,
            want.text,
            want.finish_reason,
            want.prompt_tokens,
        )
    return batch


def test_batch_prompts_have_different_lengths(tiny_lm):
    assert len({len(tiny_lm.tokenizer.encode(p)) for p in BATCH_PROMPTS}) == len(BATCH_PROMPTS)


def test_batch_equals_separate_greedy_runs(tiny_lm):
    assert_batch_matches_single_runs(tiny_lm, dict(max_new_tokens=12))


def test_batch_equals_separate_runs_with_stop_strings(tiny_lm):
    texts = [tiny_lm.generate(prompt, max_new_tokens=12).text for prompt in BATCH_PROMPTS]
    # One stop string from the middle of row 0's text and one from the start of row 2's, so rows
    # stop at different steps while row 1 runs to the end.
    stops = (texts[0][4:6], texts[2][1:4])
    assert not any(stop in texts[1] for stop in stops)
    batch = assert_batch_matches_single_runs(tiny_lm, dict(max_new_tokens=12, stop=stops))
    assert [r.finish_reason for r in batch] == ["stop", "length", "stop"]


def test_batch_row_ends_at_eos_on_its_own(tiny_lm, force_tokens):
    options = dict(max_new_tokens=8)
    singles = [tiny_lm.generate(prompt, **options) for prompt in BATCH_PROMPTS]
    force_tokens({3: EOS_TOKEN_ID}, rows=[1])
    batch = tiny_lm.generate_batch(list(BATCH_PROMPTS), **options)
    assert [r.finish_reason for r in batch] == ["length", "eos", "length"]
    assert batch[1].tokens == singles[1].tokens[:3]
    assert batch[0].tokens == singles[0].tokens
    assert batch[2].tokens == singles[2].tokens


def test_batch_honours_ignore_eos(tiny_lm, force_tokens):
    force_tokens({3: EOS_TOKEN_ID})
    results = tiny_lm.generate_batch(list(BATCH_PROMPTS), max_new_tokens=8, ignore_eos=True)
    assert [len(r.tokens) for r in results] == [8, 8, 8]
    assert all(r.finish_reason == "length" for r in results)


def test_chat_batch_answers_each_conversation_as_chat_does(tiny_lm):
    conversations = [
        [{"role": "user", "content": prompt}] if i != 1 else
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        for i, prompt in enumerate(BATCH_PROMPTS)
    ]  # fmt: skip
    options = dict(max_new_tokens=6, ignore_eos=True, logprobs=3)
    batch = tiny_lm.chat_batch(conversations, **options)
    for got, messages in zip(batch, conversations, strict=True):
        want = tiny_lm.chat(messages, **options)
        assert (got.tokens, got.text, got.prompt_tokens) == (want.tokens, want.text, want.prompt_tokens)
        for got_step, want_step in zip(got.logprobs, want.logprobs, strict=True):
            assert [i for i, _ in got_step["top"]] == [i for i, _ in want_step["top"]]
            assert got_step["logprob"] == pytest.approx(want_step["logprob"], abs=1e-4)


def test_chat_batch_rejects_a_malformed_conversation(tiny_lm):
    with pytest.raises(InvalidRequestError, match="role"):
        tiny_lm.chat_batch([[{"role": "user", "content": "hi"}], [{"content": "no role"}]])


def test_empty_batch_is_rejected(tiny_lm):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_lm.generate_batch([])


# --- the independent reference -----------------------------------------------------------------


def transformers_greedy(hf_model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt_ids`, exactly `new_tokens` long."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        output = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # like our ignore_eos, as long as greedy never picks EOS
        )
    return output[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("prompt", BATCH_PROMPTS)
def test_greedy_matches_transformers(tiny_lm, tiny_hf_model, prompt):
    ours = tiny_lm.generate(prompt, max_new_tokens=20, ignore_eos=True)
    assert EOS_TOKEN_ID not in ours.tokens  # else min_new_tokens would make transformers differ
    assert ours.tokens == transformers_greedy(tiny_hf_model, tiny_lm.tokenizer.encode(prompt), 20)


# --- chat --------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello, how can I help?"},
    {"role": "user", "content": "what is the weather?"},
]


def test_chat_answers_the_prompt_transformers_templates(tiny_lm, tiny_gguf, tiny_hf_model):
    reference = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    template_ids = reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert tiny_lm.tokenizer.apply_chat_template(CONVERSATION) == template_ids
    result = tiny_lm.chat(CONVERSATION, max_new_tokens=5, ignore_eos=True)
    assert result.prompt_tokens == len(template_ids)
    assert result.tokens == transformers_greedy(tiny_hf_model, template_ids, 5)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user"}], "message 0 is not"),
        ([{"role": "user", "content": "hi", "name": "x"}], "message 0 is not"),
        ([{"role": "user", "content": 5}], "not a string"),
        ([{"role": "system", "content": "be nice"}, {"role": "user", "content": "  "}], "no non-empty user message"),
        ([{"role": "system", "content": "be nice"}], "no non-empty user message"),
    ],
    ids=["empty", "wrong-role", "no-content", "extra-key", "non-string", "blank-user", "no-user"],
)
def test_bad_message_list_is_rejected(tiny_lm, messages, problem):
    with pytest.raises(InvalidRequestError, match=problem):
        tiny_lm.chat(messages)
    with pytest.raises(InvalidRequestError, match=problem):
        tiny_lm.stream(messages)  # rejected before iteration, as a bad prompt is


def test_chat_rejects_a_plain_string(tiny_lm):
    # A string is not a conversation; answering it as raw text would silently skip the chat template.
    with pytest.raises(InvalidRequestError):
        tiny_lm.chat("hello")


def test_generate_rejects_a_message_list(tiny_lm):
    with pytest.raises(InvalidRequestError, match="not a string"):
        tiny_lm.generate(CONVERSATION)


# --- load options ------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_known_ones(tiny_gguf):
    with pytest.raises(InvalidRequestError, match="unknown scheme 'nope'") as excinfo:
        secureinfer.load(tiny_gguf, scheme="nope", progress=False)
    assert all(scheme in excinfo.value.fix for scheme in PRESETS)


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_thread_count_is_rejected(tiny_gguf, threads):
    with pytest.raises(InvalidRequestError, match="threads="):
        secureinfer.load(tiny_gguf, threads=threads, progress=False)

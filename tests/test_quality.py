"""Quality bench: strided perplexity against transformers' own recipe, greedy agreement, input checks, and the
real model's quantized and blinded schemes held to fp32 perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from secureinfer.api import SecureLM
from secureinfer.bench.quality import (
    DEFAULT_PROMPTS,
    DEFAULT_TEXT,
    compare_quality,
    greedy_agreement,
    perplexity,
    quality_markdown,
)
from secureinfer.errors import InvalidRequestError
from secureinfer.model import load_checkpoint

PPL_TARGET = 0.02  # the project's bound on int8's perplexity change against fp32


def transformers_strided_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """The strided recipe from transformers' perplexity guide, run on transformers' model with `labels`.

    The guide weights each window's mean loss by its label count minus one; that is right only for
    the first window. A later window's first label has context before it and is scored, so the
    weight here is the count of labels the shifted loss actually averages over.
    """
    nll_sum, scored, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        count = int((labels[:, 1:] != -100).sum())
        nll_sum += loss.item() * count
        scored += count
        previous_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / scored), scored


@pytest.fixture(scope="module")
def random_ids(tiny_lm):
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, tiny_lm.config.vocab_size, (100,), generator=generator).tolist()


@pytest.mark.parametrize(
    "window, stride, scored",
    [(40, 16, 99), (40, 40, 97), (128, 64, 99), (2, 1, 99)],
    ids=["overlapping", "disjoint", "one-window", "smallest"],
)
def test_perplexity_matches_transformers_strided_recipe(tiny_lm, tiny_hf_model, random_ids, window, stride, scored):
    ours = perplexity(tiny_lm, random_ids, window=window, stride=stride)
    reference, reference_scored = transformers_strided_perplexity(tiny_hf_model, random_ids, window, stride)
    assert ours.tokens == reference_scored == scored
    assert ours.perplexity == pytest.approx(reference, rel=1e-4)
    assert ours.mean_nll == pytest.approx(math.log(ours.perplexity))


def test_overlapping_windows_give_later_tokens_more_context(tiny_lm, random_ids):
    """The figures differ with the overlap, so the windows really are cut where asked."""
    assert perplexity(tiny_lm, random_ids, 40, 16).perplexity != perplexity(tiny_lm, random_ids, 40, 40).perplexity


def test_greedy_agreement_of_identical_continuations():
    agreement = greedy_agreement([[1, 2, 3], [4, 5], []], [[1, 2, 3], [4, 5], []])
    assert agreement == {
        "prompts": 3,
        "identical": 1.0,
        "prefix_agreement": 1.0,
        "position_agreement": 1.0,
        "first_divergence": [None, None, None],
    }


def test_greedy_agreement_counts_up_to_the_first_divergence_and_position_by_position():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    candidate = [[1, 2, 0, 4], [0, 6, 7, 8], [9, 9, 9, 9]]
    agreement = greedy_agreement(reference, candidate)
    assert agreement["identical"] == pytest.approx(1 / 3)
    assert agreement["first_divergence"] == [2, 0, None]
    assert agreement["prefix_agreement"] == pytest.approx((2 / 4 + 0 / 4 + 1) / 3)
    assert agreement["position_agreement"] == pytest.approx((3 / 4 + 3 / 4 + 1) / 3)


def test_greedy_agreement_holds_a_shorter_continuation_to_the_longer_length():
    agreement = greedy_agreement([[1, 2, 3, 4], [1, 2]], [[1, 2], [1, 2, 3, 4]])
    assert agreement["identical"] == 0.0
    assert agreement["first_divergence"] == [2, 2]
    assert agreement["prefix_agreement"] == agreement["position_agreement"] == 0.5


@pytest.mark.parametrize(
    "reference, candidate, message",
    [
        ([[1]], [[1], [2]], "1 reference and 2 candidate"),
        ([], [], "0 reference and 0 candidate"),
        ([1, 2], [[1, 2]], "reference_tokens is not a list of token-id lists"),
        ([[1]], [[1.0]], "candidate_tokens is not a list of token-id lists"),
        ([[True]], [[1]], "reference_tokens is not"),
    ],
)
def test_greedy_agreement_rejects_malformed_input(reference, candidate, message):
    with pytest.raises(InvalidRequestError, match=message):
        greedy_agreement(reference, candidate)


@pytest.mark.parametrize(
    "ids, window, stride, message",
    [
        ([1, 2, 3], 129, 1, r"window=129 is invalid; use an integer from 2 to the model's context \(128\)"),
        ([1, 2, 3], 1, 1, "window=1 is invalid"),
        ([1, 2, 3], True, 1, "window=True is invalid"),
        ([1, 2, 3], 8, 0, r"stride=0 is invalid; use an integer from 1 to window \(8\)"),
        ([1, 2, 3], 8, 9, "stride=9 is invalid"),
        ([1, 2, 3], 8, 4.0, "stride=4.0 is invalid"),
        ([5], 8, 4, "got 1 token"),
        ([], 8, 4, "got 0 token"),
        ("some text", 8, 4, "token_ids is not a sequence of token ids"),
        ([1, -1], 8, 4, r"token id -1 is not an int in \[0, "),
        ([1, 10**6], 8, 4, "token id 1000000 is not an int"),
        ([1, 2.0], 8, 4, "token id 2.0 is not an int"),
        ([1, False], 8, 4, "token id False is not an int"),
        ([1, None], 8, 4, "token id None is not an int"),
    ],
)
def test_perplexity_rejects_bad_input(tiny_lm, ids, window, stride, message):
    with pytest.raises(InvalidRequestError, match=message):
        perplexity(tiny_lm, ids, window=window, stride=stride)


def test_compare_quality_rejects_unknown_schemes_and_no_prompts(tiny_gguf):
    checkpoint = load_checkpoint(tiny_gguf, progress=False)
    with pytest.raises(InvalidRequestError, match="unknown scheme 'fp8'"):
        compare_quality(checkpoint, ("plain", "fp8"), text="hello there")
    with pytest.raises(InvalidRequestError, match="no prompts"):
        compare_quality(checkpoint, ("plain",), text="hello there", prompts=())


def test_the_shipped_text_and_prompts():
    assert DEFAULT_TEXT.is_file() and (DEFAULT_TEXT.parent / "README.md").is_file()
    assert len(DEFAULT_TEXT.read_text(encoding="utf-8").split()) > 1000
    assert len(DEFAULT_PROMPTS) == 5


def test_compare_quality_on_the_tiny_model(tiny_gguf):
    checkpoint = load_checkpoint(tiny_gguf, progress=False)
    threads = torch.get_num_threads()
    report = compare_quality(
        checkpoint, ("plain-int8", "secureinfer"), text="The cat sat on the mat and then it ran to the door. " * 3,
        prompts=("The cat", "Once upon a time"), new_tokens=5, window=32, stride=16,
    )  # fmt: skip
    assert torch.get_num_threads() == threads  # the blinded scheme's core split does not outlive it
    assert list(report["schemes"]) == ["plain", "plain-int8", "secureinfer"]
    plain, int8, blinded = (report["schemes"][s] for s in ("plain", "plain-int8", "secureinfer"))
    assert plain["perplexity_change_vs_plain"] == 0 and plain["agreement_vs_plain"]["identical"] == 1.0
    assert plain["tokens_scored"] == report["text_tokens"] - 1
    assert all(len(c) == 5 for c in plain["continuations"]) and len(plain["continuation_texts"]) == 2
    assert blinded["perplexity"] == int8["perplexity"] and blinded["continuations"] == int8["continuations"]
    assert int8["perplexity_change_vs_plain"] == pytest.approx(int8["perplexity"] / plain["perplexity"] - 1)
    table = quality_markdown(report)
    assert "| plain | " in table and "| secureinfer | " in table and "+0.000%" in table


# --- the real model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_report(real_checkpoint):
    """fp32 and int8 on the whole shipped text (~80 s on 2 cores)."""
    return compare_quality(real_checkpoint, ("plain-int8",), new_tokens=16)


@pytest.mark.integration
def test_int8_perplexity_is_within_the_target_of_fp32(real_report):
    plain, int8 = real_report["schemes"]["plain"], real_report["schemes"]["plain-int8"]
    assert real_report["text_tokens"] > 1500 and plain["tokens_scored"] == real_report["text_tokens"] - 1
    assert 5 < plain["perplexity"] < 50  # fluent English to a small instruct model
    assert abs(int8["perplexity_change_vs_plain"]) < PPL_TARGET, quality_markdown(real_report)


@pytest.mark.integration
def test_secureinfer_perplexity_equals_plain_int8_exactly(real_checkpoint):
    """On the text's first 512 tokens, striding included: a blinded forward of 256 positions takes seconds."""
    ids = real_checkpoint.tokenizer.encode(DEFAULT_TEXT.read_text(encoding="utf-8"))[:512]
    threads = torch.get_num_threads()
    results = {}
    for scheme in ("plain-int8", "secureinfer"):
        with SecureLM(real_checkpoint, scheme) as lm:
            results[scheme] = perplexity(lm, ids, window=256, stride=128)
        torch.set_num_threads(threads)
    assert results["secureinfer"] == results["plain-int8"]
    assert results["secureinfer"].tokens == 511

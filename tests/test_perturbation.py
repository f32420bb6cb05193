"""Logit perturbation and logprobs: greedy output unchanged, shown distribution changed, noise keyed on the context."""

from __future__ import annotations

import pytest
import torch

import secureinfer
from secureinfer.engine.perturbation import LogitPerturbation
from secureinfer.errors import InvalidRequestError


def test_perturbation_keeps_the_argmax_and_moves_the_rest():
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    histories = [[i, 7, 9] for i in range(64)]
    noisy = LogitPerturbation(2.0)(logits, histories)
    assert torch.equal(noisy.argmax(-1), logits.argmax(-1))
    moved = (noisy - logits).abs()
    assert moved.mean() > 1.0  # about 2 * sqrt(2/pi) for N(0, 4) noise
    # Only the two swapped entries per row break the plain "logit + noise" picture.
    assert ((noisy - logits).std(dim=-1) - 2.0).abs().max() < 0.5


def test_the_noise_is_keyed_on_the_context_so_repeating_a_query_averages_nothing():
    perturb = LogitPerturbation(1.0)
    logits = torch.randn(1, 500)
    first, again = perturb(logits, [[1, 2, 3]]), perturb(logits, [[1, 2, 3]])
    other = perturb(logits, [[1, 2, 4]])
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.equal(first, LogitPerturbation(1.0)(logits, [[1, 2, 3]]))  # another key, other noise


def test_scale_zero_is_the_identity_and_bad_scales_are_refused():
    logits = torch.randn(2, 10)
    assert torch.equal(LogitPerturbation(0)(logits, [[1], [2]]), logits)
    for bad in (-1, float("nan"), float("inf"), "1", True):
        with pytest.raises(InvalidRequestError, match="perturbation"):
            LogitPerturbation(bad)


def test_logprobs_report_the_shown_distribution_and_greedy_tokens_do_not_change(tiny_gguf):
    prompt = "the quick brown fox"
    with secureinfer.load(tiny_gguf, progress=False, channel="inprocess") as clear, secureinfer.load(
        tiny_gguf, progress=False, channel="inprocess", perturbation=3.0
    ) as perturbed:
        a = clear.generate(prompt, max_new_tokens=12, ignore_eos=True, logprobs=5)
        b = perturbed.generate(prompt, max_new_tokens=12, ignore_eos=True, logprobs=5)
        assert perturbed.stats()["perturbation"] == 3.0
        again = perturbed.generate(prompt, max_new_tokens=12, ignore_eos=True, logprobs=5)
    assert a.tokens == b.tokens
    assert len(a.logprobs) == len(a.tokens) == 12
    for report, token in zip(a.logprobs, a.tokens):
        assert report["token"] == token and len(report["top"]) == 5
        assert report["top"][0][0] == token  # greedy picks the most likely token
        assert report["logprob"] == pytest.approx(report["top"][0][1])
        assert [v for _, v in report["top"]] == sorted((v for _, v in report["top"]), reverse=True)
    shown_clear = [r["logprob"] for r in a.logprobs]
    shown_noisy = [r["logprob"] for r in b.logprobs]
    assert max(abs(x - y) for x, y in zip(shown_clear, shown_noisy)) > 0.1
    assert again.logprobs == b.logprobs


def test_logprobs_in_a_batch_and_bad_values(tiny_lm):
    results = tiny_lm.generate_batch(["a b c", "hello there world"], max_new_tokens=4, ignore_eos=True, logprobs=2)
    for result in results:
        assert [r["token"] for r in result.logprobs] == result.tokens
    assert tiny_lm.generate("a b c", max_new_tokens=2).logprobs is None
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(InvalidRequestError, match="logprobs"):
            tiny_lm.generate("a b c", logprobs=bad)

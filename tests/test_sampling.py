"""The sampler against plain probability: argmax for greedy, softmax frequencies for sampling, the
documented top-k / top-p cuts, reproducible seeds, and the validation of every generation option."""

from __future__ import annotations

import math

import pytest
import torch

from secureinfer import GenerationConfig, InvalidRequestError
from secureinfer.engine import Sampler

# Enough draws that a binomial frequency is pinned to within ~1 percentage point.
NUM_DRAWS = 20_000
# A frequency this many standard errors from its probability fails; with a fixed seed the draws are
# fixed too, so this only has to separate "right distribution" from "wrong one" (checked below).
MAX_Z_SCORE = 5.0


def random_logits(shape: int | tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def draw(config: GenerationConfig, logits: torch.Tensor, num_draws: int = NUM_DRAWS) -> torch.Tensor:
    """`num_draws` independent samples from one row of logits, taken as one batch of identical rows."""
    return Sampler(config)(logits.expand(num_draws, -1))


def max_z_score(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """The largest distance, in binomial standard errors, between a token's frequency and its probability.

    Tokens of probability 0 must never be drawn: one draw of such a token gives an infinite score.
    """
    n = samples.numel()
    freqs = torch.bincount(samples, minlength=probs.numel()).double() / n
    probs = probs.double()
    stderr = (probs * (1 - probs) / n).sqrt()
    impossible_drawn = ((probs == 0) & (freqs > 0)).any().item()
    possible = probs > 0
    z = ((freqs - probs).abs()[possible] / stderr[possible].clamp_min(1e-12)).max().item()
    return math.inf if impossible_drawn else z


# --- greedy ------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = random_logits((16, 300), seed=0)
    chosen = Sampler(GenerationConfig(temperature=0.0, seed=1))(logits)
    assert torch.equal(chosen, logits.argmax(dim=-1))


def test_top_k_one_is_argmax_at_any_temperature():
    logits = random_logits((16, 300), seed=1)
    sampler = Sampler(GenerationConfig(temperature=1.5, top_k=1, seed=2))
    for _ in range(5):  # a sampling path would show up as a non-argmax pick in some row
        assert torch.equal(sampler(logits), logits.argmax(dim=-1))


def test_tiny_temperature_tends_to_argmax():
    # softmax(logits / T) tends to the one-hot argmax as T -> 0; a valid T must not overflow it into NaN.
    logits = random_logits((16, 300), seed=12)
    chosen = Sampler(GenerationConfig(temperature=1e-39, seed=13))(logits)
    assert torch.equal(chosen, logits.argmax(dim=-1))


# --- seeds -------------------------------------------------------------------------------------


def sampled_sequence(seed: int, steps: int = 50) -> list[int]:
    """Successive single-row draws, as the generation loop makes them, from a flat-ish distribution."""
    sampler = Sampler(GenerationConfig(temperature=1.0, seed=seed))
    logits = random_logits(64, seed=3, scale=0.3)[None, :]
    return [int(sampler(logits)) for _ in range(steps)]


def test_same_seed_same_sequence():
    assert sampled_sequence(seed=123) == sampled_sequence(seed=123)


def test_different_seeds_differ():
    assert sampled_sequence(seed=123) != sampled_sequence(seed=124)


def test_sampler_without_seed_draws_a_fresh_one():
    first, second = Sampler(GenerationConfig(temperature=1.0)), Sampler(GenerationConfig(temperature=1.0))
    assert first.seed != second.seed


# --- distributions -----------------------------------------------------------------------------


def test_temperature_one_matches_softmax():
    logits = random_logits(12, seed=4)
    samples = draw(GenerationConfig(temperature=1.0, seed=5), logits)
    assert max_z_score(samples, logits.softmax(-1)) < MAX_Z_SCORE


def test_temperature_scales_logits_before_softmax():
    logits = random_logits(12, seed=6)
    samples = draw(GenerationConfig(temperature=0.5, seed=7), logits)
    assert max_z_score(samples, (logits / 0.5).softmax(-1)) < MAX_Z_SCORE
    # The check is sharp enough to tell the tempered distribution from the untempered one.
    assert max_z_score(samples, logits.softmax(-1)) > MAX_Z_SCORE


def test_top_k_draws_only_the_k_largest_logits_in_softmax_proportion():
    logits = random_logits(50, seed=8)
    k = 5
    samples = draw(GenerationConfig(temperature=1.0, top_k=k, seed=9), logits)
    top = logits.topk(k)
    assert set(samples.tolist()) == set(top.indices.tolist())  # all of them, and nothing else
    expected = torch.zeros_like(logits).index_put_((top.indices,), top.values.softmax(-1))
    assert max_z_score(samples, expected) < MAX_Z_SCORE


# Probabilities 0.6, 0.25, 0.1, 0.05, placed out of order so the cut must follow the sorted order.
NUCLEUS_PROBS = torch.tensor([0.1, 0.6, 0.05, 0.25])


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        # The mass before 0.6 is 0 < 0.5: kept; before 0.25 it is 0.6 >= 0.5: dropped.
        (0.5, [1]),
        # Before 0.25 the mass is 0.6 < 0.7: kept; before 0.1 it is 0.85 >= 0.7: dropped.
        (0.7, [1, 3]),
        # Before 0.05 the mass is 0.95 < 0.96: everything stays.
        (0.96, [0, 1, 2, 3]),
        # Below the top token's own mass, the top token still stays.
        (0.01, [1]),
    ],
)
def test_top_p_keeps_tokens_until_the_mass_before_them_reaches_top_p(top_p, kept):
    samples = draw(GenerationConfig(temperature=1.0, top_p=top_p, seed=10), NUCLEUS_PROBS.log())
    assert set(samples.tolist()) == set(kept)
    expected = torch.zeros_like(NUCLEUS_PROBS)
    expected[kept] = NUCLEUS_PROBS[kept] / NUCLEUS_PROBS[kept].sum()
    assert max_z_score(samples, expected) < MAX_Z_SCORE


@pytest.mark.parametrize(("top_p", "kept"), [(0.87, [1, 3]), (0.9, [0, 1, 3])])
def test_top_p_applies_to_the_mass_left_after_top_k(top_p, kept):
    # top_k=3 keeps 0.6, 0.25 and 0.1, renormalised to 0.63, 0.26, 0.11: the mass before the third is
    # 0.89. Without the renormalisation it would be 0.85, and top_p=0.87 would wrongly keep it.
    samples = draw(GenerationConfig(temperature=1.0, top_k=3, top_p=top_p, seed=11), NUCLEUS_PROBS.log())
    assert set(samples.tolist()) == set(kept)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -1),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", True),
        ("temperature", -1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "0.5"),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_p", 0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("seed", -1),
        ("seed", 1.0),
        ("stop", [""]),
        ("stop", ""),
        ("stop", ["ok", 3]),
        ("stop", 5),
    ],
)
def test_invalid_option_is_rejected_by_name(option, value):
    with pytest.raises(InvalidRequestError, match=rf"^{option}=") as excinfo:
        GenerationConfig(**{option: value})
    assert excinfo.value.fix  # a hint on what to pass instead


@pytest.mark.parametrize(
    "options",
    [
        dict(max_new_tokens=1),
        dict(temperature=0),
        dict(temperature=2),
        dict(top_k=0),
        dict(top_p=1),
        dict(top_p=1e-6),
        dict(seed=0),
        dict(stop="x"),
    ],
)
def test_boundary_values_are_accepted(options):
    GenerationConfig(**options)


def test_a_single_stop_string_becomes_a_tuple():
    assert GenerationConfig(stop="END").stop == ("END",)
    assert GenerationConfig(stop=["a", "b"]).stop == ("a", "b")

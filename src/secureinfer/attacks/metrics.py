"""How much of a conversation a recovery attack got back (DESIGN §4), and the chance level to read it against.

An attack hands in one guess per token position of the conversation (None where it makes no guess). Scores:
token recovery (positions exactly right), exact-span recovery of the sensitive fields (does the recovered text
contain the field's text verbatim), and character similarity of the recovered text to the true one. Chance is the
token recovery of an attacker who learned nothing from the device and guesses the most frequent token of a public
text at every position.
"""

from __future__ import annotations

import difflib
import itertools
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from statistics import fmean
from typing import Sequence

import torch
from torch import Tensor

from ..data import EVAL_TEXT
from .victims import Conversation, SensitiveField

# Stands in for each position without a guess in the recovered text, so that no-guess positions neither vanish
# (which would splice true neighbours together) nor match any sensitive text.
NO_GUESS = "\ufffd"


def token_recovery(true_ids: Sequence[int], recovered_ids: Sequence[int | None]) -> float:
    """Fraction of positions whose recovered id is the true id; a None (no guess) counts as wrong."""
    if not len(true_ids):
        raise ValueError("no true tokens to score")
    if len(recovered_ids) != len(true_ids):
        raise ValueError(
            f"{len(recovered_ids)} guesses for {len(true_ids)} tokens; give one per position (None for none)"
        )
    right = sum(guess is not None and int(guess) == int(true) for true, guess in zip(true_ids, recovered_ids))
    return right / len(true_ids)


def span_recovery(true_text: str, recovered_text: str, spans: Sequence[SensitiveField]) -> dict:
    """For each sensitive field, whether its exact text occurs in the recovered text, and the fraction recovered.

    Every span must occur in `true_text`: one that does not belongs to another conversation, or to a part of
    this one that was not scored, and could never be recovered.
    """
    if not spans:
        raise ValueError("no sensitive fields to score")
    absent = [span.text for span in spans if span.text not in true_text]
    if absent:
        raise ValueError(f"sensitive texts {absent} are not in the true text; score each field with its conversation")
    fields = [{"kind": span.kind, "text": span.text, "recovered": span.text in recovered_text} for span in spans]
    return {"fields": fields, "fraction": fmean(field["recovered"] for field in fields)}


def char_similarity(a: str, b: str) -> float:
    """Similarity in [0, 1]: twice the matched characters over the total length (difflib's ratio)."""
    # autojunk would ignore every character that makes up over 1% of a text longer than 200 characters (spaces,
    # common letters), which misjudges conversation-length texts.
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def unigram_prior(tokenizer, text: str | None = None) -> Tensor:
    """Token counts over the vocabulary of a public text (by default the shipped evaluation text)."""
    text = EVAL_TEXT.read_text(encoding="utf-8") if text is None else text
    return torch.bincount(torch.tensor(tokenizer.encode(text), dtype=torch.long), minlength=tokenizer.vocab_size)


def chance_token_recovery(true_ids: Sequence[int], prior_counts: Tensor) -> float:
    """Token recovery of an attacker who guesses the prior's most frequent token at every position.

    Tied most frequent tokens are averaged: the expected score of an attacker who picks one of them at random.
    """
    if not len(true_ids):
        raise ValueError("no true tokens to score")
    if prior_counts.sum() <= 0:
        raise ValueError("the prior has no counts; build it with unigram_prior from a non-empty text")
    most_frequent = torch.nonzero(prior_counts == prior_counts.max()).flatten().tolist()
    occurrences = Counter(int(true) for true in true_ids)
    return sum(occurrences[token] for token in most_frequent) / len(most_frequent) / len(true_ids)


def decode_guesses(tokenizer, recovered_ids: Sequence[int | None]) -> str:
    """The recovered text: runs of guesses decoded together (a character may span tokens), NO_GUESS for a None."""
    pieces = []
    for no_guess, run in itertools.groupby(recovered_ids, key=lambda guess: guess is None):
        run = list(run)
        pieces.append(NO_GUESS * len(run) if no_guess else tokenizer.decode([int(guess) for guess in run]))
    return "".join(pieces)


@dataclass(frozen=True)
class RecoveryScore:
    """One conversation's scores, with the chance token recovery to read them against."""

    conversation_id: str
    token_count: int
    token_recovery: float
    chance_token_recovery: float
    char_similarity: float
    span_recovery: float
    fields: tuple[dict, ...]  # per sensitive field: kind, text, recovered

    def to_dict(self) -> dict:
        return asdict(self)


def score_recovery(
    conversation: Conversation,
    true_ids: Sequence[int],
    recovered_ids: Sequence[int | None],
    tokenizer,
    prior_counts: Tensor,
) -> RecoveryScore:
    """Score an attack's guesses for the tokens `true_ids` of `conversation` (e.g. its chat-template ids)."""
    true_text = tokenizer.decode([int(true) for true in true_ids])
    recovered_text = decode_guesses(tokenizer, recovered_ids)
    spans = span_recovery(true_text, recovered_text, conversation.sensitive)
    return RecoveryScore(
        conversation_id=conversation.id,
        token_count=len(true_ids),
        token_recovery=token_recovery(true_ids, recovered_ids),
        chance_token_recovery=chance_token_recovery(true_ids, prior_counts),
        char_similarity=char_similarity(true_text, recovered_text),
        span_recovery=spans["fraction"],
        fields=tuple(spans["fields"]),
    )


def aggregate_recovery(scores: Sequence[RecoveryScore]) -> dict:
    """Means over conversations (each counts once, whatever its length), and span recovery per field kind pooled
    over all conversations' fields."""
    if not scores:
        raise ValueError("no scores to aggregate")
    hits_by_kind: defaultdict[str, list[bool]] = defaultdict(list)
    for score in scores:
        for field in score.fields:
            hits_by_kind[field["kind"]].append(field["recovered"])
    return {
        "conversations": len(scores),
        "tokens": sum(score.token_count for score in scores),
        "token_recovery": fmean(score.token_recovery for score in scores),
        "chance_token_recovery": fmean(score.chance_token_recovery for score in scores),
        "char_similarity": fmean(score.char_similarity for score in scores),
        "span_recovery": fmean(score.span_recovery for score in scores),
        "span_recovery_by_kind": {kind: fmean(hits) for kind, hits in sorted(hits_by_kind.items())},
    }


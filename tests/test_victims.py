"""The victim conversations are valid and realistic in size, and the recovery metrics score what they claim to."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from secureinfer.attacks.metrics import (
    NO_GUESS,
    aggregate_recovery,
    chance_token_recovery,
    char_similarity,
    decode_guesses,
    score_recovery,
    span_recovery,
    token_recovery,
    unigram_prior,
)
from secureinfer.attacks.victims import Conversation, SensitiveField, load_conversations
from secureinfer.data import CONVERSATIONS
from secureinfer.errors import InvalidRequestError


class CharTokenizer:
    """One token per byte: enough to test the metrics without the real model."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(ids).decode(errors="replace")


# --- the data file ---


def test_the_shipped_file_validates_with_enough_conversations_and_field_kinds():
    conversations = load_conversations()
    assert len(conversations) >= 20
    assert len({conversation.id for conversation in conversations}) == len(conversations)
    kinds = Counter(field.kind for conversation in conversations for field in conversation.sensitive)
    assert len(kinds) >= 5
    assert {"name", "address", "account_number", "phone", "email", "date_of_birth", "medical"} <= set(kinds)
    for conversation in conversations:
        assert 2 <= len(conversation.messages) <= 6
        assert len(conversation.sensitive) >= 3, conversation.id


def test_every_sensitive_text_occurs_verbatim_in_its_message():
    # Read the raw file, not the loader's output, so this holds even if the loader's check were wrong.
    for entry in json.loads(CONVERSATIONS.read_text(encoding="utf-8"))["conversations"]:
        for field in entry["sensitive"]:
            assert field["text"] in entry["messages"][field["message"]]["content"], (entry["id"], field)


@pytest.mark.integration
def test_conversations_are_60_to_250_tokens_and_their_fields_survive_tokenization(real_checkpoint):
    tokenizer = real_checkpoint.tokenizer
    for conversation in load_conversations():
        ids = tokenizer.apply_chat_template(conversation.messages)
        assert 60 <= len(ids) <= 250, (conversation.id, len(ids))
        text = tokenizer.decode(ids)
        for field in conversation.sensitive:
            assert field.text in text, (conversation.id, field.text)


@pytest.mark.integration
def test_real_conversation_scores_one_when_recovered_and_chance_is_low(real_checkpoint):
    tokenizer = real_checkpoint.tokenizer
    prior = unigram_prior(tokenizer)
    assert prior.shape == (tokenizer.vocab_size,)
    scores = []
    for conversation in load_conversations():
        ids = tokenizer.apply_chat_template(conversation.messages)
        scores.append(score_recovery(conversation, ids, ids, tokenizer, prior))
    summary = aggregate_recovery(scores)
    assert summary["token_recovery"] == summary["span_recovery"] == summary["char_similarity"] == 1.0
    assert set(summary["span_recovery_by_kind"].values()) == {1.0}
    # Guessing " the" everywhere gets about 1% of these tokens right.
    assert 0 < summary["chance_token_recovery"] < 0.05


def _write(tmp_path, conversations) -> str:
    path = tmp_path / "conversations.json"
    path.write_text(json.dumps({"conversations": conversations}))
    return path


def _valid_entry() -> dict:
    return {
        "id": "c1",
        "scenario": "a test",
        "messages": [{"role": "user", "content": "I am Ada Quill, account 12345678."}],
        "sensitive": [{"field": "name", "text": "Ada Quill", "message": 0}],
    }


def test_loader_reads_a_valid_file(tmp_path):
    (conversation,) = load_conversations(_write(tmp_path, [_valid_entry()]))
    assert conversation == Conversation(
        "c1", "a test", ({"role": "user", "content": "I am Ada Quill, account 12345678."},),
        (SensitiveField("name", "Ada Quill", 0),),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e["sensitive"][0].update(text="Ada Quil1"), "does not occur verbatim in message 0"),
        (lambda e: e["sensitive"][0].update(message=1), "points at message 1 of 1"),
        (lambda e: e["sensitive"][0].update(message=True), "points at message True"),
        (lambda e: e["sensitive"][0].pop("field"), "is not a {field, text, message} object"),
        (lambda e: e.update(sensitive=[]), "marks no sensitive fields"),
        (lambda e: e["messages"][0].update(role="robot"), "message 0 has role 'robot'"),
        (lambda e: e.pop("scenario"), "exactly id, scenario, messages, sensitive"),
        (lambda e: e.update(id=" "), "has no id text"),
    ],
)
def test_loader_rejects_a_malformed_conversation_saying_where(tmp_path, change, message):
    entry = _valid_entry()
    change(entry)
    with pytest.raises(InvalidRequestError, match="conversation 0") as caught:
        load_conversations(_write(tmp_path, [entry]))
    assert message in caught.value.problem


def test_loader_rejects_duplicate_ids_a_missing_list_bad_json_and_a_missing_file(tmp_path):
    with pytest.raises(InvalidRequestError, match="two conversations have the id 'c1'"):
        load_conversations(_write(tmp_path, [_valid_entry(), _valid_entry()]))
    with pytest.raises(InvalidRequestError, match='no non-empty "conversations" list'):
        load_conversations(_write(tmp_path, []))
    (tmp_path / "broken.json").write_text('{"conversations": [')
    with pytest.raises(InvalidRequestError, match="cannot read conversations"):
        load_conversations(tmp_path / "broken.json")
    with pytest.raises(InvalidRequestError, match="cannot read conversations"):
        load_conversations(tmp_path / "absent.json")


# --- the metrics ---


def test_token_recovery_perfect_half_and_no_guess():
    true = [5, 6, 7, 8]
    assert token_recovery(true, [5, 6, 7, 8]) == 1.0
    assert token_recovery(true, [5, 0, 7, 0]) == 0.5
    assert token_recovery(true, [None, None, None, None]) == 0.0
    assert token_recovery(true, [5, None, 7, None]) == 0.5
    assert token_recovery([0, 1], [None, 1]) == 0.5  # no guess is not a guess of token 0
    assert token_recovery(torch.tensor(true), torch.tensor([5, 6, 0, 0])) == 0.5


def test_token_recovery_refuses_misaligned_or_empty_input():
    with pytest.raises(ValueError, match="3 guesses for 4 tokens"):
        token_recovery([1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="no true tokens"):
        token_recovery([], [])


FIELDS = (
    SensitiveField("name", "Ada Quill", 0),
    SensitiveField("account_number", "GB12 3456 7890", 0),
)
TRUE_TEXT = "I am Ada Quill, IBAN GB12 3456 7890."


def test_span_recovery_needs_the_exact_text_of_each_field():
    assert span_recovery(TRUE_TEXT, TRUE_TEXT, FIELDS)["fraction"] == 1.0
    missing_digits = span_recovery(TRUE_TEXT, "I am Ada Quill, IBAN GB12 3456 78.", FIELDS)
    assert [field["recovered"] for field in missing_digits["fields"]] == [True, False]
    assert missing_digits["fraction"] == 0.5
    assert span_recovery(TRUE_TEXT, "I am Ada Quil, IBAN GB12 3456 789.", FIELDS)["fraction"] == 0.0


def test_span_recovery_refuses_fields_of_another_text():
    with pytest.raises(ValueError, match="not in the true text"):
        span_recovery("someone else", "someone else", FIELDS)


def test_char_similarity_is_one_for_equal_texts_and_falls_with_edits():
    assert char_similarity(TRUE_TEXT, TRUE_TEXT) == 1.0
    assert char_similarity("abcd", "wxyz") == 0.0
    assert char_similarity("abcd", "abxy") == 0.5
    # 400 characters, 60 changed: 340 match in each. difflib's autojunk heuristic would score this 0.04.
    long_text = "the quick brown fox " * 20
    assert char_similarity(long_text, long_text.replace("fox", "cat")) == pytest.approx(2 * 340 / 800)


def test_chance_is_the_share_of_the_most_frequent_prior_token():
    prior = torch.tensor([0, 9, 3, 1])
    assert chance_token_recovery([1, 1, 2, 3, 0], prior) == 2 / 5
    assert chance_token_recovery([2, 3], prior) == 0.0
    # Tied favourites: the attacker picks one at random, so their shares are averaged.
    assert chance_token_recovery([1, 2, 2, 2], torch.tensor([0, 5, 5, 0])) == (1 / 4 + 3 / 4) / 2
    with pytest.raises(ValueError, match="no counts"):
        chance_token_recovery([1], torch.zeros(4, dtype=torch.long))


def test_unigram_prior_counts_the_tokens_of_a_text():
    prior = unigram_prior(CharTokenizer(), "abca")
    assert prior.shape == (256,)
    assert prior[ord("a")] == 2 and prior[ord("b")] == prior[ord("c")] == 1 and prior.sum() == 4
    assert unigram_prior(CharTokenizer()).sum() > 1000  # the shipped evaluation text


def test_decode_guesses_marks_each_position_without_a_guess():
    ids = CharTokenizer().encode("Ada 42")
    assert decode_guesses(CharTokenizer(), ids) == "Ada 42"
    assert decode_guesses(CharTokenizer(), [ids[0], None, None, *ids[3:]]) == f"A{NO_GUESS * 2} 42"


CONVERSATION = Conversation("c", "test", ({"role": "user", "content": TRUE_TEXT},), FIELDS)


def test_score_recovery_and_aggregate():
    tokenizer = CharTokenizer()
    true = tokenizer.encode(TRUE_TEXT)
    prior = unigram_prior(tokenizer, "aaaa")  # the attacker always guesses "a": 2 of the 36 characters
    perfect = score_recovery(CONVERSATION, true, true, tokenizer, prior)
    assert (perfect.token_recovery, perfect.span_recovery, perfect.char_similarity) == (1.0, 1.0, 1.0)
    assert perfect.chance_token_recovery == 2 / len(true)
    # Lose the last digit of the IBAN: one of 36 tokens and the account field, not the name.
    last_digit = TRUE_TEXT.index("0.")
    lost = [None if i == last_digit else token for i, token in enumerate(true)]
    partial = score_recovery(CONVERSATION, true, lost, tokenizer, prior)
    assert partial.token_recovery == 1 - 1 / len(true)
    assert partial.span_recovery == 0.5
    assert [field["recovered"] for field in partial.fields] == [True, False]
    summary = aggregate_recovery([perfect, partial])
    assert summary["conversations"] == 2 and summary["tokens"] == 2 * len(true)
    assert summary["span_recovery"] == 0.75
    assert summary["span_recovery_by_kind"] == {"account_number": 0.5, "name": 1.0}
    assert summary["token_recovery"] == pytest.approx(1 - 0.5 / len(true))
    assert perfect.to_dict()["fields"][0] == {"kind": "name", "text": "Ada Quill", "recovered": True}

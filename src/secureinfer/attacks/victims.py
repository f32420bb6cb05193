"""The victims of the conversation attacks: invented private conversations with their sensitive fields marked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data import CONVERSATIONS
from ..errors import InvalidRequestError
from ..model.tokenizer import validate_messages

FORMAT_FIX = (
    'give the file a "conversations" list whose entries have "id", "scenario", "messages" and "sensitive" '
    '([{"field", "text", "message"}]), as in secureinfer/data/conversations/README.md'
)


@dataclass(frozen=True)
class SensitiveField:
    """A private detail: its `kind` (the file's "field": name, address, ...), its exact `text`, and the index of
    the message that contains it."""

    kind: str
    text: str
    message: int


@dataclass(frozen=True)
class Conversation:
    id: str
    scenario: str
    messages: tuple[dict[str, str], ...]  # chat format, ready for `ChatTokenizer.apply_chat_template`
    sensitive: tuple[SensitiveField, ...]


def load_conversations(path: str | Path = CONVERSATIONS) -> list[Conversation]:
    """Read and validate a conversation file; every sensitive text must occur verbatim in its message."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers both bad JSON and bad UTF-8
        raise InvalidRequestError(f"cannot read conversations from {path}: {exc}", FORMAT_FIX) from exc
    entries = document.get("conversations") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidRequestError(f'{path} has no non-empty "conversations" list', FORMAT_FIX)
    conversations = [_conversation(entry, f"{path}: conversation {index}") for index, entry in enumerate(entries)]
    seen: set[str] = set()
    for conversation in conversations:
        if conversation.id in seen:
            raise InvalidRequestError(
                f"{path}: two conversations have the id {conversation.id!r}", "make every id unique"
            )
        seen.add(conversation.id)
    return conversations


def _conversation(entry: object, where: str) -> Conversation:
    if not isinstance(entry, dict) or set(entry) != {"id", "scenario", "messages", "sensitive"}:
        raise InvalidRequestError(
            f"{where} is not an object with exactly id, scenario, messages, sensitive", FORMAT_FIX
        )
    for key in ("id", "scenario"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise InvalidRequestError(f"{where} has no {key} text", FORMAT_FIX)
    where = f"{where} ({entry['id']!r})"
    try:
        validate_messages(entry["messages"])
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{where}: {exc.problem}", exc.fix) from exc
    messages = tuple({"role": message["role"], "content": message["content"]} for message in entry["messages"])
    fields = entry["sensitive"]
    if not isinstance(fields, list) or not fields:
        raise InvalidRequestError(f"{where} marks no sensitive fields", "list the private details it contains")
    sensitive = tuple(_sensitive_field(field, messages, where) for field in fields)
    return Conversation(entry["id"], entry["scenario"], messages, sensitive)


def _sensitive_field(entry: object, messages: tuple[dict[str, str], ...], where: str) -> SensitiveField:
    if not isinstance(entry, dict) or set(entry) != {"field", "text", "message"}:
        raise InvalidRequestError(
            f"{where}: sensitive entry {entry!r} is not a {{field, text, message}} object", FORMAT_FIX
        )
    kind, text, index = entry["field"], entry["text"], entry["message"]
    if not isinstance(kind, str) or not kind or not isinstance(text, str) or not text:
        raise InvalidRequestError(f"{where}: sensitive entry {entry!r} needs a field kind and a text", FORMAT_FIX)
    # bool is an int in Python; `"message": true` is a typo, not message 1.
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(messages):
        raise InvalidRequestError(
            f"{where}: sensitive text {text!r} points at message {index!r} of {len(messages)}",
            "give the 0-based index of the message that contains it",
        )
    if text not in messages[index]["content"]:
        raise InvalidRequestError(
            f"{where}: sensitive text {text!r} does not occur verbatim in message {index}",
            "copy the exact substring from that message, or fix the index",
        )
    return SensitiveField(kind, text, index)

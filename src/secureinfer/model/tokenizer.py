"""Tokenizer and chat template.

The GGUF vocabulary is converted once by transformers and saved as `tokenizer.json`; every later
load reads that file with `tokenizers` alone, which is ~15x faster than building a transformers
tokenizer. The chat template is rendered with the same sandboxed jinja2 settings transformers uses.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from ..errors import InvalidRequestError, ModelLoadError

ROLES = ("system", "user", "assistant")


class ChatTokenizer:
    def __init__(self, tokenizer: Any, chat_template: str | None, special_tokens: dict[str, str | None], eos_token_id: int | None = None):
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token / eos_token strings, as the template expects
        eos_from_vocab = tokenizer.token_to_id(special_tokens["eos_token"]) if special_tokens.get("eos_token") else None
        self.eos_token_ids = frozenset(i for i in (eos_token_id, eos_from_vocab) if i is not None)

    @classmethod
    def from_gguf(cls, path: Path, eos_token_id: int | None) -> "ChatTokenizer":
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:  # transformers raises many types for a bad vocabulary; all mean the same here
            raise ModelLoadError(
                f"cannot build the tokenizer from {path}: {exc}",
                "use a GGUF whose tokenizer.ggml.* metadata is complete (a llama.cpp conversion)",
            ) from exc
        special = {"bos_token": hf.bos_token, "eos_token": hf.eos_token}
        return cls(hf.backend_tokenizer, hf.chat_template, special, eos_token_id)

    @classmethod
    def from_dir(cls, directory: Path, eos_token_id: int | None) -> "ChatTokenizer":
        """Read `tokenizer.json`, `tokenizer_config.json` and an optional `chat_template.jinja`, as transformers saves them."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
            config = json.loads((directory / "tokenizer_config.json").read_text())
        except Exception as exc:
            raise ModelLoadError(
                f"no usable tokenizer in {directory} ({exc})",
                "put tokenizer.json and tokenizer_config.json beside the weights",
            ) from exc
        template_file = directory / "chat_template.jinja"
        template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
        return cls(tokenizer, template, special, eos_token_id)

    def save(self, directory: Path) -> None:
        """Save in transformers' layout, so the directory also loads with `AutoTokenizer`."""
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        validate_messages(messages)
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template", "use `generate` with a plain prompt")
        return self._template.render(messages=list(messages), add_generation_prompt=True, **self.special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        # The template writes its special tokens as text; adding them again would double the BOS.
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False).ids

    @cached_property
    def _template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise InvalidRequestError(f"the chat template rejected the messages: {message}", "fix the message list")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", 'pass [{"role": "user", "content": "..."}]')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "content" not in message:
            raise InvalidRequestError(
                f"message {i} is not a {{'role', 'content'}} object", 'pass {"role": "user", "content": "..."}'
            )
        if message.get("role") not in ROLES:
            raise InvalidRequestError(f"message {i} has role {message.get('role')!r}", f"use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise InvalidRequestError(f"message {i} content is not a string", "pass the message text as a string")
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise InvalidRequestError("the conversation has no non-empty user message", "add a user message with text")

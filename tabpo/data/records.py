"""Preference pairs from JSONL, in TRL's standard and conversational forms.

One JSON object per non-blank line, in one of three forms:

- standard: ``{"prompt": str, "chosen": str, "rejected": str}``; the prompt becomes one
  user message;
- conversational, explicit prompt: ``"prompt"`` a list of ``{"role", "content"}`` messages
  ending with a user turn, ``"chosen"`` and ``"rejected"`` each a list holding exactly one
  assistant message;
- conversational, implicit prompt: no ``"prompt"``; ``"chosen"`` and ``"rejected"`` are
  whole conversations ending with the assistant turn, and the messages before it (the
  prompt) must be the same in both.

An optional ``"system"`` string becomes a leading system message when the prompt has none.
Every bad record raises a DataError naming the file, the 1-based line and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabpo.common.errors import DataError

ROLES = ("system", "user", "assistant")

Message = dict[str, str]


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair: prompt messages (ending with a user turn) and two answers.

    ``rejected`` is None for a prompt/completion record (SFT data): ``chosen`` holds the
    completion.
    """

    prompt: list[Message]
    chosen: str
    rejected: str | None
    line: int
    conversational: bool


@dataclass
class ReadStats:
    """`read`: records in the file; `skipped_identical`: of those, dropped as chosen == rejected."""

    read: int = 0
    skipped_identical: int = 0

    @property
    def kept(self) -> int:
        return self.read - self.skipped_identical


@dataclass(frozen=True)
class _At:
    """Where a record came from, to raise located errors."""

    path: Path
    line: int

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, path=self.path, line=self.line, field=field)


def read_preferences(path: str | Path) -> tuple[list[PreferenceExample], ReadStats]:
    """All pairs of a JSONL file, skipping (and counting) those with chosen == rejected."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    if not path.is_file():
        raise DataError("not a file", path=path)
    examples: list[PreferenceExample] = []
    stats = ReadStats()
    for at, raw in _records(path):
        stats.read += 1
        example = parse_record(raw, at.path, at.line)
        if example.chosen == example.rejected:
            stats.skipped_identical += 1
        else:
            examples.append(example)
    if stats.read == 0:
        raise DataError("the file holds no records", path=path)
    if not examples:
        raise DataError(
            f"all {stats.read} records have chosen identical to rejected; nothing to learn from",
            path=path,
        )
    return examples, stats


def _records(path: Path) -> Iterator[tuple[_At, Any]]:
    """(location, parsed JSON) for every non-blank line."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            at = _At(path, line)
            try:
                # utf-8-sig drops a byte-order mark, which some editors write at the start
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError:
                raise at.error("not valid UTF-8 text") from None
            if not text.strip():
                continue
            try:
                yield at, json.loads(text)
            except json.JSONDecodeError as e:
                raise at.error(f"malformed JSON: {e.msg} at column {e.colno}") from None


def parse_record(record: Any, path: str | Path, line: int) -> PreferenceExample:
    """One parsed JSON record as a PreferenceExample; DataError when it is not valid."""
    at = _At(Path(path), line)
    if not isinstance(record, dict):
        raise at.error(f"expected a JSON object, got {_kind(record)}")
    if "completion" in record and "chosen" not in record:
        return _completion_record(record, at)
    for key in ("chosen", "rejected"):
        if key not in record:
            raise at.error("missing", field=key)
    if isinstance(record["chosen"], str):
        prompt, chosen, rejected = _standard(record, at)
        conversational = False
    elif isinstance(record["chosen"], list):
        prompt, chosen, rejected = _conversational(record, at)
        conversational = True
    else:
        raise at.error("expected a string or a list of messages", field="chosen")
    prompt = _with_system(prompt, record, at)
    _check_prompt(prompt, at)
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise at.error("empty completion", field=key)
    return PreferenceExample(prompt, chosen, rejected, line, conversational)


def _completion_record(record: dict[str, Any], at: _At) -> PreferenceExample:
    """TRL's prompt/completion form (strings, or messages with one assistant turn)."""
    if "prompt" not in record:
        raise at.error("missing", field="prompt")
    completion = record["completion"]
    conversational = isinstance(completion, list)
    if conversational:
        prompt = _messages(record["prompt"], "prompt", at)
        answer = _single_answer(_messages(completion, "completion", at), "completion", at)
    else:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise at.error(f"expected a string, got {_kind(record[key])}", field=key)
        prompt, answer = [{"role": "user", "content": record["prompt"]}], completion
    prompt = _with_system(prompt, record, at)
    _check_prompt(prompt, at)
    if not answer.strip():
        raise at.error("empty completion", field="completion")
    return PreferenceExample(prompt, answer, None, at.line, conversational)


def _standard(record: dict[str, Any], at: _At) -> tuple[list[Message], str, str]:
    if "prompt" not in record:
        raise at.error("missing", field="prompt")
    for key in ("prompt", "rejected"):
        if not isinstance(record[key], str):
            kind = _kind(record[key])
            raise at.error(f"expected a string (as 'chosen' is one), got {kind}", field=key)
    return [{"role": "user", "content": record["prompt"]}], record["chosen"], record["rejected"]


def _conversational(record: dict[str, Any], at: _At) -> tuple[list[Message], str, str]:
    if not isinstance(record["rejected"], list):
        raise at.error(f"expected a list of messages, got {_kind(record['rejected'])}", "rejected")
    chosen = _messages(record["chosen"], "chosen", at)
    rejected = _messages(record["rejected"], "rejected", at)
    if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt", at)
        return (
            prompt,
            _single_answer(chosen, "chosen", at),
            _single_answer(rejected, "rejected", at),
        )
    for key, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise at.error(
                "without a 'prompt', the conversation must end with an assistant turn", key
            )
    if len(chosen) < 2:
        raise at.error("empty prompt: no messages before the assistant turn", field="chosen")
    if chosen[:-1] != rejected[:-1]:
        raise at.error("prompt differs between chosen and rejected", field="rejected")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _messages(value: Any, field: str, at: _At) -> list[Message]:
    if not isinstance(value, list):
        raise at.error(f"expected a list of messages, got {_kind(value)}", field)
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise at.error(f"expected a message object, got {_kind(message)}", where)
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise at.error(
                    f"expected a string, got {_kind(message.get(key))}", f"{where}.{key}"
                )
        if message["role"] not in ROLES:
            raise at.error(
                f"unknown role {message['role']!r}; expected one of {ROLES}", f"{where}.role"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _single_answer(messages: list[Message], field: str, at: _At) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise at.error(f"expected exactly one assistant message, got roles {roles}", field)
    return messages[0]["content"]


def _with_system(prompt: list[Message], record: dict[str, Any], at: _At) -> list[Message]:
    system = record.get("system")
    if system is None:
        return prompt
    if not isinstance(system, str):
        raise at.error(f"expected a string, got {_kind(system)}", field="system")
    if not system.strip() or any(m["role"] == "system" for m in prompt):
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def _check_prompt(prompt: list[Message], at: _At) -> None:
    if not prompt:
        raise at.error("empty prompt: no messages", field="prompt")
    if prompt[-1]["role"] != "user":
        raise at.error("the prompt must end with a user turn", field="prompt")
    if not prompt[-1]["content"].strip():
        raise at.error("empty prompt", field="prompt")


def _kind(value: Any) -> str:
    """JSON's name for the type of a parsed value."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")

"""The row every stage after `preprocess` reads: `{"messages": [{role, content}, ...], "meta"}`
or `{"text": ..., "meta"}`, and what makes one trainable. preprocess checks it (so that
`preprocess.on_error: raise` stops at the line), sanitize again before anything is trained."""

from __future__ import annotations

import re
from typing import Any

ROLES = ("system", "user", "assistant")
# Control characters other than tab, newline and carriage return (C0, DEL and C1): a NUL or an
# escape sequence in a training row is a broken export, never text a model should learn.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def control_character(text: str) -> str | None:
    """A description of the first control character in `text`, or None."""
    found = CONTROL_CHARACTERS.search(text)
    if found is None:
        return None
    return f"the control character U+{ord(found.group()):04X} at character {found.start() + 1}"


def role_problem(row: dict[str, Any]) -> str | None:
    """Why a row's messages are not a trainable conversation, or None.

    Allowed: an optional system message, then user/assistant turns alternating, starting with
    the user and ending with the assistant (the answer training learns).
    """
    if "text" in row:
        return None if isinstance(row["text"], str) and row["text"].strip() else "empty text"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "no messages"
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if len(roles) != len(messages):
        return "a message is not an object"
    if roles[0] == "system":
        roles = roles[1:]
    if not roles:
        return "only a system message"
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            return f"turn {i + 1} is {role!r}, expected {expected!r} (user and assistant alternate)"
    if roles[-1] != "assistant":
        return "the last message is not the assistant's answer"
    if any(not isinstance(m.get("content"), str) or not m["content"].strip() for m in messages):
        return "a message has empty content"
    return None

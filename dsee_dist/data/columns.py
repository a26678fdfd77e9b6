"""The columns each data format reads and the chat roles it knows, as data (no torch or datasets at import:
config validation reads it)."""

from __future__ import annotations

# The columns a format reads, by the format's own names; `data.fields` maps them to a dataset's names.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "e2e": ("mr", "ref"),
    "synthetic_e2e": ("mr", "ref"),
    "jsonl": ("prompt", "completion"),
    "chat": ("messages",),
    "instruction": ("instruction", "input", "output"),
    "text": (),
}

# Columns used when a dataset has none of the format's own names (the E2E dataset on the hub; ShareGPT).
ALTERNATIVE_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "e2e": {"mr": ("meaning_representation",), "ref": ("human_reference",)},
    "chat": {"messages": ("conversations", "conversation")},
    "instruction": {"output": ("response",)},
}

# Columns a row may lack (an empty value is used).
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"instruction": ("input",)}

ROLES = ("system", "user", "assistant")

# Role names other datasets use (ShareGPT: human/gpt), always known; `data.roles` adds more.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}

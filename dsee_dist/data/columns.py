"""The columns each data format reads and the chat roles it knows, as data (no torch or datasets at import).
The columns of each format and the three chat roles are part of the config schema (config validation checks
`data.fields` and `data.roles` against them); the names other datasets use are here."""

from __future__ import annotations

from dsee_dist.config.schema import CHAT_ROLES, FORMAT_COLUMNS

__all__ = ["ALTERNATIVE_COLUMNS", "FORMAT_COLUMNS", "OPTIONAL_COLUMNS", "ROLES", "ROLE_ALIASES"]

# Columns used when a dataset has none of the format's own names (the E2E dataset on the hub; ShareGPT).
ALTERNATIVE_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "e2e": {"mr": ("meaning_representation",), "ref": ("human_reference",)},
    "chat": {"messages": ("conversations", "conversation")},
    "instruction": {"output": ("response",)},
}

# Columns a row may lack (an empty value is used).
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {"instruction": ("input",)}

ROLES = CHAT_ROLES

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

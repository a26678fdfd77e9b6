"""Conversations: normalising a row's messages, rendering them with the tokenizer's chat template, and the loss
mask of the assistant turns the template renders.

The mask comes from one of two renderings, token for token the same where both apply (tests check it):
- a template with generation markers (`{% generation %}`): transformers' own assistant mask
  (`apply_chat_template(..., return_assistant_tokens_mask=True)`);
- any other template (SmolLM2's, most Llama/Qwen ones): prefix by prefix. Assistant turn i spans the characters
  between the rendering of messages[:i] with the generation prompt and the rendering of messages[:i+1]; a
  template whose shorter renderings are not prefixes of the longer ones cannot be split into turns and is refused.
A token is labelled when its first character lies in an assistant span (what transformers' mask does too).
"""

from __future__ import annotations

import re

from dsee_dist.data.columns import ROLE_ALIASES
from dsee_dist.errors import DSEEError

IGNORE_INDEX = -100
_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(tokenizer) -> bool:
    return bool(_GENERATION_MARKER.search(getattr(tokenizer, "chat_template", None) or ""))


def require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DSEEError(
            f"the tokenizer of '{tokenizer.name_or_path}' has no chat template, which data.format=chat needs; use an "
            "instruct/chat model, or add a template (tokenizer.chat_template in tokenizer_config.json / "
            "chat_template.jinja)"
        )
    if not getattr(tokenizer, "is_fast", False) and not has_generation_markers(tokenizer):
        raise DSEEError(
            f"the tokenizer of '{tokenizer.name_or_path}' is not a fast tokenizer: the assistant mask needs its "
            "character offsets (save the model with a tokenizer.json)"
        )


def normalize_messages(
    raw,
    where: str,
    *,
    roles: dict[str, str] | None = None,
    system_prompt: str | None = None,
    require_assistant: bool = True,
) -> list[dict[str, str]]:
    """[{role, content}] with roles system/user/assistant from a row's `messages` ({role, content} dicts or
    ShareGPT's {from, value}); `system_prompt` goes first where the conversation has no system message.
    `where` names the row in errors; a training row (`require_assistant`) needs an assistant turn."""
    aliases = {**ROLE_ALIASES, **{k.lower(): v for k, v in (roles or {}).items()}}
    if isinstance(raw, str):
        raise DSEEError(f"{where}: messages must be a list of {{role, content}} objects, got a string")
    if not isinstance(raw, (list, tuple)) or not raw:
        raise DSEEError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    messages = []
    for turn, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DSEEError(f"{where}, turn {turn}: a message must be an object with role and content")
        role = message.get("role", message.get("from"))
        content = message.get("content", message.get("value"))
        if role is None or content is None:
            raise DSEEError(
                f"{where}, turn {turn}: a message needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); "
                f"it has {sorted(k for k, v in message.items() if v is not None)}"
            )
        mapped = aliases.get(str(role).lower())
        if mapped is None:
            raise DSEEError(
                f"{where}, turn {turn}: unknown role '{role}'; map it with data.roles (e.g. data.roles.{role}=user)"
            )
        if not isinstance(content, str):
            raise DSEEError(f"{where}, turn {turn}: content must be a string, got {type(content).__name__}")
        if mapped == "assistant" and not content.strip():
            raise DSEEError(f"{where}, turn {turn}: the assistant turn is empty")
        messages.append({"role": mapped, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DSEEError(f"{where}: the conversation has no assistant turn to learn from")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _render(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each assistant turn]), prefix by prefix."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DSEEError(
                f"the chat template of '{tokenizer.name_or_path}' cannot be split into turns (rendering the first "
                f"{i + 1} messages is not a prefix of rendering the conversation), so assistant tokens cannot be "
                "told apart; use a template with {% generation %} markers, or data.train_on=all"
            )
        spans.append((len(before), len(through)))
    return text, spans


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of ones in a 0/1 list."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def render_conversation(tokenizer, messages: list[dict[str, str]], train_on: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation: labels equal the ids on the tokens `train_on` selects
    (all_assistant | last_assistant | all), IGNORE_INDEX elsewhere."""
    if has_generation_markers(tokenizer):
        enc = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
        turns = _runs(mask)
    else:
        text, spans = assistant_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        turns, t = [], 0
        for start, end in spans:  # tokens whose first character lies in the span
            while t < len(ids) and enc["offset_mapping"][t][0] < start:
                t += 1
            first = t
            while t < len(ids) and enc["offset_mapping"][t][0] < end:
                t += 1
            if t > first:
                turns.append((first, t))
    if train_on == "all":
        return ids, list(ids)
    if train_on == "last_assistant":
        turns = turns[-1:]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in turns:
        labels[start:end] = ids[start:end]
    return ids, labels

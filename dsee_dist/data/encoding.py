"""Rows to training examples: each format's batched `Dataset.map` function, giving input ids, labels (the ids where
the loss is taken, IGNORE_INDEX elsewhere), the length and the number of labelled tokens after the next-token
shift.

- e2e / synthetic_e2e: prompt `MR ||`, completion ` ref` + EOS; loss on the completion.
- jsonl: prompt + completion + EOS; loss on the completion.
- chat: the tokenizer's chat template (data/chat.py); loss per `data.train_on`.
- instruction: alpaca rows as a one-turn conversation (user = instruction, then the input after a blank line;
  assistant = output) through the chat template when the tokenizer has one, else the plain alpaca prompt
  (PLAIN_INSTRUCTION_PROMPT) as prompt/completion; loss on the output.
- text: each document tokenised whole and cut into blocks of block_size (the remainder dropped); loss everywhere.
Prompt/completion examples whose completion is truncated away are dropped (as before); a conversation with no
labelled token left after truncation is an error naming its row.
"""

from __future__ import annotations

from dsee_dist.data.chat import IGNORE_INDEX, normalize_messages, render_conversation, require_chat_template
from dsee_dist.data.columns import ALTERNATIVE_COLUMNS, FORMAT_COLUMNS, OPTIONAL_COLUMNS
from dsee_dist.errors import DSEEError

E2E_SEPARATOR = " ||"

PLAIN_INSTRUCTION_PROMPT = (
    "Below is an instruction that describes a task{context}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n"
)


# An instruct model's fair zero-shot prompt for E2E (its chat template around this user message), and the same
# conversation as chat training data (the reference as the assistant turn).
E2E_CHAT_INSTRUCTION = "Write one sentence describing this restaurant: {mr}"


def e2e_prompt(mr: str) -> str:
    return mr + E2E_SEPARATOR


def e2e_chat_messages(mr: str, ref: str | None = None) -> list[dict[str, str]]:
    """The E2E input as a conversation (one user turn: the instruction and the MR), with the reference as the
    assistant turn when given."""
    messages = [{"role": "user", "content": E2E_CHAT_INSTRUCTION.format(mr=mr)}]
    return messages + ([{"role": "assistant", "content": ref}] if ref is not None else [])


def instruction_user_message(instruction: str, input_text: str) -> str:
    return instruction + ("\n\n" + input_text if input_text else "")


def plain_instruction_prompt(instruction: str, input_text: str) -> str:
    return PLAIN_INSTRUCTION_PROMPT.format(
        context=", paired with an input that provides further context" if input_text else "",
        instruction=instruction,
        input=f"### Input:\n{input_text}\n\n" if input_text else "",
    )


def resolve_columns(fmt: str, column_names: list[str], fields: dict[str, str], source: str) -> dict[str, str]:
    """{format's column name: the dataset's column} for the columns `fmt` reads."""
    resolved = {}
    for name in FORMAT_COLUMNS[fmt]:
        candidates = [fields[name]] if name in fields else [name, *ALTERNATIVE_COLUMNS.get(fmt, {}).get(name, ())]
        found = next((c for c in candidates if c in column_names), None)
        if found is None and name in OPTIONAL_COLUMNS.get(fmt, ()) and name not in fields:
            continue
        if found is None:
            raise DSEEError(
                f"{source}: has no column '{candidates[0]}' for data.format={fmt} (its columns: "
                f"{', '.join(column_names)}); name the column with data.fields.{name}=<column>"
            )
        resolved[name] = found
    return resolved


class Encoder:
    """The batched map function of one format (picklable: Dataset.map runs it in data.num_proc processes)."""

    def __init__(self, data_cfg, tokenizer, columns: dict[str, str], source: str):
        self.fmt, self.block = data_cfg.format, data_cfg.block_size
        self.train_on, self.roles, self.system_prompt = data_cfg.train_on, data_cfg.roles, data_cfg.system_prompt
        self.tokenizer, self.columns, self.source = tokenizer, columns, source
        self.use_chat = self.fmt == "chat" or (self.fmt == "instruction" and bool(tokenizer.chat_template))
        if self.fmt == "chat":
            require_chat_template(tokenizer)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "labels": [], "length": [], "n_labels": []}
        if self.fmt == "text":
            for text in batch[next(iter(batch))]:
                self._add_blocks(out, text)
            return out
        for row, index in enumerate(indices):
            where = f"{self.source}, row {index + 1}"
            ids, labels = self._encode(batch, row, where)
            ids, labels = ids[: self.block], labels[: self.block]
            if all(x == IGNORE_INDEX for x in labels[1:]):
                if self.use_chat:
                    raise DSEEError(
                        f"{where}: no labelled token is left within data.block_size={self.block} (the conversation "
                        "is longer); raise data.block_size or drop the row"
                    )
                continue  # the completion was truncated away entirely: nothing to learn from
            self._add(out, ids, labels)
        return out

    def _value(self, batch: dict, row: int, name: str, where: str, *, required: bool = True) -> str:
        column = self.columns.get(name)
        value = batch[column][row] if column else None
        if value is None or (isinstance(value, str) and not value.strip()):
            if required:
                raise DSEEError(f"{where}: '{column or name}' is empty")
            return ""
        return str(value)

    def _encode(self, batch: dict, row: int, where: str) -> tuple[list[int], list[int]]:
        if self.fmt == "chat":
            messages = normalize_messages(
                batch[self.columns["messages"]][row], where, roles=self.roles, system_prompt=self.system_prompt
            )
            return render_conversation(self.tokenizer, messages, self.train_on)
        if self.fmt == "instruction":
            instruction = self._value(batch, row, "instruction", where)
            input_text = self._value(batch, row, "input", where, required=False)
            output = self._value(batch, row, "output", where)
            if self.use_chat:
                messages = [{"role": "user", "content": instruction_user_message(instruction, input_text)}]
                messages.append({"role": "assistant", "content": output})
                if self.system_prompt:
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
                train_on = "last_assistant" if self.train_on == "all_assistant" else self.train_on
                return render_conversation(self.tokenizer, messages, train_on)
            return self._pair(plain_instruction_prompt(instruction, input_text), output)
        if self.fmt in ("e2e", "synthetic_e2e"):
            mr, ref = self._value(batch, row, "mr", where), self._value(batch, row, "ref", where)
            return self._pair(e2e_prompt(mr), " " + ref)
        return self._pair(self._value(batch, row, "prompt", where), self._value(batch, row, "completion", where))

    def _pair(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = self.tokenizer(completion, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return p + c, [IGNORE_INDEX] * len(p) + c

    def _add_blocks(self, out: dict, text: str) -> None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - self.block + 1, self.block):
            block = ids[start : start + self.block]
            self._add(out, block, list(block))

    @staticmethod
    def _add(out: dict, ids: list[int], labels: list[int]) -> None:
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        out["n_labels"].append(sum(1 for x in labels[1:] if x != IGNORE_INDEX))

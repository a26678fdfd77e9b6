"""Packing: tokenised examples concatenated into rows of at most block_size tokens, so that short examples
(E2E, chat turns) do not train on padding.

Each packed row carries `position_ids` that restart at 0 for every example. The model is then called without
an attention mask (recipes/loss.py): transformers' mask builder reads restarting position ids as separate
sequences and gives each its own causal block (a block-diagonal mask for SDPA and eager attention, the varlen
kernel for flash-attention), so no token attends across examples. The first token of every example after the
first carries no label: it would be predicted from the previous example's last token (an unpacked example's
first position is never predicted either), so the labelled-token count, the loss's normaliser, is the same as
unpacked. Rows are filled greedily in dataset order; an example never straddles two rows.
"""

from __future__ import annotations

from dsee_dist.data.chat import IGNORE_INDEX


class Packer:
    """Batched `Dataset.map` function: examples -> packed rows (columns input_ids, labels, position_ids, length,
    n_labels)."""

    def __init__(self, block_size: int):
        self.block = block_size

    def __call__(self, batch: dict) -> dict:
        out = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "n_labels": []}
        row_ids: list[int] = []
        row_labels: list[int] = []
        row_positions: list[int] = []

        def flush():
            if row_ids:
                out["input_ids"].append(list(row_ids))
                out["labels"].append(list(row_labels))
                out["position_ids"].append(list(row_positions))
                out["length"].append(len(row_ids))
                out["n_labels"].append(sum(1 for x in row_labels[1:] if x != IGNORE_INDEX))
                row_ids.clear(), row_labels.clear(), row_positions.clear()

        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if len(row_ids) + len(ids) > self.block:
                flush()
            row_ids.extend(ids)
            row_labels.extend([IGNORE_INDEX, *labels[1:]] if row_labels else labels)
            row_positions.extend(range(len(ids)))
        flush()
        return out

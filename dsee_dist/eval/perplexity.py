"""Perplexity of a causal LM on a text, by the protocol the pruning literature reports (Wanda, SparseGPT,
LLM-Pruner on WikiText-2):

- the text is tokenised once (the tokenizer's own special tokens included, as `tokenizer(text)` gives them);
- the tokens are cut into non-overlapping windows of `seq_len`, the remainder after the last whole window
  dropped; every window is scored on its own (no context carried over from the one before);
- perplexity = exp(mean NLL per predicted token over all windows): each window predicts its seq_len - 1
  tokens after the first, so with equal windows this is also the exp of the mean of the windows' mean NLLs.

Several ranks split the windows round-robin (window i on rank i mod world_size) and all-reduce the sums.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dsee_dist.errors import DSEEError

DEFAULT_MAX_SEQ_LEN = 2048
LINE_JOIN = "\n\n"  # the literature's "\n\n".join(dataset["text"]), with the file's lines as the rows


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean NLL per predicted token (nats)
    windows: int
    seq_len: int
    tokens_scored: int  # windows x (seq_len - 1)
    text_tokens: int  # the whole tokenised text, the dropped remainder included
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def read_text(path: Path) -> str:
    """The file's lines joined as the literature joins WikiText's rows (LINE_JOIN)."""
    path = Path(path)
    if not path.is_file():
        raise DSEEError(f"text file '{path}' does not exist")
    text = LINE_JOIN.join(path.read_text(encoding="utf-8-sig").splitlines())
    if not text.strip():
        raise DSEEError(f"text file '{path}' is empty")
    return text


def model_context(model_config) -> int | None:
    """The longest sequence the model's positions allow, if its config says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_seq_len(requested: int | None, model_config) -> int:
    """--seq-len, or min(model context, DEFAULT_MAX_SEQ_LEN); refused when outside [2, context]."""
    context = model_context(model_config)
    seq_len = requested or min(context or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if seq_len < 2:
        raise DSEEError(f"--seq-len must be at least 2 (a window predicts its tokens after the first), got {seq_len}")
    if context is not None and seq_len > context:
        raise DSEEError(f"--seq-len {seq_len} is longer than the model's context ({context} positions)")
    return seq_len


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The token ids of the whole text, tokenised once: (n,) int64."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


def cut_windows(token_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(windows, seq_len): the non-overlapping whole windows; at least one, else a one-line error."""
    n_windows = token_ids.numel() // seq_len
    if n_windows == 0:
        raise DSEEError(
            f"the text has {token_ids.numel()} tokens, fewer than one window of {seq_len}; "
            f"give a longer text or a smaller --seq-len"
        )
    return token_ids[: n_windows * seq_len].view(n_windows, seq_len)


@torch.no_grad()
def window_sums(
    model, windows: torch.Tensor, rank: int = 0, world_size: int = 1, batch_size: int = 1, device=None, log=None
) -> tuple[float, int]:
    """(sum of token NLLs, tokens predicted) over this rank's windows (windows[rank::world_size]). `log`: called
    with a progress line about every tenth of this rank's windows."""
    device = device or next(model.parameters()).device
    mine = windows[rank::world_size]
    nll, count = 0.0, 0
    every = max(1, mine.shape[0] // 10)
    for start in range(0, mine.shape[0], batch_size):
        if log and start and start // every != (start - batch_size) // every:
            log(f"perplexity: {start} of {mine.shape[0]} windows, running perplexity {math.exp(nll / count):.3f}")
        batch = mine[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1]
        targets = batch[:, 1:]
        nll += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"
            )
        )
        count += targets.numel()
    return nll, count


def compute_perplexity(
    model,
    token_ids: torch.Tensor,
    seq_len: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 1,
    log=None,
) -> PerplexityResult:
    """Collective when world_size > 1 (every rank calls it with the same tokens). `log`: progress lines."""
    from dsee_dist.engine import process_group

    windows = cut_windows(token_ids, seq_len)
    started = time.perf_counter()
    local_nll, local_count = window_sums(model, windows, rank, world_size, batch_size, log=log)
    nll, count = process_group.all_reduce_sum([local_nll, float(local_count)])
    mean_nll = nll / count
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        windows=windows.shape[0],
        seq_len=seq_len,
        tokens_scored=int(count),
        text_tokens=token_ids.numel(),
        seconds=time.perf_counter() - started,
    )


def format_table(result: PerplexityResult, text: str, model: str) -> str:
    rows = [
        ("perplexity", f"{result.perplexity:.4f}"),
        ("nll/token", f"{result.nll:.6f}"),
        ("windows", f"{result.windows} x {result.seq_len} tokens"),
        (
            "tokens",
            f"{result.windows * result.seq_len:,} of the text's {result.text_tokens:,} in windows, "
            f"{result.tokens_scored:,} predicted",
        ),
        ("text", text),
        ("model", model),
    ]
    return "\n".join(f"{name:<10}  {value}" for name, value in rows)

"""Metrics to `metrics.jsonl` (always), TensorBoard (where installed) and a progress bar; rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled = enabled
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        self._file = (out_dir / "metrics.jsonl").open("a" if start_step else "w", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self._tb = None
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0,
        )
        self._t0 = time.time()

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values, "elapsed_s": round(time.time() - self._t0, 3)}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def advance(self, loss: float | None) -> None:
        """One step done; `loss` None (a step that is not logged) keeps the last value shown."""
        if self._bar is not None:
            self._bar.update(1)
            if loss is not None:
                self._loss_text = f"{loss:.4f}"
            self._bar.set_postfix(loss=getattr(self, "_loss_text", ""), **getattr(self, "_extra", {}), refresh=False)

    def show(self, **values: str) -> None:
        """Extra figures beside the loss on the progress bar (e.g. tokens/s, MFU), kept until replaced."""
        if self._bar is not None:
            self._extra = values
            self._bar.set_postfix(loss=getattr(self, "_loss_text", ""), **values, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()

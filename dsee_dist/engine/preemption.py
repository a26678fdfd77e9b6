"""Graceful preemption: on SIGTERM or SIGUSR1 every rank finishes its step, a checkpoint is saved, and
the job exits with PREEMPTED_EXIT_CODE so a requeued job resumes (`resume=auto`). The handler is installed
before the run's set-up (data, model, support): a signal then lets the set-up finish (its results are cached
for the requeued job) and the job exits with the same status before its first step, with nothing to save.

SLURM sends such a signal before a time limit with `sbatch --signal=USR1@120` (or
`scancel --signal=USR1`). Ranks agree on stopping through an all-reduce after every step, so a signal
that reaches only some ranks still stops all of them at the same step. A second signal while saving
only sets the same flag again: the save completes and the previous checkpoint stays intact.
"""

from __future__ import annotations

import logging
import signal

from dsee_dist.engine import process_group
from dsee_dist.utils.signals import install_handlers, restore_handlers

logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = install_handlers(SIGNALS, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
            # every rank says it: a signal may reach only some of them
            logger.warning(f"received {self.signal_name}: checkpointing after the current step")
        self.requested = True

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was signalled."""
        (flag,) = process_group.all_reduce_sum([1.0 if self.requested else 0.0])
        return flag > 0

    def ignore_further_signals(self) -> None:
        """After the preemption checkpoint: a late signal must not kill the process while it tears down
        (and turn the documented exit status into a signal death). SIG_IGN survives interpreter shutdown."""
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def restore(self) -> None:
        restore_handlers(self._previous)

"""How a command's process ends: one error line instead of a traceback, and an exit without interpreter teardown.

- `reports_errors(prefix)`: the decorator on every command's `main(argv, prog) -> int` (recipes/).
  A `DSEEError` becomes one line, `PREFIX: error: MESSAGE`, on stderr (from rank 0 only: every rank fails the
  same way), the process group is shut down and the error's exit status returned. A lost peer (a node or rank
  gone mid-collective) becomes one line per surviving rank and LOST_PEER_EXIT_CODE, without teardown (it
  would wait for the lost peer again); the launcher stops the other ranks.
- `exit_process(code)`: the end of a rank's process (module entry points `python -m dsee_dist.train` and
  `dsee_dist.generate`, `dsee-dist train`).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from dsee_dist.engine import process_group
from dsee_dist.errors import DSEEError


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _error_line(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def reports_errors(prefix: str):
    """Decorator for a command's entry point (module docstring); `prefix` names the command in the error line,
    e.g. `dsee-dist export`."""

    def decorate(main):
        @functools.wraps(main)
        def entry(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except DSEEError as exc:
                if _rank() == 0:  # every rank fails the same way; one line is enough
                    _error_line(f"{prefix}: error: {exc}")
                process_group.shutdown()
                return exc.exit_code
            except RuntimeError as exc:
                if not process_group.is_lost_peer(exc):
                    raise
                _error_line(
                    f"{prefix}: error: rank {os.environ.get('RANK', '?')} lost contact with the other ranks "
                    f"({str(exc).splitlines()[0][:160]}): a node failed or the network between nodes is down; "
                    f"resubmit the same job (resume=auto) to continue from the last complete checkpoint"
                )
                return process_group.LOST_PEER_EXIT_CODE

        return entry

    return decorate


def exit_process(code: int) -> None:
    """End the process without interpreter teardown. gloo's background threads can abort a process at
    exit ("terminate called without an active exception", status 250) after a fully successful run, even
    after destroy_process_group; the launcher would then report a finished job as failed. By now every
    file is written and closed, so only the streams need flushing."""
    status_file = os.environ.get("DSEE_EXIT_STATUS_FILE")
    if status_file and os.environ.get("RANK", "0") == "0":
        # For batch scripts: the launcher between them and the ranks may report another status (e.g. srun
        # after --kill-on-bad-exit stopped the other nodes), so rank 0 states its own, e.g. 75 = requeue me.
        Path(status_file).write_text(f"{code}\n")
    mpi = sys.modules.get("mpi4py.MPI")  # started by mpirun: MPI wants MPI_Finalize before any exit
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Test-only rank program: several training jobs, one after another, in the same ranks.

    python -m tests.distributed.sequential_jobs JOBS.json    (JOBS.json: [[name, [trainer argv...]], ...])

Each job is the trainer's own `main` (`python -m dsee_dist.train` minus the process exit), so a comparison of
many configurations (every shipped engine config, checkpointing on and off) pays the ranks' start-up (~12 s of
imports and engine set-up on a CPU) once instead of once per job. The process group stays up between jobs
(the trainer's shutdown is deferred to the end). Before each job rank 0 prints JOB_MARKER + name, so its
output can be split per job (`launch.run_jobs_in_one_launch`). The first failing job ends the process with
its status.
"""

import json
import os
import sys
from pathlib import Path

from dsee_dist.engine import process_group
from dsee_dist.engine.process_exit import exit_process
from dsee_dist.recipes import run as training

JOB_MARKER = "=== sequential job: "


def main(jobs_file: str) -> int:
    jobs = json.loads(Path(jobs_file).read_text())
    shutdown = process_group.shutdown  # what the trainer calls at its end
    process_group.shutdown = lambda: None  # keep the group for the next job
    try:
        for name, argv in jobs:
            if os.environ.get("RANK", "0") == "0":
                print(f"{JOB_MARKER}{name}", flush=True)
            code = training.main(argv)
            if code != 0:
                return code
    finally:
        process_group.shutdown = shutdown
    shutdown()
    return 0


if __name__ == "__main__":
    exit_process(main(sys.argv[1]))

#!/usr/bin/env bash
# DSEE training with ranks started directly by Open MPI's mpirun; each rank finds its rank, world size
# and the rendezvous address through mpi4py (DeepSpeed's MPI discovery; pip install -e ".[mpi]").
#
#   launch/mpi/mpirun.sh hostfile configs/multinode/gpt2_medium.yaml [section.key=value ...]
#
# The hostfile format is the same as DeepSpeed's ("node001 slots=8"); the number of ranks is the sum of
# the slots. Environment: MASTER_PORT (29500), PYTHON (python3), MPIRUN_ARGS (extra mpirun options, e.g.
# "--mca btl_tcp_if_include eth0" or, as root, "--allow-run-as-root"). Inside a Slurm allocation,
# `srun --mpi=pmix python -m dsee_dist.train ...` starts the ranks the same way.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"
require_args 2 "$0 HOSTFILE CONFIG [section.key=value ...]" "$@"
hostfile=$1 config=$2
shift 2
"$python" -m dsee_dist.launch_check --hostfile "$hostfile"
"$python" -c "import mpi4py" 2>/dev/null || {
    echo "dsee_dist: error: mpi4py is not installed; pip install -e '.[mpi]' (needs an MPI library, e.g. apt-get install libopenmpi-dev)" >&2
    exit 2
}
np=$(sed -e 's/#.*//' "$hostfile" | awk 'NF {split($2, s, "="); n += s[2]} END {print n}')
# shellcheck disable=SC2086
exec mpirun --hostfile "$hostfile" -np "$np" ${MPIRUN_ARGS:-} \
    -x MASTER_PORT -x TORCH_EXTENSIONS_DIR -x PATH -x PYTHONPATH \
    "$python" -m dsee_dist.train --config "$config" "$@"

#!/usr/bin/env bash
# Submit launch/slurm/dsee.sbatch after checking the config locally (a bad config fails here, in one line,
# not after waiting in the queue).
#   launch/slurm/submit.sh NODES RANKS_PER_NODE CONFIG [section.key=value ...]
# Other sbatch options go in SBATCH_* environment variables (e.g. SBATCH_TIMELIMIT=24:00:00).
# DSEE_CPU_ONLY=1 leaves out --gpus-per-node.
set -euo pipefail
# (launch/_common.sh is not sourced here: its MASTER_PORT default would be exported into the job, which
# derives its own port from the job id.)
if [[ $# -lt 3 ]]; then
    echo "usage: $0 NODES RANKS_PER_NODE CONFIG [section.key=value ...]" >&2
    exit 2
fi
nodes=$1 per_node=$2 config=$3
shift 3
python=${PYTHON:-python3}
"$python" - "$config" "$@" <<'PY' || exit 2
import sys
from dsee_dist.config import load_config
from dsee_dist.errors import DSEEError
try:
    load_config(sys.argv[1], sys.argv[2:])
except DSEEError as exc:
    sys.exit(f"dsee_dist: error: {exc}")
PY
here=$(cd "$(dirname "$0")" && pwd)
gpus=()
if [[ "${DSEE_CPU_ONLY:-0}" != 1 ]]; then gpus=(--gpus-per-node="$per_node"); fi
DSEE_RANKS_PER_NODE=$per_node exec sbatch --export=ALL --nodes="$nodes" "${gpus[@]}" \
    "$here/dsee.sbatch" "$config" "$@"

#!/usr/bin/env bash
# Multi-node DSEE training with DeepSpeed's launcher and a hostfile (see hostfile.example).
#
#   ssh launcher, run once on the first node (passwordless ssh to every host, same paths everywhere):
#       launch/deepspeed_multinode.sh hostfile configs/multinode/gpt2_medium.yaml [section.key=value ...]
#   no ssh: run on every node, NODE_RANK = the node's line in the hostfile (0-based), same MASTER_ADDR:
#       MASTER_ADDR=node001 NODE_RANK=0 launch/deepspeed_multinode.sh --no-ssh hostfile configs/... [...]
#       MASTER_ADDR=node001 NODE_RANK=1 launch/deepspeed_multinode.sh --no-ssh hostfile configs/... [...]
#
# Environment: MASTER_ADDR (ssh mode: defaults to the first host), MASTER_PORT (29500), PYTHON (python3),
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to pin the network interface, TORCH_EXTENSIONS_DIR (a shared
# or node-local cache for DeepSpeed's compiled ops). output.dir must be on storage every node sees.
# Resume after a failure: run the same command again with resume=auto.
set -euo pipefail

no_ssh=0
if [[ "${1:-}" == "--no-ssh" ]]; then no_ssh=1; shift; fi
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
require_args 2 "$0 [--no-ssh] HOSTFILE CONFIG [section.key=value ...]" "$@"
hostfile=$1 config=$2
shift 2

if [[ $no_ssh == 1 ]]; then
    "$python" -m dsee_dist.launch_check --hostfile "$hostfile" --multi-node
    if [[ -z "${NODE_RANK:-}" ]]; then
        echo "dsee_dist: error: NODE_RANK is not set; export NODE_RANK=<this node's line in $hostfile, from 0> on every node" >&2
        exit 2
    fi
    exec "$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        --module dsee_dist.train --config "$config" "$@"
fi

if [[ -z "${MASTER_ADDR:-}" && -f "$hostfile" ]]; then
    MASTER_ADDR=$(sed -e 's/#.*//' "$hostfile" | awk 'NF {print $1; exit}')
    export MASTER_ADDR
fi
"$python" -m dsee_dist.launch_check --hostfile "$hostfile"
exec "$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" --module dsee_dist.train --config "$config" "$@"

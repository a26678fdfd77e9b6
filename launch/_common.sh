# Sourced by the launch scripts: what every launcher sets the same way (each may set MASTER_PORT first).
#   PYTHON               interpreter with dsee_dist installed (default python3)
#   MASTER_PORT          rendezvous port (default 29500)
#   TORCH_EXTENSIONS_DIR DeepSpeed's compiled-op cache (default ~/.cache/dsee_dist/torch_extensions)
python=${PYTHON:-python3}
export MASTER_PORT=${MASTER_PORT:-29500}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/dsee_dist/torch_extensions}

# require_args COUNT USAGE "$@": exit 2 with the usage line unless at least COUNT arguments follow.
require_args() {
    local count=$1 usage=$2
    shift 2
    if [[ $# -lt $count ]]; then
        echo "usage: $usage" >&2
        exit 2
    fi
}

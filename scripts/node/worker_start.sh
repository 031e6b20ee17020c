#!/usr/bin/env bash
# Start Ray on a worker node and join the head; cluster.yaml's worker_start_ray_commands run it (Ray's runner sets
# RAY_HEAD_IP).
#
#   scripts/node/worker_start.sh SHARED [VENV]          SHARED: the shared mount; VENV defaults to ~/venv
set -euo pipefail
shared=$1
venv=${2:-$HOME/venv}

# every Ray process of this node inherits this: one model cache on the shared storage for the whole cluster
export HF_HOME=$shared/huggingface
mkdir -p "$HF_HOME"

"$venv/bin/ray" stop
ulimit -n 65536 2> /dev/null || ulimit -n "$(ulimit -Hn)"   # room for Ray's many connections, up to the hard limit
"$venv/bin/ray" start --address="$RAY_HEAD_IP:6379" --object-manager-port=8076

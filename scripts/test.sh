#!/usr/bin/env bash
# Set up, then run the whole test suite (offline: tests build their own tiny models and data); with no arguments,
# also check that scripts/node_setup.sh installs a cluster node and that scripts/cluster_demo.py's sweep on a local
# autoscaling cluster passes. Arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check flat_ray cli tests benchmarks
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
  # the whole run (CI's): also install a cluster node's environment from scratch, as cluster.yaml does on every node
  # (about 2 minutes; apt is left out here)
  node=$(mktemp -d); trap 'rm -rf "$node"' EXIT
  FLAT_RAY_SKIP_APT=1 ./scripts/node_setup.sh "$node/venv" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  # and a sweep on an autoscaling cluster (Ray's fake multi-node provider) with an MLflow server (about 80 s)
  .venv/bin/python scripts/cluster_demo.py
fi

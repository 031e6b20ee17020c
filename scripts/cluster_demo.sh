#!/usr/bin/env bash
# An autoscaling Ray cluster on this machine (Ray's fake multi-node provider), an MLflow server on 127.0.0.1 and a
# small sweep joined to them: exits 0 only if the autoscaler added nodes, 2 trials ran at once and finished, and the
# server holds the runs. Details: scripts/cluster_demo.py. About 2 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/cluster_demo.py "$@"

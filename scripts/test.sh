#!/usr/bin/env bash
# Set up, then run the whole test suite (offline: tests build their own tiny models and data).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check flat_ray cli tests benchmarks
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up, then run the main job on its embedded default: the demo (tiny model fine-tuned on the synthetic
# TOFU-format set, then FLAT unlearning of 2 authors on 2 Ray Train workers with DeepSpeed ZeRO-3).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
exec .venv/bin/flat-ray train "$@"

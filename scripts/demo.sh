#!/usr/bin/env bash
# Set up, then run the demo sweep: the tiny model fine-tuned on the synthetic TOFU-format set (built once and
# cached), then 4 FLAT trials (4 divergences, sampled lr) on 2 Ray Train workers with DeepSpeed ZeRO-3, ending
# with the report table. Extra arguments go to `flat-ray tune`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
exec .venv/bin/flat-ray tune --space demo "$@"

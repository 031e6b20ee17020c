#!/usr/bin/env bash
# benchmarks/selectivity.py on one GPU, one process per model size at once (#14 item 4).
#
#   bash benchmarks/selectivity_gpu.sh prepare   # here: the tofu_mini excerpt and a scipy wheel into .gpu_carry/
#   bash benchmarks/selectivity_gpu.sh [OUT]     # on the GPU machine, with .gpu_carry/ carried along
#
# The GPU machine has torch and transformers but maybe not scipy (flat_ray's TOFU metrics import it); nothing here
# needs Ray, DeepSpeed or MLflow. Each size writes OUT/<size>.json after every method row and OUT/<size>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-64x2,128x4,256x4,512x6,768x8,1024x12}

if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu_carry
  grep -qx "/.gpu_carry/" .git/info/exclude 2>/dev/null || echo "/.gpu_carry/" >> .git/info/exclude
  rm -rf .gpu_carry/tofu_mini && cp -r ../shared/data/tofu_mini .gpu_carry/tofu_mini
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .gpu_carry "scipy==$(.venv/bin/python -c 'import scipy; print(scipy.__version__)')"
  du -sh .gpu_carry && ls .gpu_carry
  exit 0
fi

out=$(mkdir -p "${1:-${OUT:-selectivity_out}}" && cd "${1:-${OUT:-selectivity_out}}" && pwd)
python3 -c "import scipy" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_carry/scipy-*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false \
  OMP_NUM_THREADS=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
for size in ${SIZES//,/ }; do
  timeout "${LIMIT:-400}" python3 benchmarks/selectivity.py --device cuda --data .gpu_carry/tofu_mini --sizes "$size" \
    --cache "/tmp/selectivity-$size" --out "$out/$size.json" > "$out/$size.log" 2>&1 &
done
wait
tail -n 14 "$out"/*.log

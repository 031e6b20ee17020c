#!/usr/bin/env bash
# flat_ray's own training loop on one GPU, without Ray (#18 item 5): benchmarks/gpu_step.py's plain-torch step at
# the same micro-batch for comparison, then benchmarks/gpu_path.py's variants. Planned to end within 8 minutes on
# one H200 (each part has its own time limit; every variant's result is written as soon as it ends).
#
#   bash benchmarks/gpu_path.sh wheels   # here, from the package index: .whl/ holds what the GPU machine lacks
#   bash benchmarks/gpu_path.sh [OUT]    # on the GPU machine, with .whl/ carried along: install, run; results in OUT
#
# The GPU machine has torch and transformers (and psutil, sacrebleu, pyyaml, numpy) but not DeepSpeed, Ray or MLflow.
# Neither script needs Ray or MLflow; the wheels are DeepSpeed (pure Python: it builds its ops at run time) and the
# packages DeepSpeed and the evaluation need that the machine lacks, for its Python 3.12. About 10 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = wheels ]; then
  py=.venv/bin/python
  version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
  mkdir -p .whl
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  # sdists built into py3-none-any wheels with this venv's build tools
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)" \
    "rouge_score==$(version rouge_score)"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic-core==$(version pydantic_core)" "pydantic==$(version pydantic)" "annotated-types==$(version annotated_types)" \
    "typing-inspection==$(version typing_inspection)" "hjson==$(version hjson)" "nltk==$(version nltk)"
  du -sh .whl && ls .whl
  exit 0
fi

out=$(mkdir -p "${1:-${OUT:-gpu_path_out}}" && cd "${1:-${OUT:-gpu_path_out}}" && pwd)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)" | tee -a "$out/gpu.txt"
# the plain-torch step at the loop's micro-batch (16 pairs) and about its sequence length, eager and compiled
timeout 120 python3 benchmarks/gpu_step.py --sizes 16 --seq 256 --compile --steps 6 --out "$out/step" 2>&1 | tee "$out/step.log" \
  || echo "gpu_step.py failed or ran out of time (see $out/step.log)"
timeout 330 python3 benchmarks/gpu_path.py --out "$out/path" --cache /tmp/gpu_path_cache 2>&1 | tee "$out/path.log" \
  || echo "gpu_path.py failed or ran out of time; the variants that ended are in $out/path/*.json"

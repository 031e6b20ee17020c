#!/usr/bin/env bash
# Create .venv and install flat-ray with its whole stack. torch is pinned by constraints/cpu.txt to the
# CPU wheel these machines carry (an unpinned torch would pull a multi-GB CUDA build). Re-running is cheap:
# the install is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${FLAT_RAY_CONSTRAINTS:-constraints/cpu.txt}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.flat-ray-installed
want=$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing flat-ray and its stack into .venv (about 2 minutes the first time)" >&2
  # pip byte-compiles every file it installs, one at a time (half of its 107 s here); compileall does the same on
  # every core afterwards (86 s in all). This machine's pip config lists local wheel folders that may be absent;
  # drop those warnings only.
  { .venv/bin/python -m pip install --no-compile --quiet --disable-pip-version-check -c "$CONSTRAINTS" -e ".[dev,cluster]" 2>&1 1>&3 \
      | { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }; } 3>&1
  env -u PYTHONDONTWRITEBYTECODE .venv/bin/python -m compileall -qq -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
  echo "$want" > "$stamp"
fi
# DeepSpeed compiles its CPU collective op (a shared-memory all-reduce, used by every run on CPU workers) the first
# time a run needs it: 20-80 s inside that run. Build it here, into torch's extension cache (~/.cache/torch_extensions),
# so runs and tests start without the stall; once built, this check takes a few seconds. A build killed half-way
# leaves torch's lock file behind and every later build would wait on it forever: a lock older than 10 minutes (a
# build takes under 2) is stale and goes.
find "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}" -name lock -path "*deepspeed*" -mmin +10 -delete 2>/dev/null || true
if ! timeout 900 .venv/bin/python -c "
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
builder is None or builder.load()
" >/dev/null 2>&1; then
  echo "setup: DeepSpeed's shared-memory op did not build here; the first run will try again" >&2
fi

#!/usr/bin/env bash
# Install flat-ray on a cluster node; cluster.yaml's setup_commands run it on every node (scripts/cluster_rehearsal.py
# runs it through `ray up` in CI). Safe to re-run: `ray up` runs it again on every update.
#
#   scripts/node/setup.sh [VENV]          VENV defaults to ~/venv
#
# 1. System packages (nfs-common for the shared EFS mount, socat for the MLflow UI forward), after apt-get update,
#    only when they are missing. FLAT_RAY_SKIP_APT=1 skips this step (non-Debian images).
# 2. A Python >= 3.11 (pyproject.toml's floor): the first python3.1x on PATH that is new enough, else a standalone
#    CPython 3.11 installed by uv (Ubuntu 22.04's own python3 is 3.10).
# 3. A venv with flat-ray[cluster] from this checkout, every transitive package pinned by constraints/cluster.txt,
#    then `pip check` and `flat-ray --help` as a smoke test.
# 4. VENV/bin on this user's PATH for interactive shells (`ray attach`, `ray down`'s `ray stop`) and login shells
#    (a job's `bash -lc '...'` entrypoint): the skeleton ~/.bashrc returns early in non-interactive shells, so
#    where /etc/profile resets PATH (Debian's does) a line in ~/.bashrc alone does not reach `bash -lc`.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${1:-$HOME/venv}
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo

if [ "${FLAT_RAY_SKIP_APT:-0}" != 1 ] && ! dpkg -s nfs-common socat > /dev/null 2>&1; then
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nfs-common socat
fi

new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" > /dev/null && new_enough "$candidate"; then python=$(command -v "$candidate"); break; fi
done
if [ -z "$python" ]; then
  export PATH=$HOME/.local/bin:$PATH
  command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
  uv python install 3.11
  python=$(uv python find 3.11)
fi

[ -x "$venv/bin/python" ] && new_enough "$venv/bin/python" || "$python" -m venv --clear "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c "$repo/constraints/cluster.txt" "$repo[cluster]"
"$venv/bin/python" -m pip check
"$venv/bin/flat-ray" --help > /dev/null

line="export PATH=$venv/bin:\$PATH  # flat-ray's node venv (scripts/node/setup.sh)"
for rc in ~/.bashrc ~/.profile; do
  grep -qxF "$line" "$rc" 2> /dev/null || echo "$line" >> "$rc"
done
echo "node setup: flat-ray installed in $venv ($("$venv/bin/python" --version))"

#!/usr/bin/env bash
# Set up, then run the whole test suite (offline: tests build their own tiny models and data); with no arguments,
# also check that scripts/cluster_demo.py's sweep on a local autoscaling cluster passes and rehearse cluster.yaml's
# node commands with `ray up` (scripts/cluster_rehearsal.py). Arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check flat_ray cli tests benchmarks
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ]; then
  # the whole run (CI's): a sweep on an autoscaling cluster (Ray's fake multi-node provider) with an MLflow server
  # (about 2 minutes)
  .venv/bin/python scripts/cluster_demo.py
  # then cluster.yaml's own node commands through `ray up` on Ray's on-prem provider, over SSH to this machine: the
  # node install, MLflow, Ray, the README's sweep line as a job, `ray down` (about 2 minutes; as root, since it adds
  # a user and an sshd on port 22). Last, because `ray stop` ends every Ray on the machine.
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo .venv/bin/python scripts/cluster_rehearsal.py
fi

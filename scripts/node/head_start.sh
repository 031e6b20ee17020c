#!/usr/bin/env bash
# Start the head node: MLflow, its loopback forward, then Ray. cluster.yaml's head_start_ray_commands run it on every
# `ray up`, and Ray's runner runs it in a login shell over SSH that ends when the script does.
#
#   scripts/node/head_start.sh SHARED [VENV]          SHARED: the shared mount; VENV defaults to ~/venv
#
# The services are started only when their port does not answer, so a re-run keeps the running server (its runs
# and their clients survive). A check of the port, not a `pgrep -f` of the server's command line: the shell Ray runs a command in
# has that text in its own command line, so pgrep always matched it and the server never started.
set -euo pipefail
shared=$1
venv=${2:-$HOME/venv}
addr=$(hostname -I | awk '{print $1}')   # the head's private address

# true when an HTTP GET of $1 succeeds (MLflow's /health), or when something accepts a TCP connection on $1:$2
http_ok() {
  "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2> /dev/null
}
tcp_ok() { (exec 3<> "/dev/tcp/$1/$2") 2> /dev/null; }
# a service in its own session with no fd of this SSH session, so it outlives the session and ssh does not wait on it
detach() { local log=$1; shift; setsid nohup "$@" < /dev/null > "$log" 2>&1 & }
wait_for() {
  local what=$1 log=$2; shift 2
  for _ in $(seq 120); do "$@" && return 0; sleep 0.5; done
  echo "head_start: $what did not answer within 60 s; the end of $log:" >&2; tail -n 20 "$log" >&2; return 1
}

# every Ray process of this node (raylet, job drivers, trial workers) inherits this: one model cache on the shared
# storage for the whole cluster, so each model is downloaded once
export HF_HOME=$shared/huggingface
mkdir -p "$HF_HOME" ~/mlflow "$shared/mlartifacts"

# MLflow on the private address only (never 0.0.0.0). Its SQLite store lives on the head's own disk (SQLite's locks
# are not safe on NFS; for a store that outlives the head use --backend-store-uri postgresql://...), the artifacts on
# the shared storage. It answers only the Host names it is reached by (MLflow's default, private ranges only, refuses
# an address outside them). Started first: it comes up while Ray does.
mlflow_up() { http_ok "http://$addr:5000/health"; }
mlflow_up || detach ~/mlflow/server.log "$venv/bin/mlflow" server --host "$addr" --port 5000 \
  --allowed-hosts "$addr:5000,127.0.0.1:5000,localhost:5000" \
  --backend-store-uri "sqlite:///$HOME/mlflow/mlflow.db" --artifacts-destination "$shared/mlartifacts"
# the same UI on the head's loopback, where `ray attach cluster.yaml -p 5000` forwards your browser
socat_up() { tcp_ok 127.0.0.1 5000; }
socat_up || detach ~/mlflow/socat.log socat TCP-LISTEN:5000,bind=127.0.0.1,reuseaddr,fork "TCP:$addr:5000"

# `ray up` re-runs this (not with --no-restart, the README's update path): stop the previous Ray first
"$venv/bin/ray" stop
ulimit -n 65536 2> /dev/null || ulimit -n "$(ulimit -Hn)"   # room for Ray's many connections, up to the hard limit
"$venv/bin/ray" start --head --port=6379 --object-manager-port=8076 \
  --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --dashboard-host=127.0.0.1

wait_for "MLflow at http://$addr:5000" ~/mlflow/server.log mlflow_up
wait_for "the forward on 127.0.0.1:5000" ~/mlflow/socat.log socat_up

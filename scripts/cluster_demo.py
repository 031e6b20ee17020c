"""An autoscaling Ray cluster on this one machine, and a sweep on it the way a cluster user runs one.

    .venv/bin/python scripts/cluster_demo.py [--root DIR] [--keep]      (scripts/cluster_demo.sh wraps it)

What it brings up (every part real, nothing mocked), shaped like a cold GPU cluster:
- a Ray head started with Ray's fake multi-node autoscaler (provider ``fake_multinode``: each node it adds is a
  raylet on this machine). The head has 1 CPU and 1 GiB of Ray memory, and no accelerator: it holds the trials'
  driver functions (0.01 CPU each) and nothing a training worker needs. The ``fake_a10g`` node type stands in for
  a GPU node type of ``cluster.yaml``: it carries Ray's ``accelerator_type:A10G`` resource (as AWS's A10G nodes
  do), 2 CPUs and 4 GiB of memory, and scales from 0 to 2 nodes. Each trial's worker asks for 2 CPUs, its host
  memory from the memory plan and ``launch.accelerator_type=A10G``: bigger than anything the cluster has when the
  sweep starts, so every trial must wait for the autoscaler (a trial that checked the cluster's size itself
  would fail here at once). The nodes start with ``OMP_NUM_THREADS=1``, as Ray's command runner starts them;
- an MLflow tracking server on 127.0.0.1 (SQLite store, artifacts in ``--artifacts-destination``);
- a folder standing in for the cluster's shared storage (``shared/``): Ray's storage path and the work folder.

Then ``flat-ray tune --address <head> --mlflow-uri http://127.0.0.1:PORT --storage-path shared/ray`` runs a small
space (FLAT with 2 divergences on the demo's forget05 and the tiny model, 1 worker per trial, 3 epochs), while this
script records the cluster's nodes. It tears everything down (only the processes of its own cluster: another Ray
on the machine is left alone) and exits 0 only if:
1. the autoscaler added worker nodes (none at the start);
2. the sweep ran 2 trials at once (their MLflow runs overlap in time) once the nodes were there, and both asked
   for their nodes at the start: the trial that reads the cell's original evaluation from the other started its run
   (asking Ray for its worker) before that evaluation ended, and logged its wait for it at its epoch 0 (a trial that
   waited before asking for workers would have its node start only once the first trial's node had started and
   evaluated);
3. every trial finished, and the sweep's exit status was 0;
4. the MLflow server holds the sweep's parent run with both trials as children, and their artifacts arrived
   through the server (in its artifact folder, not in the work folder);
5. every trial's driver function ran on the head, every training worker on an added node, and everything the
   sweep wrote is on the shared storage (its state, report, trial outputs, the one exported model, Ray's state);
6. the HF offline and cache variables, set for the sweep's driver only (the nodes start without them), reached
   the training workers;
7. faults on that cluster: once a trial has a registered checkpoint (each trial trains 3 epochs), every process of
   the node its rank 0 runs on is SIGKILLed (as a lost machine) and, at the same moment, the MLflow server is
   stopped for 20 s and then started again on the same port and store. The lost node drops out of the
   provider's list (as a cloud reports a dead instance gone: scripts/cluster_demo_provider.py), and the
   autoscaler adds a new node for the hit trial's waiting workers. The hit trial restores from its checkpoint on
   that new node (one that was not there when the node was killed) and finishes in its own MLflow run
   (``restores`` >= 1), and every trial's MLflow run has every training step and every evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flat_ray.envinfo import FORWARDED_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPACE = """\
name: cluster-demo
description: FLAT with two divergences on the demo's forget05 and the tiny model, one Ray Train worker per trial
base: [demo]
set: {model.name_or_path: tiny, data.split: forget05, data.max_length: 64, optim.micro_batch_size: 2, optim.epochs: 3,
      optim.lr: 2.0e-3, eval.max_examples: 4, eval.max_new_tokens: 4, eval.batch_size: 4}
grid:
  benchmark: [demo/forget05]
  method: [flat]
params:
  method.divergence: {grid: [total_variation, kl]}
num_samples: 1
search: {algorithm: basic, seed: 0}
scheduler: {name: fifo}
objective: forget_prob
resources: {num_workers: 1, cpus_per_worker: 2, gpus_per_worker: 0, deepspeed_stage: 3, accelerator_type: A10G}
"""
WORKER_TYPE = "fake_a10g"
NODE = {"CPU": 2, "memory": 4 * 2**30, "accelerator_type:A10G": 1}  # a worker node: its accelerator stands in for a GPU
HEAD_MEMORY = 2**30
OUTAGE_S = 20  # how long the MLflow server is away


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """Ray's fake multi-node provider: a 1-CPU head and the ``fake_a10g`` worker type that scales from 0 to 2."""
    return {
        "cluster_name": "flat-ray-demo", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        # Ray's fake multi-node provider, told when a node's processes have died (scripts/cluster_demo_provider.py)
        "provider": {"type": "external", "module": "cluster_demo_provider.LostNodeAwareProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": NODE, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def start_head(root: Path) -> str:
    """``ray start --head`` with the autoscaling config; returns the GCS address."""
    import ray._private.services as services

    port = free_port()
    address = f"{services.get_node_ip_address()}:{port}"
    config = root / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(address)))
    # the nodes start without the offline/cache variables, which only the sweep's driver has (as on a real
    # cluster): flat-ray passes them to the workers
    env = {k: v for k, v in os.environ.items() if k not in FORWARDED_ENV}
    # Ray's command runner starts every node's Ray with OMP_NUM_THREADS=1, which its workers inherit
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"), env.get("PYTHONPATH")]))})
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1", f"--memory={HEAD_MEMORY}",
                    "--include-dashboard=true",
                    f"--autoscaling-config={config}", f"--temp-dir={root / 'ray_tmp'}", "--disable-usage-stats"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return address


def stop_cluster(address: str, root: Path) -> None:
    """Kill the processes of this cluster only: those whose command line names its GCS port or its Ray folder."""
    port = address.rsplit(":", 1)[1]
    marks = (f":{port}", f"={port}", str(root / "ray_tmp"))
    me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}  # this script and whatever started it
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if proc.pid not in me and any(m in line for m in marks):
            try:  # with their children: Ray's agents retitle themselves (ray::DashboardAgent, no arguments left)
                mine += [proc, *proc.children(recursive=True)]
            except psutil.Error:
                pass
    for proc in mine:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(set(mine), timeout=30)


def start_mlflow(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """The server on ``port`` (a free one by default), with the demo's store: started again on the same port after
    an outage, it serves the same runs."""
    port = port or free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers",
                             "1", "--backend-store-uri", f"sqlite:///{root / 'server' / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "server" / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("cluster demo: the MLflow server did not start") from None
            time.sleep(0.5)


def stop_mlflow(server: subprocess.Popen) -> None:
    """The server and its workers at once (a graceful stop takes seconds)."""
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(30)


def snapshot(address: str, actors: dict[str, tuple[str, str]]) -> int:
    """How many nodes the cluster has now; adds its live actors to ``actors`` (id: class, node). Asked of Ray's
    state API without joining the cluster as a driver."""
    from ray.util.state import list_actors, list_nodes

    try:
        # a killed node makes the state API's answers partial: take them as they are
        n = len(list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False))
        for a in list_actors(address=address, limit=1000, raise_on_missing_output=False):  # dead ones too
            if a.node_id:  # placed
                actors[a.actor_id] = (a.class_name, a.node_id)
        return n
    except Exception as exc:  # noqa: BLE001 - the state API may be briefly unavailable while nodes join
        print(f"cluster demo: state API: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return 0


def alive_nodes(address: str) -> list[str]:
    from ray.util.state import list_nodes

    return sorted(n.node_id for n in list_nodes(address=address, filters=[("state", "=", "ALIVE")],
                                                raise_on_missing_output=False))


def head_node(address: str) -> str:
    from ray.util.state import list_nodes

    (head,) = [n.node_id for n in list_nodes(address=address, detail=True) if n.is_head_node]
    return head


def registered_checkpoints(run_dir: Path) -> int:
    """How many checkpoints Ray Train has registered for a trial (its own record in the storage path)."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


def store(root: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """A read of the MLflow server's SQLite store, which is there while the server is down too."""
    try:
        with sqlite3.connect(f"file:{root / 'server' / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql, args).fetchall()
    except sqlite3.Error:
        return []


def trial_to_hit(root: Path) -> tuple[str, str] | None:
    """A trial still running with a registered checkpoint, and the node its rank 0 runs on (its MLflow tag)."""
    for run_dir in sorted((root / "shared" / "ray" / "cluster-demo" / "train").glob("*")):
        if registered_checkpoints(run_dir) >= 1:
            rows = store(root, "select r.status, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                               "where r.name = ? and t.key = 'rank0_node'", (run_dir.name,))
            if rows and rows[0][0] == "RUNNING":
                return run_dir.name, rows[0][1]
    return None


def kill_node(node_id: str) -> int:
    """SIGKILL every process of one node the fake provider started (its raylet, agents and workers carry the
    node's id in RAY_OVERRIDE_NODE_ID_FOR_TESTING), as a lost machine would vanish; returns how many."""
    victims = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id:
                victims.append(proc)
        except psutil.Error:
            continue
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return len(victims)


class Faults:
    """Once a trial is running with a checkpoint: its rank 0's node is killed and the MLflow server is stopped; the
    server starts again on the same port and store ``OUTAGE_S`` later."""

    def __init__(self, root: Path, server: subprocess.Popen, uri: str):
        self.root, self.server, self.port = root, server, int(uri.rsplit(":", 1)[1])
        self.record: dict = {}
        self.address = ""

    def step(self, elapsed: float) -> None:
        if not self.record:
            hit = trial_to_hit(self.root)
            if hit:
                before = alive_nodes(self.address)
                stop_mlflow(self.server)
                self.record = {"trial": hit[0], "node": hit[1], "processes_killed": kill_node(hit[1]),
                               "at_s": round(elapsed, 1), "nodes_at_kill": before}
        elif "mlflow_back_s" not in self.record and elapsed - self.record["at_s"] >= OUTAGE_S:
            self.server, _ = start_mlflow(self.root, self.port)
            self.record["mlflow_back_s"] = round(elapsed, 1)


def run_sweep(root: Path, address: str, uri: str, actors: dict[str, tuple[str, str]], faults: Faults
              ) -> tuple[int, str, list[tuple[float, int]]]:
    """``flat-ray tune`` joined to the cluster; polls its nodes and actors while it runs, and injects the faults."""
    (root / "space.yaml").write_text(SPACE)
    shared = root / "shared"
    # the autoscaling config the head runs with, where `ray up` would leave it on the head (~/ray_bootstrap_config.yaml)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FLAT_RAY_VERBOSE": "0",
           "FLAT_RAY_CLUSTER_CONFIG": str(root / "autoscaling.json")}
    cmd = [str(BIN / "flat-ray"), "tune", "--address", address, "--space", str(root / "space.yaml"),
           "--name", "cluster-demo", "--mlflow-uri", uri, "--storage-path", str(shared / "ray"),
           f"paths.workdir={shared / 'work'}"]
    log = root / "tune.log"
    seen: list[tuple[float, int]] = []
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None and time.monotonic() - started < 900:
            elapsed = time.monotonic() - started
            if not seen or elapsed - seen[-1][0] >= 2:
                seen.append((elapsed, snapshot(address, actors)))
            faults.step(elapsed)
            time.sleep(0.25)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text(), seen


def check(root: Path, uri: str, code: int, out: str, seen: list[tuple[float, int]], placed: dict) -> list[str]:
    """What failed of the six promises in the module docstring (empty: all held)."""
    from mlflow.tracking import MlflowClient

    problems = []
    counts = [n for _, n in seen if n]  # 0: the state API did not answer that time
    if not counts or counts[0] != 1 or max(counts) < 3:
        problems.append(f"the autoscaler did not add 2 worker nodes (live nodes over time: {seen})")
    if code != 0 or "sweep cluster-demo: 2 trials, 0 errored" not in out:
        problems.append(f"flat-ray tune exited {code}:\n{out[-3000:]}")
        problems += failed_trials(out)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cluster-demo")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if r.data.tags.get("flat_ray.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("flat_ray.role") == "trial"]
    if len(parents) != 1 or len(trials) != 2:
        problems.append(f"the server holds {len(parents)} sweep runs and {len(trials)} trial runs, not 1 and 2")
    elif any(t.data.tags.get("mlflow.parentRunId") != parents[0].info.run_id for t in trials):
        problems.append("a trial run is not a child of the sweep's parent run")
    if trials and any(t.info.status != "FINISHED" for t in trials):
        problems.append(f"trial statuses: {[t.info.status for t in trials]}")
    seen_env = {t.data.params.get("resolved.worker_env", "") for t in trials}
    if not trials or any("HF_HUB_OFFLINE" not in e.split(",") for e in seen_env):
        problems.append(f"HF_HUB_OFFLINE, set only for the driver, did not reach the workers ({seen_env})")
    asked = {(t.data.params.get("resolved.threads_per_worker"), t.data.params.get("launch.accelerator_type"),
              float(t.data.params.get("resolved.host_memory_per_worker_gib", 0)) > 0) for t in trials}
    if asked != {("2", "A10G", True)}:
        problems.append(f"the workers did not run with 2 threads (their 2 reserved CPUs, not the nodes' "
                        f"OMP_NUM_THREADS=1) on A10G nodes with their host memory requested: {asked}")
    if len(trials) == 2:
        (a, b) = sorted((t.info.start_time, t.info.end_time or 0) for t in trials)
        if not b[0] < a[1]:
            problems.append("the 2 trials never ran at the same time")
        problems += waited_on_a_node(client, trials)
    served = list((root / "server" / "artifacts").rglob("config.yaml"))
    if len(served) < 2 or list((root / "shared" / "work").rglob("mlartifacts")):
        problems.append(f"trial artifacts did not go through the server ({len(served)} config.yaml there)")
    if placed.get("trial_fn_on_head") is not True or placed.get("workers_off_head") is not True:
        problems.append(f"placement: {placed or 'not recorded'}")
    problems += check_files(root, [t.info.run_name for t in trials])
    return problems


def waited_on_a_node(client, trials: list) -> list[str]:
    """The trial that read the cell's original evaluation started its run (and asked for its node) before the other
    trial's epoch-0 evaluation ended, and logged its wait for those values at its own epoch 0."""
    by_role = {t.data.tags.get("original_eval"): t for t in trials}
    if set(by_role) != {"evaluated", "cached"}:
        return [f"the cell's original was not evaluated once and read once: {sorted(by_role)}"]
    evaluated, cached = by_role["evaluated"], by_role["cached"]
    ended = min(m.timestamp for m in client.get_metric_history(evaluated.info.run_id, "eval/forget_prob") if m.step == 0)
    if not cached.info.start_time < ended or "original_wait_s" not in cached.data.metrics:
        return [f"{cached.info.run_name} started its run {(cached.info.start_time - ended) / 1000:.1f} s after "
                f"{evaluated.info.run_name} had evaluated the original: it waited before asking for its node"]
    return []


def failed_trials(out: str) -> list[str]:
    """The end of each failed trial's error.txt, which the sweep's console line names."""
    found = re.findall(r"trial (\S+) FAILED: see (\S+error\.txt)", out)
    return [f"{trial} failed:\n{Path(path).read_text()[-4000:] if Path(path).is_file() else path + ' is gone'}"
            for trial, path in found]


def check_files(root: Path, trials: list[str]) -> list[str]:
    """Everything the sweep wrote is on the shared storage: the sweep's state and report, each trial's output
    folder (its config and templates) and the one exported model under the work folder, each trial's Ray state
    under the storage path; nothing in the sweep's working directory."""
    work, ray = root / "shared" / "work" / "sweeps" / "cluster-demo", root / "shared" / "ray" / "cluster-demo"
    missing = [str(p) for p in (work / "sweep.json", work / "space.yaml", work / "report" / "report.html",
                                *(work / "trials" / t / "config.yaml" for t in trials),
                                *(ray / "train" / t / "flat_ray_run.json" for t in trials)) if not p.is_file()]
    models = list((work / "trials").glob("*/model/config.json"))
    stray = [str(p) for p in root.iterdir() if p.name not in ("shared", "server", "ray_tmp", "space.yaml",
                                                              "tune.log", "autoscaling.json")]
    problems = [f"missing on the shared storage: {missing}"] if missing else []
    if len(models) != 1:
        problems.append(f"the sweep exported {len(models)} models, not the best trial's one")
    if stray:
        problems.append(f"written outside the shared storage: {stray}")
    return problems


STEPS = 15  # per trial: 10 questions in micro-batches of 2 on 1 worker, 3 epochs


def check_faults(uri: str, record: dict) -> list[str]:
    """What failed of the seventh promise: the trial whose node was killed (while the MLflow server was away)
    restored from its checkpoint on another node in the same MLflow run, and no trial lost a metric."""
    from mlflow.tracking import MlflowClient

    if not record or not record.get("processes_killed") or "mlflow_back_s" not in record:
        return [f"the faults were not injected as planned: {record}"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cluster-demo")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("flat_ray.role") == "trial"]
    problems = []
    (hit,) = [r for r in trials if r.info.run_name == record["trial"]] or [None]
    tags = hit.data.tags if hit else {}
    if not hit or hit.info.status != "FINISHED" or int(tags.get("restores", 0)) < 1:
        problems.append(f"the trial whose node was killed did not restore and finish: {hit and hit.info.status}, "
                        f"restores={tags.get('restores')}")
    elif tags.get("rank0_node") in record["nodes_at_kill"] or int(tags.get("resumed_from_epoch", 0)) < 1:
        problems.append(f"it did not restore from a checkpoint on a node the autoscaler added after the kill "
                        f"(rank0_node {tags.get('rank0_node')}, nodes at the kill {record['nodes_at_kill']}, "
                        f"resumed_from_epoch {tags.get('resumed_from_epoch')})")
    record.update(restored_on=tags.get("rank0_node"), resumed_from_epoch=tags.get("resumed_from_epoch"))
    for run in trials:
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/forget_prob"))
        if steps != set(range(1, STEPS + 1)) or sorted(set(evals)) != [0, 1, 2, 3]:
            problems.append(f"{run.info.run_name} lost metrics: train/loss steps {sorted(steps)}, evaluations {evals}")
    return problems


def placement(head: str, actors: dict[str, tuple[str, str]]) -> dict:
    """Which node ran each trial's driver function (Tune's ImplicitFunc actor) and each training worker."""
    fns = [node for cls, node in actors.values() if cls == "ImplicitFunc"]
    workers = [node for cls, node in actors.values() if cls == "RayTrainWorker"]
    return {"trial_fn_on_head": bool(fns) and all(n == head for n in fns),
            "workers_off_head": bool(workers) and not any(n == head for n in workers),
            "trial_fns": len(fns), "workers": len(workers)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="folder for everything it writes (default: a new temporary folder)")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="flat-ray-demo-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Ray's token authentication, as a real cluster should run it: every process of this cluster (head, nodes, the
    # sweep's driver, this script's state queries) holds the same token
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    server, uri = start_mlflow(root)
    faults = Faults(root, server, uri)
    address = None
    try:
        address = faults.address = start_head(root)
        print(f"cluster demo: head {address} (1 CPU, 1 GiB, no accelerator: no room for a training worker), MLflow {uri}, root {root}")
        actors: dict[str, tuple[str, str]] = {}
        code, out, seen = run_sweep(root, address, uri, actors, faults)
        placed = placement(head_node(address), actors)
    finally:
        if address:
            stop_cluster(address, root)
        stop_mlflow(faults.server)
    server, uri = start_mlflow(root)  # read the runs back from the same store
    try:
        problems = check(root, uri, code, out, seen, placed) + check_faults(uri, faults.record)
    finally:
        stop_mlflow(server)
    for line in out.splitlines():
        if line.startswith(("trial ", "sweep ")):
            print("  " + line)
    print(f"cluster demo: live nodes over time (s, nodes): {[(round(t), n) for t, n in seen[::5]]}")
    print(f"cluster demo: placement {json.dumps(placed)}")
    print(f"cluster demo: faults {json.dumps(faults.record)}")
    if problems:
        print("cluster demo FAILED:\n- " + "\n- ".join(problems))
        return 1
    print("cluster demo passed: trials bigger than anything the cluster had at the start (2 CPUs, host memory and an "
          "A10G each) waited, the autoscaler added 2 A10G nodes from 0, both trials asked for theirs at the start "
          "(the second before the first had evaluated the cell's original), 2 trials ran at once and finished, "
          "their workers used their 2 reserved CPUs, the MLflow "
          "server holds the sweep and its trials with their artifacts, trial functions ran on the head, "
          "the driver's offline/cache variables reached the workers, and the trial whose node was killed while "
          f"the MLflow server was away for {OUTAGE_S} s restored from its checkpoint on a node the autoscaler "
          "added in its place, in its own MLflow run, with every metric")
    return 0


if __name__ == "__main__":
    sys.exit(main())

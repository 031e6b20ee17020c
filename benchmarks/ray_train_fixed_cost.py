"""What a Ray Train run costs before it does anything: `TorchTrainer.fit()` of a function that returns at once.

Prints, per run, the wall time and the CPU-seconds the whole machine spent (from /proc/stat, Linux only), next to
what an idle local Ray spends in the same time, and the processes that ran during the last run with their own
CPU-seconds (Ray Train's controller, workers and helper actors). The test suite makes about 30 Ray Train runs, so
this fixed cost is a large part of its CPU work (docs/suite-times.md).

    .venv/bin/python benchmarks/ray_train_fixed_cost.py [--runs 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> float:
    """Busy CPU-seconds of the whole machine since boot (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / TICK


def process_cpu_s() -> dict[int, tuple[str, float]]:
    """{pid: (name, CPU-seconds)} of every process now."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[0].decode(errors="replace")[:48]
        except OSError:
            continue
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def watch(stop: threading.Event, seen: dict[int, tuple[str, float]]) -> None:
    """Keep each process's last CPU-seconds until ``stop`` (processes that end keep their last sample)."""
    while not stop.is_set():
        for pid, (name, cpu) in process_cpu_s().items():
            seen[pid] = (name or seen.get(pid, ("?", 0.0))[0], cpu)  # a process that is ending has no command line
        time.sleep(0.2)


def noop(config: dict) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")  # as the test suite polls
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING")
    time.sleep(5)
    c0, t0 = machine_cpu_s(), time.time()
    time.sleep(10)
    idle = (machine_cpu_s() - c0) / (time.time() - t0)
    print(f"idle local Ray: {idle:.2f} CPU-seconds per second")
    cpus = (os.cpu_count() or 2) / args.workers - 0.01
    with tempfile.TemporaryDirectory() as store:
        for i in range(args.runs):
            before, seen, stop = process_cpu_s(), {}, threading.Event()
            watcher = threading.Thread(target=watch, args=(stop, seen), daemon=True)
            watcher.start()
            c0, t0 = machine_cpu_s(), time.time()
            TorchTrainer(noop, scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": cpus}),
                         run_config=RunConfig(name=f"noop{i}", storage_path=store)).fit()
            wall, cpu = time.time() - t0, machine_cpu_s() - c0
            stop.set()
            watcher.join()
            print(f"run {i + 1}: {wall:.1f} s wall, {cpu:.1f} CPU-seconds (an idle Ray: {idle * wall:.1f})")
        used = {pid: (name, s - before.get(pid, (name, 0.0))[1]) for pid, (name, s) in seen.items()}
        for name, s in sorted(used.values(), key=lambda x: -x[1])[:10]:
            if s >= 0.2:
                print(f"  {s:5.1f} CPU-s  {name}")


if __name__ == "__main__":
    main()

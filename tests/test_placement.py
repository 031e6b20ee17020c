"""What a worker asks Ray for, the node types of a cluster YAML, and which node type can ever hold a trial: every
number by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from flat_ray.errors import FlatRayError
from flat_ray.memory import GIB, KNOWN, host_plan
from flat_ray.placement import (
    NodeType,
    can_hold,
    check_holdable,
    landing,
    max_trials,
    node_types_from_yaml,
    trials_per_node,
    worker_bundle,
)
from flat_ray.sweep import load_space

ROOT = Path(__file__).resolve().parents[1]
LLAMA = "locuslab/tofu_ft_llama2-7b"


@pytest.fixture(scope="module")
def tofu():
    """The shipped tofu space's llama (2 x (8 CPU, 1 GPU), optimizer offload) and phi cells."""
    cells = load_space("tofu", check_files=False).cells
    return cells[0].config, cells[-1].config


def test_cluster_yaml_node_types_carry_what_ray_detects_on_aws():
    nodes = {n.name: n for n in node_types_from_yaml(ROOT / "cluster.yaml")}
    a10g = nodes["gpu_a10g_x8"]
    assert a10g.resources == {"CPU": 192, "GPU": 8, "accelerator_type:A10G": 1, "memory": 0.7 * 768 * GIB}
    assert a10g.gpu_gib == 24 and a10g.max_count == 3 and a10g.accelerator == "A10G"
    assert nodes["gpu_a100_x8"].accelerator == "A100" and nodes["gpu_a100_x8"].gpu_gib == 40
    assert nodes["head_cpu"].resources == {"CPU": 8, "memory": 0.7 * 64 * GIB} and nodes["head_cpu"].max_count == 1


def test_a_worker_asks_for_its_cpus_gpus_host_memory_and_accelerator(tofu):
    llama, _ = tofu
    host = host_plan(llama, KNOWN[LLAMA]).peak
    assert worker_bundle(llama) == {"CPU": 8, "GPU": 1, "memory": float(int(host) + (host % 1 > 0))}
    assert worker_bundle(llama)["memory"] / GIB == pytest.approx(78.3, abs=0.05)
    assert llama.launch.strategy() == "STRICT_PACK"  # 2 GPU ranks: all on one node
    a100 = load_space("tofu", ["launch.accelerator_type=A100"], check_files=False).cells[0].config
    assert worker_bundle(a100)["accelerator_type:A100"] == 0.001  # what Ray Train's ScalingConfig adds
    demo = load_space("demo").cells[0].config
    assert demo.launch.strategy() == "PACK" and worker_bundle(demo) == {"CPU": 0.99, "memory": 2 * GIB}


def test_the_node_type_a_trial_lands_on_and_how_many_trials_a_node_holds(tofu):
    llama, phi = tofu
    nodes = node_types_from_yaml(ROOT / "cluster.yaml")
    # a llama trial holds 2 x 78.3 GiB of host memory: 3 fit a g5.48xlarge's 537.6 GiB (GPUs would allow 4)
    assert landing(llama, nodes).name == "gpu_a10g_x8" and trials_per_node(llama, nodes[1]) == 3
    assert trials_per_node(phi, nodes[1]) == 4  # GPUs bind: 8 / 2
    assert max_trials(llama, nodes) == 3 * 3 + 2 * 4  # every A10G and A100 node at its max_workers
    g5_12 = NodeType("gpu_a10g_x4", {"CPU": 48, "GPU": 4, "memory": 0.7 * 192 * GIB, "accelerator_type:A10G": 1},
                     6, 24)
    assert not can_hold(llama, g5_12) and can_hold(phi, g5_12)  # 156.6 GiB > 134.4 GiB of Ray memory


def test_a_trial_no_node_type_can_hold_is_refused_in_one_line(tofu):
    llama, _ = tofu
    g5_12 = NodeType("gpu_a10g_x4", {"CPU": 48, "GPU": 4, "memory": 0.7 * 192 * GIB, "accelerator_type:A10G": 1},
                     6, 24)
    with pytest.raises(FlatRayError) as exc:
        check_holdable(llama, [g5_12], "cell llama: one trial")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("cell llama: one trial asks for 2 workers x (CPU 8, GPU 1, memory 78.3 GiB) on one "
                              "node (STRICT_PACK) but no node type can ever hold it: gpu_a10g_x4 (CPU 48, GPU 4, "
                              "memory 134.4 GiB, A10G)")
    h100 = load_space("tofu", ["launch.accelerator_type=H100"], check_files=False).cells[-1].config
    with pytest.raises(FlatRayError, match=r"launch.accelerator_type=H100 is on no node type \(they offer: A100, "
                                           r"A10G\)"):
        check_holdable(h100, node_types_from_yaml(ROOT / "cluster.yaml"), "cell phi: one trial")
    check_holdable(llama, node_types_from_yaml(ROOT / "cluster.yaml"), "cell llama")  # as shipped: holdable


def test_strict_pack_needs_one_node_for_all_workers_pack_spreads_them():
    cpu = load_space("demo", ["launch.cpus_per_worker=2", "launch.num_workers=2"]).cells[0].config
    small = [NodeType("n", {"CPU": 3, "memory": 8 * GIB}, 2)]
    assert cpu.launch.strategy() == "PACK" and max_trials(cpu, small) == 1 and can_hold(cpu, small[0])
    strict = load_space("demo", ["launch.cpus_per_worker=2", "launch.num_workers=2",
                                 "launch.placement_strategy=STRICT_PACK"]).cells[0].config
    assert max_trials(strict, small) == 0 and not can_hold(strict, small[0])

"""A simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``): several raylets on this machine.

The head has no CPU, so every task and actor that needs one (every unit of every stage, the Serve
replicas, the Ray Train workers, the evaluation actors) must land on a worker node. This tier runs in its
own pytest process (``make test`` runs ``pytest tests/cluster`` apart from the main suite): a process
joins one Ray cluster, and the main suite's local Ray is another. Only this cluster's own nodes are
started and stopped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nodes import WORKER_CPUS, agent_ports, free_port  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")

@pytest.fixture(scope="session")
def cluster():
    """Head (0 CPUs) + 2 worker nodes of WORKER_CPUS logical CPUs each; the test process is its driver."""
    import ray
    from ray.cluster_utils import Cluster

    from middo_ray.models import ensure_tiny

    ensure_tiny()                       # built once here, not raced by the workers
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "dashboard_port": free_port(), "include_dashboard": True,
        "ray_client_server_port": free_port(), **agent_ports()})
    workers = [c.add_node(num_cpus=WORKER_CPUS, **agent_ports()) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    c.worker_nodes_list = workers
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def gpu_node(cluster):
    """One more worker node, with 2 CPUs and 1 logical GPU (Ray accounts it; torch sees no CUDA, so the work
    placed on it computes on the CPU), removed after the test."""
    node = cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=1, **agent_ports())
    cluster.wait_for_nodes()
    yield node
    cluster.remove_node(node)

"""The loop on a simulated three-node cluster, and a node lost in the middle of a diagnosis.

The head has no CPU (conftest), so the stages' work can only run on the two worker nodes; the stages
record the nodes their units ran on, and the tests check them against the cluster's.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
sys.path.insert(0, str(GOLDEN))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import case_tree  # noqa: E402
from compare import assert_same_as_golden  # noqa: E402
from extract import extract  # noqa: E402
from nodes import WORKER_CPUS, agent_ports, free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(1500)]


def gpu_tree(tmp_path: Path, handoff: str) -> dict:
    """The demo case planned for one GPU: the teacher on it in the refine stage, one training worker on it in
    training (gloo: torch sees no CUDA on a node that only declares its GPU)."""
    tree = case_tree("demo", tmp_path, free_port())
    tree["refine"].update(proxy_location="HeadOnly",     # one machine: proxies on every node would share the port
                          gpus_per_replica=1, gpu_handoff=handoff)
    tree["train"].update(use_gpu=True, backend="gloo")
    return tree


def test_demo_loop_on_worker_nodes_hands_the_gpu_to_training_and_reproduces_the_pinned_results(
        cluster, gpu_node, tmp_path):
    """Two rounds of the demo loop on the cluster, with one GPU that the teacher and training take in turn
    (``refine.gpu_handoff=release``): every unit of every sharded stage ran on a worker node (never the
    head); before each training the teacher app was deleted and every training ran on the teacher's GPU;
    the second round's refine redeployed the teacher, which answered; and signals, flags, refine results,
    D_1, D_2 and the final file equal the results pinned from the driver-side loop on local Ray (a hand-off
    changes where work runs, never what it computes)."""
    from middo_ray.config import build_config
    from middo_ray.loop import run_loop

    run_loop(build_config(gpu_tree(tmp_path, "release")))
    run = tmp_path / "demo"
    assert_same_as_golden(extract(run, 2), json.loads((GOLDEN / "demo.json").read_text()))

    head = cluster.head_node.node_id
    workers = {n.node_id for n in cluster.worker_nodes_list} | {gpu_node.node_id}
    for record in sorted(run.glob("round_*/*/stage.json")):
        info = json.loads(record.read_text())
        if "nodes" in info:
            assert info["nodes"] and set(info["nodes"]) <= workers and head not in info["nodes"], record
    for k in (1, 2):
        assert len(json.loads((run / f"round_{k}" / "diagnose" / "stage.json").read_text())["nodes"]) >= 1

    the_gpu = {"node_id": gpu_node.node_id, "gpu_ids": ["0"]}
    for k in (0, 1, 2):
        assert json.loads((run / f"round_{k}" / "train" / "stage.json").read_text())["placement"] == [
            {"rank": 0, **the_gpu}], k
    for k, first in ((1, "deploy"), (2, "redeploy")):
        manifest = json.loads((run / f"round_{k}" / "manifest.json").read_text())
        teacher = [e for e in manifest["serve"]["events"] if e["app"] == "middo-refiner"]
        assert [e["action"] for e in teacher] == [first, "release"], manifest["serve"]
        assert teacher[0]["placement"] == the_gpu and all(e["seconds"] >= 0 for e in teacher)
        refine = json.loads((run / f"round_{k}" / "refine" / "stage.json").read_text())
        assert refine["counts"]["requests"] > 0            # the (re)deployed teacher answered


def test_node_lost_mid_diagnosis_leaves_every_row_exactly_once(cluster, tmp_path):
    """A third worker node joins, diagnosis spreads its actors over the three workers, and the third node
    is removed while shards are still being scored: Ray Data restarts the lost actor on a surviving node
    and retries its shard, and every row of the dataset appears exactly once in the signals, embeddings
    and neighbours, each shard aligned with its input."""
    import pyarrow.parquet as pq

    from middo_ray import data, diagnose
    from middo_ray.config import build_config
    from middo_ray.rundir import Run

    extra = cluster.add_node(num_cpus=WORKER_CPUS, **agent_ports())
    cluster.wait_for_nodes()
    cfg = build_config({"run": {"run_id": "lost", "output_dir": str(tmp_path)},
                        "data": {"path": "demo", "cutoff_len": 128, "rows_per_shard": 8},
                        "model": {"base": "tiny"},
                        "diagnose": {"num_actors": 3, "rows_per_block": 8}})
    run = Run(cfg).open()
    d = run.round(0).run("data", data, cfg.data).output
    assert len(d.train.names) >= 20
    signals_dir = tmp_path / "lost" / "round_1" / "diagnose" / "signals"
    outcome: dict = {}

    def diagnose_all():
        try:
            outcome["result"] = run.round(1).run("diagnose", diagnose, cfg.diagnose,
                                                 {"dataset": d.train, "model": "tiny"})
        except BaseException as exc:  # the assertion below reports it
            outcome["error"] = exc

    worker = threading.Thread(target=diagnose_all)
    worker.start()
    deadline = time.time() + 600
    while time.time() < deadline and len(list(signals_dir.glob("part-*.parquet"))) < 4:
        time.sleep(0.2)
    done_before = len(list(signals_dir.glob("part-*.parquet")))
    assert 0 < done_before < len(d.train.names), "diagnosis finished before the node could be removed"
    cluster.remove_node(extra)
    worker.join(timeout=900)
    assert not worker.is_alive() and "error" not in outcome, outcome.get("error")

    out = outcome["result"].output
    want = [sid for p in d.train.paths() for sid in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()]
    for shards in (out.signals, out.embeddings, out.neighbors):
        got = [sid for p in shards.paths() for sid in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()]
        assert got == want                                     # every row exactly once, in dataset order
    assert len(set(want)) == len(want) == outcome["result"].info["rows"]

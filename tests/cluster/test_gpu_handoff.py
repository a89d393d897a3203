"""GPUs handed between phases (``refine.gpu_handoff``) on a cluster with one node that declares a GPU.

Ray accounts the GPU exactly as it would a real one (Serve replicas, Ray Train workers and the diagnosis and
evaluation actors reserve it, and Ray hands out its id); the work placed on it computes on the CPU because
torch sees no CUDA device, and training uses gloo (``train.backend``). Each plan needs the one GPU in both
phases: the teacher in the refine stage, one training worker in training.

- ``release``: the demo loop in ``test_cluster.py`` (the teacher deleted before each training and brought
  back at the next refine, every training on the teacher's GPU, the pinned results unchanged).
- ``keep``: the teacher would hold the GPU through training, so training needs a second one: the run is
  refused before any work, with the numbers and the fix, instead of waiting for ever.
- ``sleep``: the teacher holds a 0.01 share of the GPU, the training worker asks for the rest, so training
  runs beside the sleeping teacher on the same GPU; the woken teacher answers again.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_cluster import gpu_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.cluster, pytest.mark.timeout(900)]


def test_keep_is_refused_before_any_work_when_training_needs_the_teachers_gpu(gpu_node, tmp_path):
    from middo_ray.config import build_config
    from middo_ray.loop import run_loop

    with pytest.raises(ValueError, match=r"training needs 2 GPUs \(1 for the 1 training worker\(s\) \+ 1 the teacher "
                                         r"app keeps.*cluster has 1; set refine.gpu_handoff=release"):
        run_loop(build_config(gpu_tree(tmp_path, "keep")))
    assert not (tmp_path / "demo" / "round_0" / "data").exists()      # refused before any stage ran


def test_sleep_lets_training_land_on_the_sleeping_teachers_gpu(gpu_node, tmp_path):
    from middo_ray.config import build_config
    from middo_ray.demo import demo_path
    from middo_ray.io.read import read_dataset
    from middo_ray.serve_apps import ServeApps, check_gpu_fit
    from middo_ray.train import train_sft

    tree = gpu_tree(tmp_path, "sleep")
    tree["refine"]["engine"] = "transformers"          # its sleep moves the weights off the GPU
    cfg = build_config(tree)
    assert cfg.gpu_worker_share == pytest.approx(0.99)
    need = check_gpu_fit(cfg)                          # 0.01 (teacher) + 0.99 (worker) on one GPU
    assert need["train"] == pytest.approx(1.0)
    the_gpu = {"node_id": gpu_node.node_id, "gpu_ids": ["0"]}
    rows = read_dataset(demo_path("seed")).rows[:16]
    with ServeApps(cfg) as apps:
        name = apps.teacher()
        apps.hand_off()
        deploy, sleep = apps.take_events()
        assert (deploy["action"], sleep["action"]) == ("deploy", "sleep") and deploy["placement"] == the_gpu
        result = train_sft(rows, cfg, tmp_path / "train", "tiny", run_name="beside-the-teacher")
        assert result["placement"] == [{"rank": 0, **the_gpu}]        # the teacher's own GPU
        assert apps.teacher() == name and [e["action"] for e in apps.take_events()] == ["wake"]
        answer = apps.handle(name).refine.remote({
            "operation": "improve", "samples": [{"sample_id": "s1", "instruction": "Name a colour.", "output": "Red."}],
            "sampling": {"max_new_tokens": 4, "seed": 3}, "max_retries": 0}).result(timeout_s=300)
        assert [r["sample_id"] for r in answer["results"]] == ["s1"]   # the woken teacher answers

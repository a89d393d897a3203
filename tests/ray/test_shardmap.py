"""The shard runner on real Ray Data: a unit (a whole shard) may run longer than Ray Data's no-progress
timeout without the stage being aborted."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_a_unit_longer_than_ray_datas_no_progress_timeout_is_not_aborted(ray_local, tmp_path):
    """Ray Data aborts a dataset in which no block moves for execution_no_progress_timeout_s (30 min by
    default); one diagnosis unit on a slow machine can take longer. With the timeout at 1 s, a plain
    map_batches over 4-second batches is aborted (the guard is real), and map_shards over the same units
    finishes with every summary."""
    import ray
    from ray.data import DataContext

    from middo_ray.shardmap import map_shards

    class Slow:
        def process(self, unit: dict) -> dict:
            time.sleep(4)
            return {"rows": unit["rows"], "slept": True}

    def slow_batch(batch):
        time.sleep(4)
        return batch

    ctx = DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 1
    try:
        with pytest.raises(Exception, match="no progress"):
            ray.data.range(2, override_num_blocks=2).map_batches(slow_batch, batch_size=1).take_all()
        units = [{"id": f"u{i}", "rows": 3, "commit": str(tmp_path / f"u{i}.json")} for i in range(2)]
        got = map_shards(units, Slow, what="slow units", actors={"concurrency": 1, "num_cpus": 0.25})
    finally:
        ctx.execution_no_progress_timeout_s = before
    assert [s["unit"] for s in got] == ["u0", "u1"] and all(s["slept"] for s in got)

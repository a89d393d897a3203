"""Progress from workers elsewhere in the cluster reaches the driver's display (middo_ray.console's board):
training steps (follow_remote) and rows done within a shard that is still running (follow_units)."""

import time

import pytest

from middo_ray import console

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


@pytest.fixture
def shown(monkeypatch):
    """Every (done, total) the driver's progress displays were given."""
    seen: list[tuple[int, int]] = []
    update = console.Progress.update

    def spy(self, done, extra=""):
        seen.append((int(done), self.total))
        return update(self, done, extra)

    monkeypatch.setattr(console.Progress, "update", spy)
    return seen


def test_a_workers_steps_reach_the_driver(ray_local, shown):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def steps(n: int) -> None:
        from middo_ray import console as worker_console

        for i in range(1, n + 1):
            worker_console.report_remote("steps-test", i, n, f"loss {1 / i:.2f}")
            time.sleep(0.7)                            # above the worker's 0.5 s between reports

    with console.follow_remote("steps-test", "steps", every_s=0.2):
        ray.get(steps.remote(5))
        time.sleep(0.6)                                # one more poll for the last report
    done = [d for d, _ in shown]
    assert done and done == sorted(done) and done[-1] == 5 and len(set(done)) >= 3, shown
    assert all(total == 5 for _, total in shown)


def test_rows_done_within_running_shards_add_to_the_committed_ones(ray_local, shown):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def shard(unit: dict, blocks: int) -> None:
        from middo_ray import console as worker_console

        for b in range(1, blocks):
            worker_console.report_unit(unit, b * 10)
            time.sleep(0.7)

    progress = console.Progress("unit-test", 100, "rows")
    committed = {"rows": 40}                           # one shard of 40 rows committed before
    units = [{"id": f"part-{i}", "rows": 30, "_progress": "unit-test"} for i in range(2)]
    with console.follow_units("unit-test", progress, lambda: committed["rows"], every_s=0.2) as within:
        ray.get([shard.remote(u, 3) for u in units])   # each reports 10 then 20 of its 30 rows
        time.sleep(0.6)
        assert progress.done == 40 + 20 + 20, shown
        within.unit_done("part-0")                     # its commit's summary now counts its rows
        committed["rows"] += 30
        time.sleep(0.6)
        assert progress.done == 40 + 30 + 20
    progress.finish()
    assert all(d <= 100 for d, _ in shown) and [d for d, _ in shown] == sorted(d for d, _ in shown)

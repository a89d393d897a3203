"""A driver for the resume tests: the first stages of a round on the demo data, in shards of 16 rows.

    python tests/ray/resume_job.py RUN_DIR {diagnose|refine} PORT

Runs data, then diagnose (M_t = the tiny base model), and for ``refine`` also select and refine with the
tiny teacher on a local Ray of its own. The test kills it part-way (SIGKILL) and runs it again; it prints
the refine counts of a finished run as JSON on its last line.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(run_dir: str, upto: str, port: int) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stdout)
    from middo_ray import data, diagnose, refine, select
    from middo_ray.config import build_config
    from middo_ray.rundir import Run, init_ray
    from middo_ray.schema import AXES
    from middo_ray.serve_apps import ServeApps

    cfg = build_config({"run": {"run_id": "r", "output_dir": run_dir, "seed": 3},
                        "data": {"path": "demo", "cutoff_len": 96, "rows_per_shard": 16},
                        "model": {"base": "tiny"}, "diagnose": {"rows_per_block": 16},
                        "refine": {"max_new_tokens": 8, "max_retries": 0, "batch_size": 2, "http_port": port,
                                   "max_concurrency": 1},
                        "ray": {"num_cpus": 4}})
    run = Run(cfg).open()
    init_ray(cfg)
    d = run.round(0).run("data", data, cfg.data).output
    r1 = run.round(1)
    diag = r1.run("diagnose", diagnose, cfg.diagnose, {"dataset": d.train, "model": "tiny"}).output
    if upto == "diagnose":
        return
    sel = r1.run("select", select, cfg.select, {"diagnosis": diag})
    counts = sel.info["counts"]
    with ServeApps(cfg) as apps:
        res = r1.run("refine", refine, cfg.refine, {
            "dataset": d.train, "flags": sel.output, "diagnosis": diag, "apps": apps, "judge_model": "tiny",
            "any_sparse": counts["diversity"]["flagged"] > 0, "jobs": sum(counts[a]["flagged"] for a in AXES)})
    print(json.dumps(res.info["counts"]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

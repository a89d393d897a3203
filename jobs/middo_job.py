"""Ray job entry point for the Middo loop.

Submit to a running cluster from the project root:

    ray job submit --working-dir . -- python jobs/middo_job.py --config jobs/demo.yaml

Extra ``--set KEY=VALUE`` overrides work as with ``middo run``. Inside a job ``RAY_ADDRESS`` is set,
so the loop joins the cluster instead of starting a local Ray.
"""

import os
import sys

# The working dir is the project root; make the package importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from middo_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))

"""A Serve app that does not start is deployed again: its model appears only after the first start failed
(a shared volume mounted late, a node that ran out of memory), and the second try serves it."""

from __future__ import annotations

import logging
import shutil
import socket

import httpx
import pytest

from middo_ray.config import build_config
from middo_ray.serve_apps import DEPLOY_TRIES, refiner_args, start_refiner, stop_apps

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_start_that_fails_is_tried_again(ray_local, tiny_model, tmp_path):
    """The first start fails (no model at the path: every replica constructor fails and Serve gives the app
    up); the warning says it will try again; the model is put in place then; the next try is healthy and
    answers over HTTP."""
    model = tmp_path / "late-model"
    port = _free_port()
    cfg = build_config({"refine": {"model": str(model), "http_port": port, "cpus_per_replica": 0.5,
                                   "app_name": "late-app", "route_prefix": "/late"}})
    retries: list[str] = []

    class PutModelInPlace(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "did not start" in record.getMessage() and not retries:
                retries.append(record.getMessage())
                shutil.copytree(tiny_model, model)

    handler = PutModelInPlace(level=logging.WARNING)
    logging.getLogger("middo").addHandler(handler)
    try:
        start_refiner(cfg, health_timeout_s=120)
        assert len(retries) == 1 and f"(2 of {DEPLOY_TRIES})" in retries[0], retries
        health = httpx.get(f"http://127.0.0.1:{port}/late/healthz", timeout=30).json()
        assert health["status"] == "ok" and health["model"] == refiner_args(cfg)["model"]
    finally:
        logging.getLogger("middo").removeHandler(handler)
        stop_apps(cfg)

"""The Serve applications of a run: the refiner (teacher) and the judge, started when needed, stopped after.

The Serve application itself lives in the top-level ``serve`` package, which this library must not import
(``serve`` depends on ``middo_ray``, never the reverse). It is therefore loaded by its import path string,
exactly as ``serve run serve.app:build_app`` would.

:class:`ServeApps` is what the loop holds: the refiner app keeps the configured teacher for the whole
run; the judge app (``refine.judge='current'``) serves the round's checkpoint and is redeployed when asked
for another one, so the judge follows the model being trained, and released after each refine stage (its
next model only exists after the next training, and its CPUs or GPUs are then free for training). The
refine stage's Ray Data workers reach both apps by name (``serve.get_app_handle``); the driver only
deploys them.
"""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

from middo_ray.config import MiddoConfig
from middo_ray.wire import ServeSettings

log = logging.getLogger("middo")

APP_IMPORT_PATH = "serve.app:build_app"
HEALTH_TIMEOUT_S = 600.0


def _load_builder(path: str = APP_IMPORT_PATH):
    """Imports 'module:attribute' by string, so middo_ray has no import-time dependency on serve/."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(f"cannot import the refiner app '{path}': {exc}; run from the project root "
                           f"or install the project (pip install -e .)") from exc
    return getattr(module, attr)


def refiner_args(cfg: MiddoConfig) -> dict[str, Any]:
    """Arguments of ``serve.app:build_app`` derived from the run config (the shared ServeSettings fields
    pass unchanged)."""
    r = cfg.refine
    return {"model": r.model or cfg.model.base, "dtype": cfg.model.dtype, "num_cpus": r.cpus_per_replica,
            "num_gpus": r.gpus_per_replica, **{k: getattr(r, k) for k in ServeSettings.model_fields}}


def judge_args(cfg: MiddoConfig, model: str) -> dict[str, Any]:
    """Arguments of the judge app (``refine.judge='current'``): the refiner's limits and security, the
    round's checkpoint as its model, on ``refine.judge_engine``."""
    r = cfg.refine
    args = refiner_args(cfg)
    args.update(model=model, engine=r.judge_engine, openai_base_url=None,
                vllm_engine_kwargs=dict(r.vllm_engine_kwargs) if r.judge_engine == "vllm" else {},
                num_replicas=r.judge_replicas, autoscale=False, num_cpus=r.judge_cpus_per_replica,
                num_gpus=r.judge_gpus_per_replica)
    return args


def judge_app_name(cfg: MiddoConfig) -> str:
    return f"{cfg.refine.app_name}-judge"


def app_url(cfg: MiddoConfig, route_prefix: str | None = None) -> str:
    """Base HTTP URL of the refiner app, or of the app at ``route_prefix`` (a wildcard bind host is
    reached through loopback)."""
    r = cfg.refine
    host = "127.0.0.1" if r.http_host in ("0.0.0.0", "::", "") else r.http_host
    prefix = (r.route_prefix if route_prefix is None else route_prefix).rstrip("/")
    return f"http://{host}:{r.http_port}{prefix}"


def _wait_healthy(url: str, timeout_s: float) -> dict:
    """Polls ``GET {url}/healthz`` until it answers ok; raises RuntimeError after timeout_s."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{url}/healthz", timeout=10.0)
            if resp.status_code == 200 and resp.json().get("status") == "ok":
                return resp.json()
            last = f"HTTP {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"refiner app did not become healthy at {url}/healthz within {timeout_s:.0f}s ({last})")


def deploy(cfg: MiddoConfig, name: str, args: dict[str, Any], route_prefix: str,
           health_timeout_s: float = HEALTH_TIMEOUT_S):
    """Deploys (or redeploys) one application of the app code, waits until it answers over HTTP.

    Ray must already be initialised. Serve's HTTP proxy is started on ``refine.http_host:http_port``; if
    Serve already runs in this cluster with other HTTP options, Serve keeps its existing ones (and logs a
    warning). A non-loopback ``http_host`` needs the API key in the environment variable named by
    ``refine.api_key_env`` (checked before Serve starts).

    Returns:
        The DeploymentHandle of the app's ingress.

    Raises:
        RuntimeError: The app cannot be imported or does not become healthy in time.
        ValueError: The app's arguments are invalid (e.g. a public host without an API key).
    """
    from ray import serve as ray_serve

    r = cfg.refine
    app = _load_builder()(args)
    ray_serve.start(proxy_location=r.proxy_location, http_options={"host": r.http_host, "port": r.http_port})
    # serve.run returns once every replica's constructor (model load) has finished.
    handle = ray_serve.run(app, name=name, route_prefix=route_prefix)
    if r.proxy_location == "Disabled":        # no HTTP: the handle answers for the app
        url, info = "its handle (no HTTP proxy)", handle.info.remote().result(timeout_s=health_timeout_s)
    else:
        url = app_url(cfg, route_prefix)
        info = _wait_healthy(url, health_timeout_s)
    log.info("serve: '%s' healthy at %s (model %s)", name, url, info.get("model"))
    return handle


def start_refiner(cfg: MiddoConfig, health_timeout_s: float = HEALTH_TIMEOUT_S):
    """Deploys the refiner app (the teacher); returns its handle."""
    return deploy(cfg, cfg.refine.app_name, refiner_args(cfg), cfg.refine.route_prefix, health_timeout_s)


def start_judge(cfg: MiddoConfig, model: str, health_timeout_s: float = HEALTH_TIMEOUT_S):
    """Deploys (or redeploys) the judge app serving ``model``, the round's checkpoint M_t.

    The judge is a second application of the same Serve app code (its own name and route prefix,
    ``refine.judge_route_prefix``), so it has every route and limit of the refiner. Running it again with
    another checkpoint replaces its replicas: the judge follows the model being trained while the
    refiner app keeps the configured teacher.
    """
    return deploy(cfg, judge_app_name(cfg), judge_args(cfg, model), cfg.refine.judge_route_prefix, health_timeout_s)


def stop_apps(cfg: MiddoConfig) -> None:
    """Deletes the refiner and judge apps; shuts Serve down only when no other application is left.

    On a shared cluster other Serve apps may run next to ours, and they must survive our job.
    """
    from ray import serve as ray_serve

    try:
        running = ray_serve.status().applications
        for name in (cfg.refine.app_name, judge_app_name(cfg)):
            if name in running:
                ray_serve.delete(name)
        others = ray_serve.status().applications
    except Exception as exc:  # Serve already gone: nothing left to delete.
        log.info("serve: apps of '%s' not deleted: %s", cfg.refine.app_name, exc)
        return
    if not others:
        ray_serve.shutdown()


class ServeApps:
    """The refiner and judge apps of one run, each deployed on first use; a context manager that stops both."""

    def __init__(self, cfg: MiddoConfig):
        self.cfg = cfg
        self.teacher_up = False
        self.judge_model: str | None = None
        self.judge_deploys: list[str] = []   # the models the judge app was deployed with, in order

    def teacher(self) -> str:
        """The refiner app's name, deployed if it is not running yet."""
        if not self.teacher_up:
            log.info("refine: starting the refiner Serve app (%s)", self.cfg.refine.model or self.cfg.model.base)
            start_refiner(self.cfg)
            self.teacher_up = True
        return self.cfg.refine.app_name

    def judge(self, model: str) -> str:
        """The judge app's name, (re)deployed to serve ``model``."""
        if self.judge_model != model:
            log.info("refine: judge app now serves %s", model)
            start_judge(self.cfg, model)
            self.judge_model = model
            self.judge_deploys.append(model)
        return judge_app_name(self.cfg)

    @staticmethod
    def handle(name: str):
        """The deployment handle of a running app of ours, by name."""
        from ray import serve as ray_serve

        return ray_serve.get_app_handle(name)

    def release_judge(self) -> None:
        """Deletes the judge app (if one runs); the teacher app stays."""
        if self.judge_model is not None:
            from ray import serve as ray_serve

            ray_serve.delete(judge_app_name(self.cfg))
            self.judge_model = None

    def stop(self) -> None:
        if self.teacher_up or self.judge_model is not None:
            stop_apps(self.cfg)
            self.teacher_up, self.judge_model = False, None

    def __enter__(self) -> "ServeApps":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""The Serve applications of a run: the refiner (teacher) and the judge, started when needed, stopped after.

The Serve application itself lives in the top-level ``serve`` package, which this library must not import
(``serve`` depends on ``middo_ray``, never the reverse). It is therefore loaded by its import path string,
exactly as ``serve run serve.app:build_app`` would.

:class:`ServeApps` is what the loop holds: the refiner app keeps the configured teacher for the whole
run; the judge app (``refine.judge='current'``) serves the round's checkpoint and is redeployed when asked
for another one, so the judge follows the model being trained, and released after each refine stage (its
next model only exists after the next training, and its CPUs or GPUs are then free for training). The
refine stage's Ray Data workers reach both apps' model deployment by name (``serve.get_deployment_handle``,
past the app's HTTP gateway); the driver only deploys them.
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
# Serve's HTTP proxies run the middlewares this names in front of their own (serve/proxy.py: a client's
# x-request-id is bounded before the proxy echoes and logs it). Read when a proxy starts, from the Ray
# node's environment: a Ray that a run starts for itself gets it from init_ray; a cluster sets it on its nodes.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve.proxy:middlewares"}


def use_proxy_middleware() -> None:
    """Puts :data:`PROXY_ENV` into this process's environment (unless set), for a Ray it is about to start."""
    import os

    for key, value in PROXY_ENV.items():
        os.environ.setdefault(key, value)
HEALTH_TIMEOUT_S = 600.0
# Tries of one app's start-up (the app deleted and deployed again between them), waits of 10 s, 20 s, ...
DEPLOY_TRIES = 3
DEPLOY_BACKOFF_S = 10.0


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
    pass unchanged). With ``refine.gpu_handoff='sleep'`` the replica asks Ray for ``refine.sleep_gpu_share``
    of its GPU (it computes on the whole GPU while awake) and a vLLM engine is built able to sleep."""
    r = cfg.refine
    args = {"model": r.model or cfg.model.base, "dtype": cfg.model.dtype, "num_cpus": r.cpus_per_replica,
            "num_gpus": r.gpus_per_replica, **{k: getattr(r, k) for k in ServeSettings.model_fields}}
    if r.gpu_handoff == "sleep":
        args["num_gpus"] = r.sleep_gpu_share
        if r.engine == "vllm":
            args["vllm_engine_kwargs"] = {**r.vllm_engine_kwargs, "enable_sleep_mode": True}
    return args


def gpu_demand(cfg: MiddoConfig) -> dict[str, float]:
    """Logical GPUs the loop holds at once in its two GPU-hungry phases, under ``refine.gpu_handoff``.

    ``refine``: the teacher's replicas and the judge's (the judge app is deleted after each refine stage);
    ``train``: the training workers, plus the teacher's replicas where they stay through training ('keep'
    holds their GPUs, 'sleep' a share of one GPU each, 'release' nothing). Diagnosis and evaluation ask for one
    actor per GPU of the cluster; Ray Data starts the pool's actors as GPUs are free and works with those
    that started, so a kept teacher only leaves some of them waiting.
    """
    r, t = cfg.refine, cfg.train
    replicas = r.max_replicas if r.autoscale else r.num_replicas
    teacher = 0.0 if r.engine == "openai" else replicas * float(refiner_args(cfg)["num_gpus"])
    judge = r.judge_replicas * r.judge_gpus_per_replica if r.judge == "current" and r.accept != "none" else 0.0
    workers = t.num_workers * cfg.gpu_worker_share if t.use_gpu else 0.0
    kept = 0.0 if r.gpu_handoff == "release" else teacher
    return {"refine": teacher + judge, "train": workers + kept, "teacher": teacher, "judge": judge,
            "workers": workers}


def check_gpu_fit(cfg: MiddoConfig, cluster_gpus: float | None = None) -> dict[str, float]:
    """Refuses, before any work, a plan whose refine or train phase needs more GPUs than the cluster has
    (Ray would wait for them for ever); returns :func:`gpu_demand`. ``cluster_gpus``: the connected Ray
    cluster's when None. A cluster without GPUs is not checked."""
    if cluster_gpus is None:
        import ray

        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    need = gpu_demand(cfg)
    if cluster_gpus <= 0:
        return need
    r = cfg.refine
    problems = []
    if need["train"] > cluster_gpus + 1e-9:
        why = (f"{need['workers']:g} for the {cfg.train.num_workers} training worker(s)"
               + (f" + {need['teacher']:g} the teacher app keeps through training (refine.gpu_handoff={r.gpu_handoff})"
                  if r.gpu_handoff != "release" and need["teacher"] else ""))
        fix = ("set refine.gpu_handoff=release (the teacher's GPUs go to training and back) or lower "
               "train.num_workers" if r.gpu_handoff != "release" else "lower train.num_workers")
        problems.append(f"training needs {need['train']:g} GPUs ({why}) but the cluster has {cluster_gpus:g}; {fix}")
    if need["refine"] > cluster_gpus + 1e-9:
        problems.append(f"the refine stage needs {need['refine']:g} GPUs at once (teacher {need['teacher']:g} + "
                        f"judge {need['judge']:g}) but the cluster has {cluster_gpus:g}; lower refine.num_replicas, "
                        f"refine.gpus_per_replica or refine.judge_gpus_per_replica")
    if problems:
        raise ValueError("GPU plan does not fit this cluster: " + "; ".join(problems)
                         + " (a cluster that adds GPU nodes on demand: start it with them, or use gpu_handoff=release)")
    return need


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

    A start-up that fails (Serve gave the app up after its own constructor retries, or it did not answer in
    ``health_timeout_s``) is tried again, ``DEPLOY_TRIES`` times in all, the failed app deleted in between.

    Raises:
        RuntimeError: The app cannot be imported, or did not start and become healthy in ``DEPLOY_TRIES`` tries.
        ValueError: The app's arguments are invalid (e.g. a public host without an API key).
    """
    from ray import serve as ray_serve

    r = cfg.refine
    app = _load_builder()(args)               # bad arguments fail here, once (ValueError)
    for attempt in range(1, DEPLOY_TRIES + 1):
        try:
            ray_serve.start(proxy_location=r.proxy_location, http_options={"host": r.http_host, "port": r.http_port})
            # serve.run returns once every replica's constructor (model load) has finished; Serve itself
            # retries a constructor that fails (max_constructor_retry_count), then gives the app up.
            handle = ray_serve.run(app, name=name, route_prefix=route_prefix)
            if r.proxy_location == "Disabled":        # no HTTP: the handle answers for the app
                url, info = "its handle (no HTTP proxy)", handle.info.remote().result(timeout_s=health_timeout_s)
            else:
                url = app_url(cfg, route_prefix)
                info = _wait_healthy(url, health_timeout_s)
            break
        except (ImportError, ValueError):
            raise
        except Exception as exc:  # noqa: BLE001 - a replica that could not start (memory, a node lost): again
            if attempt == DEPLOY_TRIES:
                raise RuntimeError(f"serve: '{name}' did not start after {DEPLOY_TRIES} tries: {type(exc).__name__}: "
                                   f"{str(exc)[:500]}. See the replica's log in Ray's session logs; check that "
                                   "the model loads and the nodes have the memory for it") from exc
            wait = DEPLOY_BACKOFF_S * attempt
            log.warning("serve: '%s' did not start (%s: %s); deleting it and trying again in %.0fs (%d of %d)",
                        name, type(exc).__name__, str(exc)[:200], wait, attempt + 1, DEPLOY_TRIES)
            try:
                ray_serve.delete(name)
            except Exception:  # noqa: BLE001 - nothing to delete
                pass
            time.sleep(wait)
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
    """The refiner and judge apps of one run, each deployed on first use; a context manager that stops both.

    ``refine.gpu_handoff`` decides what the teacher app does while Ray Train trains (:meth:`hand_off`, called
    by the loop before each training): 'keep' leaves it up, 'release' deletes it (the next :meth:`teacher`
    deploys it again), 'sleep' sends its engine to sleep (the next :meth:`teacher` wakes it). What each
    hand-off cost is kept in :attr:`events` until the loop takes it into the round's manifest.
    """

    def __init__(self, cfg: MiddoConfig):
        self.cfg = cfg
        self.teacher_up = False
        self.teacher_asleep = False
        self.teacher_deploys = 0
        self.judge_model: str | None = None
        self.judge_deploys: list[str] = []   # the models the judge app was deployed with, in order
        self.events: list[dict[str, Any]] = []
        self.serve_started = False           # Serve (and its proxy) started by this run, apps up or not

    def _event(self, action: str, app: str, t0: float, where: bool = False) -> None:
        event = {"action": action, "app": app, "seconds": round(time.monotonic() - t0, 3)}
        if where:   # where the app's replica landed: its node and the GPUs Ray gave it
            event["placement"] = self.handle(app).info.remote().result(timeout_s=60).get("placement")
        self.events.append(event)

    def take_events(self) -> list[dict[str, Any]]:
        """The deploys, releases, sleeps and wakes since the last call (for the round's manifest)."""
        out, self.events = self.events, []
        return out

    def teacher(self) -> str:
        """The refiner app's name: deployed if it is not running (again, after a release), woken if asleep."""
        name = self.cfg.refine.app_name
        t0 = time.monotonic()
        if self.teacher_asleep:
            log.info("refine: waking the refiner app")
            self.handle(name).wake.remote().result(timeout_s=HEALTH_TIMEOUT_S)
            self.teacher_asleep = False
            self._event("wake", name, t0)
        elif not self.teacher_up:
            log.info("refine: starting the refiner Serve app (%s)", self.cfg.refine.model or self.cfg.model.base)
            start_refiner(self.cfg)
            self.teacher_up = self.serve_started = True
            self._event("redeploy" if self.teacher_deploys else "deploy", name, t0, where=True)
            self.teacher_deploys += 1
        return name

    def hand_off(self) -> None:
        """Before training: frees the GPUs of the apps per ``refine.gpu_handoff`` (the judge is already gone)."""
        mode, name = self.cfg.refine.gpu_handoff, self.cfg.refine.app_name
        self.release_judge()
        if mode == "keep" or not self.teacher_up or self.teacher_asleep:
            return
        from ray import serve as ray_serve

        t0 = time.monotonic()
        if mode == "release":
            log.info("train: deleting the refiner app so training gets its GPUs (refine.gpu_handoff=release)")
            ray_serve.delete(name)
            self.teacher_up = False
            self._event("release", name, t0)
        else:
            log.info("train: the refiner app sleeps through training (refine.gpu_handoff=sleep, level %d)",
                     self.cfg.refine.sleep_level)
            self.handle(name).sleep.remote(self.cfg.refine.sleep_level).result(timeout_s=HEALTH_TIMEOUT_S)
            self.teacher_asleep = True
            self._event("sleep", name, t0)

    def judge(self, model: str) -> str:
        """The judge app's name, (re)deployed to serve ``model``."""
        if self.judge_model != model:
            log.info("refine: judge app now serves %s", model)
            t0 = time.monotonic()
            start_judge(self.cfg, model)
            self.judge_model, self.serve_started = model, True
            self.judge_deploys.append(model)
            self._event("deploy", judge_app_name(self.cfg), t0, where=True)
        return judge_app_name(self.cfg)

    @staticmethod
    def handle(name: str):
        """The handle of a running app's model deployment (past its HTTP gateway), by app name."""
        from ray import serve as ray_serve

        from middo_ray.wire import REFINER_DEPLOYMENT

        return ray_serve.get_deployment_handle(REFINER_DEPLOYMENT, name)

    def release_judge(self) -> None:
        """Deletes the judge app (if one runs); the teacher app stays."""
        if self.judge_model is not None:
            from ray import serve as ray_serve

            t0 = time.monotonic()
            ray_serve.delete(judge_app_name(self.cfg))
            self.judge_model = None
            self._event("release", judge_app_name(self.cfg), t0)

    def stop(self) -> None:
        """Deletes our apps and, when no other app is left, Serve itself (also after a release left none up:
        Serve and its HTTP proxy were still started by this run)."""
        if self.teacher_up or self.judge_model is not None or self.serve_started:
            stop_apps(self.cfg)
            self.teacher_up, self.teacher_asleep, self.judge_model, self.serve_started = False, False, None, False

    def __enter__(self) -> "ServeApps":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

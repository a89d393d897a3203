"""The Kubernetes manifests in k8s/: valid against the KubeRay CRD schemas, and true to the project's config.

The schema half reads KubeRay's CRDs from ``../shared/k8s`` (next to the repository) and validates every
RayJob and RayCluster document of ``k8s/*.yaml`` with ``jsonschema``, plus the structural rules that the API
server applies and JSON Schema does not (unknown fields, unique list-map keys, int32 ranges). The other half
checks what no schema knows: that the job runs this project's entry point with a config that exists and
validates, that the run directory is on the shared volume every pod mounts at the same path, that the head
has no GPU and the workers have enough for the config, and that a failed job is retried and cleaned up.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
CRD_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "k8s"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KNOWN_KINDS = {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCluster"), ("v1", "PersistentVolumeClaim"), ("v1", "Pod")}
GPU = "nvidia.com/gpu"
INT32 = (-(2**31), 2**31 - 1)

# The 1.4 MB CRDs take seconds with the pure-Python loader; libyaml's is several times faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------------------------------------
# Reading the manifests and the schemas.

def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, dict]]:
    found = _documents()
    assert found, f"no manifests in {K8S_DIR}"
    return found


def _one(docs, kind: str) -> dict:
    matches = [d for _, d in docs if d.get("kind") == kind]
    assert len(matches) == 1, f"expected one {kind} in k8s/, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def rayjob(docs) -> dict:
    return _one(docs, "RayJob")


@pytest.fixture(scope="module")
def raycluster(docs) -> dict:
    return _one(docs, "RayCluster")


@pytest.fixture(scope="module")
def pvc(docs) -> dict:
    return _one(docs, "PersistentVolumeClaim")


@pytest.fixture(scope="module")
def schemas() -> dict[tuple[str, str], dict]:
    """(kind, version) -> the openAPIV3Schema of that CRD version, read once for the module."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found: {CRD_DIR} is missing (it holds ray.io_rayjobs.yaml and "
                    "ray.io_rayclusters.yaml from KubeRay's ray-operator/config/crd/bases)")
    out = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=_Loader)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io", name
        for version in crd["spec"]["versions"]:
            out[(kind, version["name"])] = version["schema"]["openAPIV3Schema"]
    return out


def _schema_for(schemas: dict, doc: dict) -> dict:
    group, _, version = doc["apiVersion"].rpartition("/")
    assert group == "ray.io", doc["apiVersion"]
    key = (doc["kind"], version)
    assert key in schemas, f"the CRD of {doc['kind']} has no version {version!r} (has {sorted(schemas)})"
    return schemas[key]


# ---------------------------------------------------------------------------------------------
# Validation: JSON Schema, plus the API server's structural rules.

def _structural_problems(value, schema: dict, path: str = "") -> list[str]:
    """What the API server rejects and JSON Schema lets through.

    - a field the schema does not declare (kubectl's default strict field validation refuses it; without it the
      server drops it silently: a typo such as ``shutdownAfterJobFinish`` would be lost either way);
    - two items of an ``x-kubernetes-list-type: map`` list with the same keys (two ports 8265, two env vars of
      one name), or equal items of a ``set`` list;
    - an integer outside the range of its ``format: int32`` field.
    """
    problems: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, item in value.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                problems += _structural_problems(item, props[key], where)
            elif isinstance(extra, dict):
                problems += _structural_problems(item, extra, where)
            elif props is not None and extra is not True and not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{where}: unknown field")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        kind = schema.get("x-kubernetes-list-type")
        if kind == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in keys}
            seen = [tuple(v.get(k, defaults[k]) for k in keys) for v in value if isinstance(v, dict)]
            problems += [f"{path}: duplicate {dict(zip(keys, t))}" for i, t in enumerate(seen) if t in seen[:i]]
        elif kind == "set":
            problems += [f"{path}: duplicate {v!r}" for i, v in enumerate(value) if v in value[:i]]
        for i, item in enumerate(value):
            problems += _structural_problems(item, items, f"{path}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and schema.get("format") == "int32":
        if not INT32[0] <= value <= INT32[1]:
            problems.append(f"{path}: {value} is outside int32")
    return problems


def _problems(doc: dict, schema: dict) -> list[str]:
    """Every problem of ``doc`` under ``schema``: JSON Schema errors (Draft 7) and the structural ones."""
    from jsonschema import Draft7Validator

    errors = sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    found = [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in errors]
    return found + _structural_problems(doc, schema)


def test_every_document_is_a_known_kind(docs):
    """A manifest of another kind (or a typo in apiVersion) would escape every check below."""
    for name, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, (name, doc.get("apiVersion"), doc.get("kind"))
        assert doc.get("metadata", {}).get("name"), f"{name}: {doc['kind']} without metadata.name"


def test_ray_manifests_match_the_kuberay_crds(docs, schemas):
    """Every RayJob and RayCluster in k8s/ validates against its CRD version's schema, unknown fields included."""
    checked = 0
    for name, doc in docs:
        if doc["kind"] in CRD_FILES:
            assert _problems(doc, _schema_for(schemas, doc)) == [], f"{name} ({doc['kind']})"
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("breakage, expect", [
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", "yes"), "is not of type 'boolean'"),
    (lambda d: d["spec"].__setitem__("backoffLimit", "2"), "is not of type 'integer'"),
    # The classic one: an unquoted number in rayStartParams (a map of strings).
    (lambda d: _head(d)["rayStartParams"].__setitem__("num-gpus", 0), "is not of type 'string'"),
    (lambda d: _workers(d)[0].pop("groupName"), "'groupName' is a required property"),
    (lambda d: _container(_workers(d)[0])["resources"]["limits"].__setitem__(GPU, "8 GPUs"), "does not match"),
    (lambda d: d["spec"]["rayClusterSpec"]["authOptions"].__setitem__("mode", "tokens"), "is not one of"),
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "unknown field"),
    (lambda d: _container(_head(d))["ports"].append({"containerPort": 8265, "name": "again"}), "duplicate"),
    (lambda d: d["spec"].__setitem__("activeDeadlineSeconds", 2**31), "outside int32"),
])
def test_a_broken_rayjob_is_rejected(rayjob, schemas, breakage, expect):
    """The validation can fail: each deliberate mistake is reported, with the message that names it."""
    broken = copy.deepcopy(rayjob)
    breakage(broken)
    problems = _problems(broken, _schema_for(schemas, broken))
    assert any(expect in p for p in problems), problems


def test_json_schema_alone_accepts_unknown_fields(rayjob, schemas):
    """Why the structural check exists: the CRD schema allows any extra key (it declares no
    additionalProperties), so a misspelt field passes JSON Schema and would be silently dropped."""
    from jsonschema import Draft7Validator

    broken = copy.deepcopy(rayjob)
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert Draft7Validator(_schema_for(schemas, broken)).is_valid(broken)


# ---------------------------------------------------------------------------------------------
# The project's own facts.

def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def _head(doc: dict) -> dict:
    return _cluster_spec(doc)["headGroupSpec"]


def _workers(doc: dict) -> list[dict]:
    return _cluster_spec(doc)["workerGroupSpecs"]


def _container(group: dict) -> dict:
    """The Ray container: KubeRay runs Ray in the pod template's first container."""
    return group["template"]["spec"]["containers"][0]


def _groups(doc: dict) -> list[tuple[str, dict]]:
    return [("head", _head(doc))] + [(g["groupName"], g) for g in _workers(doc)]


def _mounts(pod_spec: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _shared_mount(pod_spec: dict, container: dict) -> tuple[str, str]:
    """(claim name, mount path) of the one PersistentVolumeClaim the container mounts."""
    pvcs = [(v["persistentVolumeClaim"]["claimName"], path) for path, v in _mounts(pod_spec, container).items()
            if "persistentVolumeClaim" in v]
    assert len(pvcs) == 1, f"expected one PersistentVolumeClaim mount, found {pvcs}"
    return pvcs[0]


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    limits, requests = res.get("limits", {}), res.get("requests", {})
    if GPU in requests:
        assert str(requests[GPU]) == str(limits.get(GPU)), "GPU requests must equal the limits"
    return int(limits.get(GPU, 0))


def _entrypoint(rayjob: dict) -> tuple[list[str], str, list[str]]:
    """(the command, the --config path, the --set overrides) of the RayJob's entrypoint."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    config, overrides, rest = None, [], []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            config = next(it)
        elif arg in ("--set", "-s"):
            overrides.append(next(it))
        else:
            rest.append(arg)
    assert config is not None, f"the entrypoint names no --config: {argv}"
    return rest, config, overrides


@pytest.fixture(scope="module")
def job_config(rayjob, tmp_path_factory):
    """The config the RayJob's driver runs with: its --config file and --set overrides, validated by the
    project's own loader (a misspelt --set key fails here). The loader checks that the benchmark files exist in
    eval.data_dir, which is on the cluster's volume: only for this validation it points at a stand-in folder
    with empty files of the expected names; the returned dict keeps the manifest's eval.data_dir."""
    from middo_ray.config import EVAL_BENCHMARK_FILES, build_config

    _, config, overrides = _entrypoint(rayjob)
    path = REPO / config
    assert path.is_file(), f"the entrypoint's config {config} is not in the repository"
    tree = yaml.safe_load(path.read_text())
    stand_in = tmp_path_factory.mktemp("eval_data")
    for name in EVAL_BENCHMARK_FILES.values():
        (stand_in / name).touch()
    # A deep copy: build_config copies only the top level and applies --set into the nested sections.
    cfg = build_config(copy.deepcopy(tree), overrides + [f"eval.data_dir={stand_in}"])
    given = dict(o.split("=", 1) for o in overrides)
    eval_dir = given.get("eval.data_dir", (tree.get("eval") or {}).get("data_dir"))
    return {"cfg": cfg, "eval_dir": eval_dir, "overrides": given, "file": config}


def test_entrypoint_runs_the_job_script_with_a_config_of_the_repo(rayjob, job_config):
    """The job runs jobs/middo_job.py (which exists) with a config file of the repository that validates."""
    command, config, _ = _entrypoint(rayjob)
    assert command[0] in ("python", "python3") and command[1:] == ["jobs/middo_job.py"], command
    assert (REPO / command[1]).is_file()
    assert config.startswith("jobs/") and (REPO / config).is_file()


def test_run_id_is_fixed_so_a_retry_resumes(rayjob, job_config):
    """Without a run id the loop names the run after the clock, and a retried RayJob would start over."""
    assert job_config["cfg"].run.run_id, "set run.run_id (in the config or with --set) so a retry finds its run"
    assert job_config["cfg"].run.resume is True


def test_run_directory_data_and_caches_are_on_the_shared_volume(rayjob, pvc, job_config):
    """Every pod mounts the same ReadWriteMany claim at the same path, and the paths the driver and the workers
    share (run.output_dir, data.path, eval.data_dir, the model caches) are inside that mount."""
    mounts = {name: _shared_mount(g["template"]["spec"], _container(g)) for name, g in _groups(rayjob)}
    assert len(set(mounts.values())) == 1, f"head and workers mount different claims or paths: {mounts}"
    claim, mount = next(iter(mounts.values()))
    assert claim == pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    cfg = job_config["cfg"]
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]).get("env_vars", {})
    shared = {"run.output_dir": cfg.run.output_dir, "data.path": cfg.data.path, "eval.data_dir": job_config["eval_dir"],
              "HF_HOME": env.get("HF_HOME"), "MIDDO_CACHE": env.get("MIDDO_CACHE")}
    for key, value in shared.items():
        assert value and PurePosixPath(value).is_relative_to(mount), f"{key}={value!r} is not under {mount}"
    # The entrypoint says where the run directory is, not only the config file.
    assert job_config["overrides"].get("run.output_dir") == cfg.run.output_dir


def test_every_ray_pod_has_a_memory_backed_dev_shm(docs):
    """Ray's object store lives in /dev/shm; the container runtime's default is 64 MiB."""
    for name, doc in docs:
        if doc["kind"] not in CRD_FILES:
            continue
        for group, g in _groups(doc):
            shm = _mounts(g["template"]["spec"], _container(g)).get("/dev/shm")
            assert shm and shm.get("emptyDir", {}).get("medium") == "Memory", f"{name} {group}: no /dev/shm"


def test_head_has_no_gpu_and_takes_no_work(docs):
    """The head holds the driver and Ray's services: no GPU, and no logical CPUs for tasks or actors."""
    for name, doc in docs:
        if doc["kind"] not in CRD_FILES:
            continue
        head = _head(doc)
        assert _gpus(_container(head)) == 0, name
        assert head["rayStartParams"].get("num-gpus") == "0", name
        assert head["rayStartParams"].get("num-cpus") == "0", name


def test_workers_have_the_gpus_the_config_needs(rayjob, job_config):
    """The GPU workers hold at least the peak the config asks for at once: training next to the teacher's replicas
    (which stay up through the round), or the teacher next to the judge; with a fixed group size, since the loop
    sizes its actor pools from the GPUs present when a stage starts."""
    cfg = job_config["cfg"]
    total = 0
    for g in _workers(rayjob):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        assert g["minReplicas"] == g["maxReplicas"], f"{g['groupName']}: the loop expects a fixed number of GPUs"
        gpus = _gpus(_container(g))
        assert gpus > 0, f"worker group {g['groupName']} requests no GPU"
        total += gpus * g["minReplicas"] * g.get("numOfHosts", 1)
    r = cfg.refine
    teacher = (r.max_replicas if getattr(r, "autoscale", False) else r.num_replicas) * r.gpus_per_replica
    judge = r.judge_replicas * r.judge_gpus_per_replica if r.judge == "current" else 0
    training = cfg.train.num_workers if cfg.train.use_gpu else 0
    assert training > 0, "the cluster config trains on GPUs"
    assert total >= max(training + teacher, teacher + judge), (total, training, teacher, judge)
    assert not _cluster_spec(rayjob).get("enableInTreeAutoscaling", False)


def test_rayjob_is_retried_bounded_and_cleaned_up(rayjob):
    """A failed job is retried on a new cluster (which resumes), the whole job has a deadline, and the GPU pods
    are deleted once it is done."""
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", "backoffLimit does not apply to InteractiveMode"


def test_runtime_env_is_valid_for_ray(rayjob):
    """runtimeEnvYAML is a string to the CRD; Ray reads it as a mapping and wants every env var value a string
    (an unquoted 1 would fail the submission, not this schema)."""
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict)
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "pip", "uv", "config"}, set(env)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.get("env_vars", {}).items()), env
    assert env["env_vars"].get("HF_HUB_OFFLINE") in ("0", "1")
    if "working_dir" in env:
        assert PurePosixPath(env["working_dir"]).is_absolute(), "working_dir: the project's folder in the image"


def test_interactive_cluster_matches_the_job_and_exposes_its_ports(rayjob, raycluster):
    """The RayCluster has the RayJob's head and worker shape, the same volume, and the dashboard/job server and
    Serve ports on the head."""
    ports = {p["containerPort"] for p in _container(_head(raycluster)).get("ports", [])}
    assert {8265, 8000} <= ports, ports
    for a, b in zip(_groups(rayjob), _groups(raycluster), strict=True):
        assert a[0] == b[0]
        ca, cb = _container(a[1]), _container(b[1])
        assert ca["image"] == cb["image"] and ca["resources"] == cb["resources"], a[0]
        assert a[1]["rayStartParams"] == b[1]["rayStartParams"], a[0]
        assert (_shared_mount(a[1]["template"]["spec"], ca)
                == _shared_mount(b[1]["template"]["spec"], cb)), a[0]
    for key in ("replicas", "minReplicas", "maxReplicas"):
        assert [g[key] for g in _workers(rayjob)] == [g[key] for g in _workers(raycluster)], key


def test_pvc_and_helper_pod_are_complete(docs, pvc, rayjob):
    """The claim has what a PVC needs (access mode, size); the helper pod mounts it where the Ray pods do."""
    assert pvc["spec"]["accessModes"] and pvc["spec"]["resources"]["requests"]["storage"]
    claim_path = _shared_mount(_head(rayjob)["template"]["spec"], _container(_head(rayjob)))
    for name, doc in docs:
        if doc["kind"] == "Pod":
            assert _shared_mount(doc["spec"], doc["spec"]["containers"][0]) == claim_path, name

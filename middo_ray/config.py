"""One validated configuration object for a Middo run.

A YAML file plus dotted command-line overrides (``--set select.quality_m=1.0``) becomes a
:class:`MiddoConfig`. Every section is a pydantic model with ``extra="forbid"`` and a description on
every field, so a typo is an error, not a silently ignored key. All problems are collected and raised
together as one :class:`ConfigError` before any Ray work starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    run_id: str | None = Field(None, description="Name of the run directory; default: derived from the config hash and time.")
    output_dir: str = Field("runs", description="Parent directory of run directories (runs/<run_id>/...).")
    seed: int = Field(0, description="Seed for every random choice (held-out split, sampling, training).")
    resume: bool = Field(True, description="Skip stages whose success marker exists in the run directory.")


class DataConfig(_Section):
    path: str = Field("demo", description="Seed dataset: 'demo' (bundled demo set) or a .json/.jsonl/.parquet file.")
    format: Literal["auto", "alpaca", "messages", "parquet"] = Field(
        "auto", description="Input format; 'auto' detects it from the extension and the first row's keys.")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Fraction of seed rows kept out of the loop for held-out loss.")
    heldout_path: str | None = Field(None, description="Separate held-out file (same formats); overrides heldout_fraction.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many seed rows (after the held-out split).")
    cutoff_len: int = Field(512, ge=16, description="Max tokens of prompt+response; longer samples are truncated by the stated rule.")
    template: Literal["default", "chat"] = Field(
        "default", description="'default': the reference's 'Human: ...\\nAssistant:' template; 'chat': the tokenizer's chat template.")


class ModelConfig(_Section):
    base: str = Field("smollm2", description="Base model: 'smollm2' (embedded SmolLM2-135M-Instruct), 'tiny' (test model), or an HF path/dir.")
    pre: str | None = Field(None, description="'Pre' model for the complexity axis; default: the base model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; 'auto' = bfloat16 on GPU, float32 on CPU.")


class DiagnoseConfig(_Section):
    batch_tokens: int = Field(4096, ge=64, description="Token budget per forward batch (samples are length-sorted).")
    rows_per_block: int = Field(64, ge=1, description="Rows handed to a diagnosis actor per Ray Data batch.")
    num_actors: int | None = Field(None, ge=1, description="Diagnosis actors per model; default: one per GPU, or 1 on CPU.")
    cpus_per_actor: float = Field(0.5, gt=0, description="Logical CPUs reserved per actor (fractional avoids the 2-CPU deadlock).")
    knn_k: int = Field(2, ge=1, description="Neighbours for the diversity score (the reference's top_k=2).")
    judge: bool = Field(True, description="Compute the self-judge quality scores (6 judgements per sample).")


class SelectConfig(_Section):
    complexity_m: float = Field(1.0, description="Hard iff loss_pre > mu+m*sigma AND loss_cur > mu+m*sigma.")
    diversity_m: float = Field(1.0, description="Sparse iff avg kNN similarity < mu - m*sigma.")
    quality_m: float = Field(1.0, description="Low quality iff mean judge score < mu - m*sigma.")
    axes: list[Literal["complexity", "diversity", "quality"]] = Field(
        ["complexity", "diversity", "quality"], description="Axes to act on.")


class RefineConfig(_Section):
    engine: Literal["transformers"] = Field("transformers", description="Engine of the refiner LLM in the Serve app.")
    model: str | None = Field(None, description="Refiner/teacher model ('smollm2', 'tiny' or an HF path); default: model.base.")
    max_new_tokens: int = Field(160, ge=1, description="Token cap of each generated prompt or answer.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of rewrites (reference: 1.0).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (reference: 1.0).")
    max_retries: int = Field(1, ge=0, description="Extra attempts when an output fails validation; then the original is kept.")
    prefill_marker: bool = Field(True, description="Begin the teacher's rewrite with the marker (needed for small teachers; "
                                                   "false = the reference's free four-step answer).")
    batch_size: int = Field(8, ge=1, description="Samples per request to the Serve app.")
    max_concurrency: int = Field(4, ge=1, description="Requests in flight from the refine stage to the Serve app.")
    num_replicas: int = Field(1, ge=1, description="Replicas of the refiner deployment.")
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs reserved per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines).")
    app_name: str = Field("middo-refiner", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the Serve app.")
    http_host: str = Field("127.0.0.1", description="Serve HTTP host.")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port.")


class TrainConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU on clusters).")
    use_gpu: bool = Field(False, description="Train on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs per training worker.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (reference: 2e-5 for Llama-3.1-8B).")
    epochs: float = Field(1.0, gt=0, description="Epochs over the round's dataset (reference: 1).")
    batch_size: int = Field(8, ge=1, description="Samples per device micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Linear warm-up fraction of steps, then cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    from_previous: bool = Field(False, description="Continue from the last round's model instead of the base (reference: base).")


class EvalConfig(_Section):
    mc_path: str | None = Field("demo", description="Multiple-choice set {query, choices, gold} for accuracy: 'demo', a JSONL path, or null.")
    mc_limit: int | None = Field(200, ge=1, description="Use at most this many multiple-choice items.")
    metric: Literal["heldout_loss", "mc_accuracy"] = Field("heldout_loss", description="Metric the plateau rule watches.")


class ConvergeConfig(_Section):
    max_rounds: int = Field(2, ge=1, description="Stop after this many refinement rounds.")
    patience: int = Field(1, ge=1, description="Stop when the metric has not improved by min_delta for this many rounds.")
    min_delta: float = Field(0.0, ge=0, description="Smallest improvement of the metric that counts.")
    min_flagged_fraction: float = Field(0.0, ge=0, le=1, description="Stop when fewer than this fraction of samples is flagged.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray address; None joins a running cluster when one is set up, else starts local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs for a local Ray (declaring more than the cores avoids actor-pool stalls).")


class MiddoConfig(_Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run directory and reproducibility.")
    data: DataConfig = Field(default_factory=DataConfig, description="Seed data and templating.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base and pre models.")
    diagnose: DiagnoseConfig = Field(default_factory=DiagnoseConfig, description="Diagnosis stage.")
    select: SelectConfig = Field(default_factory=SelectConfig, description="Selection rules.")
    refine: RefineConfig = Field(default_factory=RefineConfig, description="Refiner LLM and Serve app.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning on Ray Train.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after each training.")
    converge: ConvergeConfig = Field(default_factory=ConvergeConfig, description="Stop rules.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "MiddoConfig":
        if "diversity" in self.select.axes and self.diagnose.knn_k != 2:
            # The synthesis prompt shows exactly two hint prompts, as the reference does.
            raise ValueError("diagnose.knn_k must be 2 while 'diversity' is in select.axes "
                             "(the synthesis prompt uses two neighbours as hints); set diagnose.knn_k=2")
        if "quality" in self.select.axes and not self.diagnose.judge:
            raise ValueError("select.axes contains 'quality' but diagnose.judge is false; "
                             "set diagnose.judge=true or remove 'quality' from select.axes")
        return self


class ConfigError(ValueError):
    """Every problem of a configuration, reported at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _parse_scalar(text: str) -> Any:
    """Parses an override value with YAML rules, so '1.0', 'true', 'null', '[a, b]' work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _known_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _apply_override(tree: dict, dotted: str, problems: list[str]) -> None:
    if "=" not in dotted:
        problems.append(f"override '{dotted}': expected KEY=VALUE, e.g. select.quality_m=1.0")
        return
    key, value = dotted.split("=", 1)
    parts = key.strip().split(".")
    model: type[BaseModel] | None = MiddoConfig
    node = tree
    for i, part in enumerate(parts):
        if model is not None and part not in model.model_fields:
            close = difflib.get_close_matches(part, _known_keys(model), n=1)
            hint = f"; did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else \
                f"; known keys here: {', '.join(_known_keys(model))}"
            problems.append(f"override '{key}': unknown key '{part}'{hint}")
            return
        if i == len(parts) - 1:
            node[part] = _parse_scalar(value)
            return
        annotation = model.model_fields[part].annotation if model is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        if model is None:
            problems.append(f"override '{key}': '{part}' is a value, not a section")
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            problems.append(f"override '{key}': '{part}' in the YAML is not a mapping")
            return
        node = child


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent: type[BaseModel] = MiddoConfig
        for part in err["loc"][:-1]:
            ann = parent.model_fields[str(part)].annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                parent = ann
        close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(parent), n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(_known_keys(parent))}"
        return f"{loc}: unknown key; {fix}"
    msg = err["msg"]
    return f"{loc}: {msg} (got {err.get('input')!r})" if kind != "value_error" else f"{loc}: {msg}"


def build_config(tree: dict | None = None, overrides: list[str] | None = None) -> MiddoConfig:
    """Validates a config tree plus dotted overrides, raising ConfigError with every problem."""
    tree = dict(tree or {})
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(tree, item, problems)
    try:
        cfg = MiddoConfig.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_describe(e) for e in exc.errors())
        cfg = None
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> MiddoConfig:
    """Loads a YAML file (or the defaults when path is None) and applies dotted overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file '{p}' does not exist; pass an existing YAML file to --config"])
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"config file '{p}' is not valid YAML: {exc}"]) from exc
        if not isinstance(tree, dict):
            raise ConfigError([f"config file '{p}' must hold a mapping of sections (run:, data:, ...)"])
    return build_config(tree, overrides)


def config_hash(cfg: MiddoConfig) -> str:
    """Short stable hash of the config (for run ids and cache keys)."""
    import hashlib

    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:10]

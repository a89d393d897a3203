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

from middo_ray.schema import AXES, Axis
from middo_ray.wire import ServeSettings


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
    rows_per_shard: int = Field(
        2048, ge=1, description="Rows per Parquet shard of the run's datasets: the unit of parallel work, of commit "
                                "and of resume in every stage (a killed stage redoes only its unfinished shards). "
                                "A multiple of diagnose.rows_per_block keeps diagnosis batches independent of it.")


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
    knn_method: Literal["auto", "exact", "faiss", "sharded"] = Field(
        "auto", description="kNN search: 'exact' (blocked, no N x N matrix, in one task), 'faiss' (approximate IVF "
                            "index, in one task), 'sharded' (exact, spread over tasks that each hold a group of "
                            "shards), 'auto' = exact up to knn_exact_max_n samples, FAISS above, sharded when one "
                            "task would not fit in knn_task_memory_gb (docs/knn.md).")
    knn_task_memory_gb: float | None = Field(
        None, gt=0, description="Memory one kNN task may take (GiB); default: 80% of the largest node's memory.")
    knn_exact_max_n: int = Field(50_000, ge=1, description="Largest N searched exactly when knn_method='auto'.")
    judge: bool = Field(True, description="Compute the self-judge quality scores (6 judgements per sample).")
    judge_mode: Literal["prob", "generate"] = Field(
        "prob", description="'prob': expected score from the model's distribution over the score tokens (one "
                            "forward pass); 'generate': the paper's generate (temperature judge_temperature) and "
                            "parse a 0-10 score, unparseable answers recorded as missing.")
    judge_temperature: float = Field(0.1, ge=0.0, description="Sampling temperature of judge_mode='generate' (paper: 0.1).")
    judge_max_new_tokens: int = Field(8, ge=1, description="Tokens generated per judgement in judge_mode='generate'.")
    ifd: bool = Field(True, description="Also compute IFD = loss(response | instruction) / loss(response | empty "
                                        "prompt) under the current model (Cherry LLM / Superfiltering).")


class SelectConfig(_Section):
    complexity_m: float = Field(1.0, description="Hard iff loss_pre > mu+m*sigma AND loss_cur > mu+m*sigma.")
    diversity_m: float = Field(1.0, description="Sparse iff avg kNN similarity < mu - m*sigma.")
    quality_m: float = Field(1.0, description="Low quality iff mean judge score < mu - m*sigma.")
    axes: list[Axis] = Field(list(AXES), description="Axes to act on.")
    mode: Literal["sigma", "budget"] = Field(
        "sigma", description="'sigma': the spec's mean +/- m*sigma rules; 'budget': flag at most budget_fraction "
                             "of the samples per axis, worst first (still only those beyond the sigma rule "
                             "when budget_within_sigma is true).")
    budget_fraction: float = Field(0.1, gt=0.0, le=1.0, description="Largest fraction flagged per axis in mode='budget'.")
    budget_within_sigma: bool = Field(False, description="In mode='budget', flag only samples the sigma rule also flags.")
    quality_use_ifd: bool = Field(False, description="Quality axis also flags samples whose IFD > ifd_max "
                                                     "(response barely helped by its instruction).")
    ifd_max: float = Field(1.0, gt=0.0, description="IFD above this marks a response its instruction does not explain.")
    # Other ways to choose the samples, for baselines and benchmarks (benchmarks/efficacy.py): the same stage,
    # the same refine/merge/train after it, only the choice differs.
    method: Literal["rules", "random", "rank", "ids"] = Field(
        "rules", description="'rules': Middo's per-axis rules above (mode, m, axes); 'random': `count` samples drawn "
                             "uniformly (seeded by run.seed and the round); 'rank': the `count` worst samples by "
                             "one signal (rank_by); 'ids': the sample ids listed in ids_path. The last three flag "
                             "their choice on the single axis flag_as (so every chosen sample gets that axis' "
                             "refine operation) and ignore mode, m and axes.")
    count: int | None = Field(None, ge=0, description="method random/rank: samples to choose; default: "
                                                      "floor(budget_fraction x N).")
    rank_by: Literal["complexity", "diversity", "quality", "ifd"] = Field(
        "quality", description="method 'rank': the signal ranked, worst first: an axis' severity as mode 'budget' "
                               "ranks it (complexity: the smaller z-score of the two losses; diversity: low kNN "
                               "similarity; quality: low judge score), or 'ifd' (highest IFD).")
    ids_path: str | None = Field(None, description="method 'ids': a file of sample ids, a JSON list or one per line "
                                                   "(ids not in the round's dataset are counted and skipped).")
    flag_as: Axis = Field("quality", description="method random/rank/ids: the axis whose flag the chosen samples "
                                                 "get: quality -> improve (rewrite + re-answer, replaces), "
                                                 "complexity -> simplify (replaces), diversity -> synthesize (adds).")

    @model_validator(mode="after")
    def _method_checks(self) -> "SelectConfig":
        if self.method == "ids" and not self.ids_path:
            raise ValueError("select.method='ids' needs select.ids_path (a JSON list or one sample id per line)")
        if self.method != "ids" and self.ids_path:
            raise ValueError(f"select.ids_path is only read with select.method='ids' (now '{self.method}'); remove "
                             "it or set the method")
        return self


class RefineConfig(ServeSettings, _Section):
    """The refine stage, its teacher and judge. The Serve app's engine, scaling, limits and security fields
    come from :class:`middo_ray.wire.ServeSettings`, shared with the app's own arguments."""

    # The teacher.
    model: str | None = Field(None, description="Refiner/teacher model ('smollm2', 'tiny', an HF path, or the endpoint's "
                                                "model name for engine 'openai'); default: model.base.")
    # Sampling and validation of rewrites.
    max_new_tokens: int = Field(160, ge=1, description="Token cap of each generated prompt or answer.")
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature of rewrites (reference: 1.0).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling (reference: 1.0).")
    max_retries: int = Field(1, ge=0, description="Extra attempts when an output fails validation; then the original is kept.")
    prefill_marker: bool = Field(True, description="Begin the teacher's rewrite with the marker (needed for small teachers; "
                                                   "false = the reference's free four-step answer).")
    # Acceptance: every valid rewrite is re-judged before it replaces anything.
    accept: Literal["none", "not_worse", "min_score"] = Field(
        "not_worse", description="Re-judge rule: 'not_worse' keeps a rewrite whose judged quality is at least the "
                                 "original's minus accept_tolerance; 'min_score' keeps one scoring at least "
                                 "accept_min_score; 'none' keeps every valid rewrite unjudged.")
    accept_min_score: float = Field(5.0, ge=0.0, le=10.0, description="accept='min_score': lowest judged quality (0-10) kept.")
    accept_tolerance: float = Field(0.0, ge=0.0, le=10.0, description="accept='not_worse': how much lower than the "
                                                                        "original a rewrite may score.")
    accept_meta_check: bool = Field(
        True, description="Also reject a rewrite whose new prompt or answer talks about the rewriting or refuses "
                          "(e.g. 'This is the final rewritten prompt ...', 'as an AI, I don't have the ability "
                          "...'): fluent text that a small judge can score above a defective original "
                          "(middo_ray.refine.gate; docs/audit.md, the loop's efficacy benchmark).")
    accept_min_topic_overlap: float = Field(
        0.0, ge=0.0, le=1.0, description="Also reject a rewrite of an operation in accept_topic_operations whose "
                                         "new prompt keeps less than this share of the original prompt's content "
                                         "words (a rewrite that left the original's topic); 0 = off.")
    accept_min_answer_relevance: float = Field(
        0.0, ge=0.0, le=1.0, description="Also reject a rewrite whose answer mentions less than this share of its "
                                         "new prompt's content words (e.g. another sample's answer); 0 = off. "
                                         "Crude: any value above 0 also rejects the 14% of Alpaca answers that "
                                         "share no content word with their prompt.")
    accept_max_ifd: float | None = Field(
        None, gt=0.0, description="Also reject a rewrite whose IFD under the judge (its answer's loss after its "
                                  "prompt over the answer's loss alone, as the diagnosis computes it) exceeds this: "
                                  "above 1 the prompt makes the answer no easier to predict, e.g. another sample's "
                                  "answer under a kept prompt, which the judge's scores and the text checks let "
                                  "through. null = off; 1.0 is the IFD paper's cut. Needs a judge engine with "
                                  "logits (transformers or vllm, not openai). Measured in docs/audit.md.")
    accept_topic_operations: list[Literal["simplify", "improve"]] = Field(
        ["improve"], description="Operations checked by accept_min_topic_overlap: 'improve' must keep the task; "
                                 "'simplify' may change the scenario (reference §2), so it is not checked by default.")
    judge_mode: Literal["auto", "prob", "generate"] = Field(
        "auto", description="Re-judge mode: 'prob' (expected score from token probabilities), 'generate' (parse a "
                            "generated number), 'auto' = prob when the engine gives probabilities, else generate.")
    judge: Literal["current", "teacher"] = Field(
        "current", description="Who re-judges rewrites: 'current' = the model being trained (the round's checkpoint "
                               "M_t, served by a second Serve app for each round's refine stage; the same judge "
                               "as the diagnosis, as in Middo), 'teacher' = the refiner's own model.")
    judge_engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="judge='current': engine of the judge app (both give the probability judge; "
                                    "'vllm' uses refine.vllm_engine_kwargs too).")
    judge_replicas: int = Field(1, ge=1, description="judge='current': replicas of the judge app.")
    judge_cpus_per_replica: float = Field(1.0, gt=0, description="judge='current': logical CPUs per judge replica.")
    judge_gpus_per_replica: float = Field(0.0, ge=0, description="judge='current': GPUs per judge replica.")
    judge_route_prefix: str = Field("/judge", description="judge='current': HTTP route prefix of the judge app "
                                                          "(its routes are the refiner's, e.g. /judge/v1/judge).")
    # Calls from the refine stage.
    batch_size: int = Field(8, ge=1, description="Samples per request to the Serve app.")
    max_concurrency: int = Field(4, ge=1, description="Requests in flight from the refine stage to the Serve app.")
    request_timeout_s: float = Field(900.0, gt=0, description="A request that has not answered this many seconds after "
                                                              "it was sent fails its items (originals kept, reason recorded).")
    client_workers: int = Field(1, ge=1, description="Ray Data workers that send the refine stage's requests, a "
                                                     "shard at a time each; refine.max_concurrency is shared by them.")
    max_consecutive_failures: int = Field(
        3, ge=1, description="Requests in a row that the teacher (or judge) could not answer at all (its endpoint "
                             "down or refusing, after the engine's own retries: refine.openai_retries) before the "
                             "stage stops with the endpoint's error. Until then such a request's items keep their "
                             "originals with the reason; answers already received are cached, so the rerun "
                             "continues from them.")
    cache: bool = Field(True, description="Cache LLM calls by content (request, model, revision, sampling) in the run "
                                          "directory, so a rerun or resumed run repeats none.")
    # GPUs between phases.
    gpu_handoff: Literal["keep", "release", "sleep"] = Field(
        "keep", description="What the teacher app does with its GPUs while Ray Train trains: 'keep' holds them "
                            "(training needs GPUs beside the teacher's), 'release' deletes the teacher and judge apps "
                            "before training and deploys them again at the next refine (training gets every GPU; "
                            "the reload seconds go into the round's manifest), 'sleep' puts the teacher's engine to sleep "
                            "(vLLM: refine.sleep_level; transformers: weights to CPU memory) through training and "
                            "wakes it at the next refine; its one replica then holds only refine.sleep_gpu_share "
                            "of its GPU, so a training worker lands on that GPU (docs/gpu-handoff.md).")
    sleep_level: Literal[1, 2] = Field(
        1, description="gpu_handoff='sleep': vLLM sleep level (1: weights to CPU memory, KV cache dropped; 2: both "
                       "dropped, weights reloaded from disk on wake).")
    sleep_gpu_share: float = Field(
        0.01, gt=0, lt=0.5, description="gpu_handoff='sleep': the logical GPU share a sleeping teacher replica holds "
                                        "(what Ray accounts); every GPU worker of the loop asks for the rest of a "
                                        "GPU, so exactly one lands beside the teacher replica.")
    # The Serve deployment.
    cpus_per_replica: float = Field(1.0, gt=0, description="Logical CPUs reserved per replica.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines).")
    # The Serve application.
    app_name: str = Field("middo-refiner", description="Ray Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the Serve app.")
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode", description="Where Serve runs its HTTP proxies: on every node (Serve's default), on the head "
                                 "only (several nodes on one machine, where proxies would share a port), or none.")

    @model_validator(mode="after")
    def _refine_checks(self) -> "RefineConfig":
        problems = []
        if self.engine == "openai" and not self.openai_base_url:
            problems.append("engine 'openai' needs refine.openai_base_url (e.g. https://host/v1)")
        if self.engine == "openai" and self.judge == "teacher" and self.judge_mode == "prob":
            problems.append("engine 'openai' gives no token probabilities to the judge; set refine.judge_mode "
                            "to 'generate' or 'auto', or refine.judge='current'")
        if self.accept_max_ifd is not None:
            judge_engine = self.judge_engine if self.judge == "current" else self.engine
            if self.accept == "none":
                problems.append("refine.accept_max_ifd is checked by the re-judge, which refine.accept='none' turns "
                                "off; set refine.accept to 'not_worse' or 'min_score', or accept_max_ifd to null")
            elif judge_engine == "openai":
                problems.append("refine.accept_max_ifd needs the judge's token losses, which engine 'openai' does "
                                "not give; set refine.judge='current' (the model being trained judges), or "
                                "accept_max_ifd to null")
        if self.vllm_engine_kwargs and "vllm" not in (self.engine, self.judge_engine):
            problems.append("refine.vllm_engine_kwargs is only used with refine.engine='vllm' or "
                            "refine.judge_engine='vllm'; remove it or set the engine")
        if self.judge == "current" and self.judge_route_prefix == self.route_prefix:
            problems.append(f"refine.judge_route_prefix and refine.route_prefix are both '{self.route_prefix}'; "
                            f"the judge app needs its own prefix (e.g. /judge)")
        if self.max_new_tokens > self.max_new_tokens_limit:
            problems.append(f"refine.max_new_tokens={self.max_new_tokens} exceeds refine.max_new_tokens_limit="
                            f"{self.max_new_tokens_limit}; raise the limit or lower max_new_tokens")
        tries = 1 + (self.max_retries if self.temperature > 0 else 0)
        per_request = self.batch_size * self.max_new_tokens * 2 * tries
        if per_request > self.max_request_tokens:
            problems.append(f"one refine request may generate refine.batch_size x max_new_tokens x 2 steps x "
                            f"{tries} attempts = {per_request} tokens, over refine.max_request_tokens="
                            f"{self.max_request_tokens}; lower batch_size, max_new_tokens or max_retries, or raise "
                            f"max_request_tokens")
        if self.gpu_handoff == "sleep" and self.engine == "openai":
            problems.append("refine.gpu_handoff=sleep: engine 'openai' runs outside this cluster and holds none of "
                            "its GPUs; use gpu_handoff=keep")
        if self.gpu_handoff == "sleep" and self.gpus_per_replica > 1:
            problems.append("refine.gpu_handoff=sleep shares each teacher replica's GPU with one training worker "
                            "and needs refine.gpus_per_replica <= 1 (tensor parallelism over several GPUs leaves "
                            "memory on each after sleep); use gpu_handoff=release")
        if self.gpu_handoff == "sleep" and (self.autoscale or self.num_replicas != 1):
            problems.append("refine.gpu_handoff=sleep needs one teacher replica (refine.num_replicas=1, no "
                            "autoscale): Ray packs several replicas' GPU shares onto one GPU; use "
                            "gpu_handoff=release for more replicas")
        if self.autoscale and self.min_replicas > self.max_replicas:
            problems.append("refine.min_replicas must not exceed refine.max_replicas")
        if problems:
            raise ValueError("; ".join(problems))
        return self


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
    method: Literal["full", "lora"] = Field(
        "full", description="'full': every weight is trained (reference); 'lora': low-rank adapters (peft) on a frozen model.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' (every linear layer but the output head: "
                                  "attention and MLP projections), a list of module names such as [q_proj, v_proj], "
                                  "or a regex on module paths.")
    lora_save: Literal["merged", "adapter"] = Field(
        "merged", description="LoRA result: 'merged' into the weights (a plain checkpoint that transformers and vLLM "
                              "load) or 'adapter' (adapter_config.json + weights; the loop loads base + adapter).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="'ddp': a model replica per worker; 'fsdp': parameters, gradients and optimizer state "
                           "sharded over the workers (torch FSDP2), for models that do not fit one device.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute precision (master weights stay fp32): 'auto' = bf16 on GPUs that support it, "
                            "fp32 otherwise; 'bf16' also works on CPUs (autocast).")
    storage_path: str | None = Field(
        None, description="Ray Train run storage for checkpoints: None = the round's train directory; a local path "
                          "(shared by all nodes on a cluster) or a URI such as s3://bucket/prefix.")
    checkpoint_every_steps: int = Field(
        100, ge=0, description="Write a resumable checkpoint (model, optimizer, scheduler, step, RNG, data position) "
                               "every this many optimizer steps; 0 = only the final model.")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="torch.distributed backend of the workers: 'auto' = NCCL when they hold GPUs, gloo "
                            "otherwise (Ray Train's rule); 'gloo' on GPU workers for debugging, or where the nodes "
                            "declare GPUs that torch cannot use (a simulated cluster).")
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts after a worker dies (a node lost, a worker killed for memory), each "
                              "from the last checkpoint (train.checkpoint_every_steps); -1 = unlimited, 0 = the "
                              "stage fails at once (a rerun still resumes from the checkpoints).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (the schedule is planned for them); None = the "
                                "steps of train.epochs. For smoke runs and benchmarks.")

    @model_validator(mode="after")
    def _combinations(self) -> "TrainConfig":
        problems = []
        if self.lora_save == "adapter" and self.method != "lora":
            problems.append("train.lora_save=adapter needs train.method=lora (full fine-tuning always saves a "
                            "full checkpoint); set train.method=lora or train.lora_save=merged")
        if self.method == "lora" and self.lora_save == "adapter" and self.from_previous:
            problems.append("train.lora_save=adapter with train.from_previous=true would stack an adapter on a "
                            "merged model that exists nowhere on disk; set train.lora_save=merged")
        if self.strategy == "fsdp" and self.num_workers < 2:
            problems.append("train.strategy=fsdp shards the model over workers and needs train.num_workers >= 2; "
                            "raise train.num_workers or use train.strategy=ddp")
        if isinstance(self.lora_target_modules, list) and not self.lora_target_modules:
            problems.append("train.lora_target_modules is an empty list; name modules (e.g. [q_proj, v_proj]) "
                            "or use 'all-linear'")
        if self.storage_path is not None and not self.storage_path.strip():
            problems.append("train.storage_path is empty; use null for the run directory, a path, or a URI")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# Benchmarks the evaluation harness knows (middo_ray.evalsuite implements one loader and scorer each),
# with the file each reads by default inside eval.data_dir (the layout of ../shared/data/eval).
EVAL_BENCHMARK_FILES: dict[str, str] = {
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500_test.jsonl",
    "math": "math_test.jsonl",
    "arc_challenge": "arc_challenge_test.jsonl",
    "arc_easy": "arc_easy_test.jsonl",
    "mmlu": "mmlu.zip",
    "humaneval": "HumanEval.jsonl.gz",
    "mbpp": "mbpp.jsonl",
}
# Few-shot examples from a train split, where the data has one beside the test file.
EVAL_SHOT_FILES: dict[str, str] = {"gsm8k": "gsm8k_train.jsonl"}
EVAL_METRICS = ("heldout_loss", "mc_accuracy", "average")


def default_eval_data_dir() -> Path:
    """``../shared/data/eval`` beside the project (where the public benchmark files live)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"


class EvalSuiteConfig(_Section):
    enabled: bool = Field(False, description="Score this benchmark after each training; naming the suite under "
                                             "eval.suites (or any of its keys) turns it on.")
    limit: int | None = Field(100, ge=1, description="Items scored: a deterministic subset drawn with eval.seed "
                                                     "(null = every item).")
    few_shot: int | None = Field(None, ge=0, description="Solved examples shown as earlier turns; default per "
                                                         "benchmark: gsm8k 4, math/math500 4, mbpp 3, others 0.")
    max_new_tokens: int | None = Field(None, ge=1, description="Generation cap (generated benchmarks); default: "
                                                               "gsm8k 256, math/math500 384, humaneval/mbpp 384.")
    path: str | None = Field(None, description="Benchmark file; default: its conventional file in eval.data_dir.")
    shots_path: str | None = Field(None, description="File of few-shot examples; default: the train split where "
                                                     "the data has one (gsm8k_train.jsonl, MMLU's dev split), else "
                                                     "the head of 'path', kept out of the scored items.")


class EvalSuites(_Section):
    gsm8k: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="GSM8K test: exact match of the final number.")
    math500: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="MATH-500: normalised match of the final \\boxed{} answer.")
    math: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="Full MATH test (5000): as math500.")
    arc_challenge: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="ARC-Challenge: option log-likelihood.")
    arc_easy: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="ARC-Easy: option log-likelihood.")
    mmlu: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="MMLU test: log-likelihood of the option letter.")
    humaneval: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="HumanEval: pass@1, tests run in a sandboxed subprocess.")
    mbpp: EvalSuiteConfig = Field(default_factory=EvalSuiteConfig, description="MBPP test split: pass@1, tests run in a sandboxed subprocess.")

    @model_validator(mode="before")
    @classmethod
    def _named_means_enabled(cls, data: Any) -> Any:
        """``suites: [gsm8k, mmlu]`` or ``suites: {gsm8k: {limit: 50}}`` turns the named suites on."""
        if isinstance(data, (list, tuple)):
            data = {name: {} for name in data}
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        for name, value in data.items():
            if value is None or value is True:
                value = {"enabled": True}
            elif value is False:
                value = {"enabled": False}
            elif isinstance(value, dict) and "enabled" not in value:
                value = {**value, "enabled": True}
            out[name] = value
        return out

    def enabled(self) -> dict[str, EvalSuiteConfig]:
        """The suites turned on, in a fixed order."""
        return {name: getattr(self, name) for name in EVAL_BENCHMARK_FILES if getattr(self, name).enabled}


class EvalConfig(_Section):
    mc_path: str | None = Field("demo", description="Multiple-choice set {query, choices, gold} for accuracy: 'demo', a JSONL path, or null.")
    mc_limit: int | None = Field(200, ge=1, description="Use at most this many multiple-choice items.")
    metric: str = Field("heldout_loss", description="Metric the plateau rule watches: heldout_loss, mc_accuracy, the "
                                                    "name of an enabled suite (e.g. gsm8k), or 'average' (unweighted "
                                                    "mean of the enabled suites' scores).")
    suites: EvalSuites = Field(default_factory=EvalSuites, description="Benchmarks scored after each training "
                                                                       "(none by default); a list of names or a mapping of name to settings.")
    data_dir: str | None = Field(None, description="Folder of the benchmark files; default: ../shared/data/eval beside the project.")
    seed: int = Field(0, description="Seed of the benchmark subsets (fixed across runs, so rounds and runs compare).")
    num_actors: int | None = Field(None, ge=1, description="Evaluation actors; default: one per GPU, or 1 on CPU.")
    cpus_per_actor: float = Field(0.5, gt=0, description="Logical CPUs reserved per evaluation actor.")
    rows_per_block: int = Field(32, ge=1, description="Items handed to an evaluation actor per Ray Data batch.")
    gen_batch_size: int = Field(16, ge=1, description="Most prompts generated together (left-padded, similar lengths).")
    max_prompt_tokens: int = Field(1536, ge=64, description="Prompt budget; few-shot examples are dropped (last first) until the prompt fits.")
    code_timeout_s: float = Field(10.0, gt=0, description="Wall-time limit of one generated program and its tests.")
    code_memory_mb: int = Field(1024, ge=64, description="Address-space limit of one generated program.")
    code_cpus: float = Field(0.25, gt=0, description="Logical CPUs reserved per code-execution task.")

    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_eval_data_dir()

    def suite_file(self, name: str) -> Path:
        """File of a benchmark: its ``path``, else the conventional file in the data dir."""
        suite = getattr(self.suites, name)
        return Path(suite.path).expanduser() if suite.path else self.resolved_data_dir() / EVAL_BENCHMARK_FILES[name]

    def shots_file(self, name: str) -> Path | None:
        """File of few-shot examples (None: the head of the benchmark file, or the zip's dev split for MMLU)."""
        suite = getattr(self.suites, name)
        if suite.shots_path:
            return Path(suite.shots_path).expanduser()
        default = EVAL_SHOT_FILES.get(name)
        if default and not suite.path:
            candidate = self.resolved_data_dir() / default
            return candidate if candidate.is_file() else None
        return None

    @model_validator(mode="after")
    def _check_suites(self) -> "EvalConfig":
        problems: list[str] = []
        enabled = self.suites.enabled()
        if self.metric not in EVAL_METRICS and self.metric not in EVAL_BENCHMARK_FILES:
            problems.append(f"eval.metric '{self.metric}' is unknown; use one of {', '.join(EVAL_METRICS)} or a "
                            f"suite name ({', '.join(EVAL_BENCHMARK_FILES)})")
        elif self.metric in EVAL_BENCHMARK_FILES and self.metric not in enabled:
            problems.append(f"eval.metric is '{self.metric}' but that suite is not enabled; add it to eval.suites "
                            f"(e.g. --set eval.suites.{self.metric}.enabled=true)")
        elif self.metric == "average" and not enabled:
            problems.append("eval.metric is 'average' but no suite is enabled; add suites to eval.suites")
        elif self.metric == "mc_accuracy" and self.mc_path is None:
            problems.append("eval.metric is 'mc_accuracy' but eval.mc_path is null; set eval.mc_path or another metric")
        data_dir = self.resolved_data_dir()
        by_dir = [name for name in enabled if not getattr(self.suites, name).path]
        if by_dir and not data_dir.is_dir():
            # One message for the common cause instead of one per suite.
            problems.append(f"eval.data_dir '{data_dir}' is not a folder (suites {', '.join(by_dir)} read their "
                            "files from it); set eval.data_dir to the folder of the benchmark files (the layout "
                            "of ../shared/data/eval), or give each suite a path")
        for name in enabled:
            path = self.suite_file(name)
            if name in by_dir and not data_dir.is_dir():
                continue
            if not path.is_file():
                where = (f"eval.suites.{name}.path" if getattr(self.suites, name).path else
                         f"eval.data_dir (now {self.resolved_data_dir()}) to the folder holding "
                         f"{EVAL_BENCHMARK_FILES[name]}, or eval.suites.{name}.path")
                problems.append(f"eval.suites.{name}: benchmark file '{path}' does not exist; set {where}")
            shots = getattr(self.suites, name).shots_path
            if shots and not Path(shots).expanduser().is_file():
                problems.append(f"eval.suites.{name}.shots_path: '{shots}' does not exist; point it to a file of "
                                "the benchmark's format, or remove it to use the default examples")
        if problems:
            # One bullet per problem in the ConfigError listing.
            raise ValueError("\n  - ".join(problems))
        return self


class ConvergeConfig(_Section):
    max_rounds: int = Field(2, ge=1, description="Stop after this many refinement rounds.")
    patience: int = Field(1, ge=1, description="Stop when the metric has not improved by min_delta for this many rounds.")
    min_delta: float = Field(0.0, ge=0, description="Smallest improvement of the metric that counts.")
    min_flagged_fraction: float = Field(0.0, ge=0, le=1, description="Stop when fewer than this fraction of samples is flagged.")


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray address to join (RAY_ADDRESS also works; inside `ray job submit` it is set); "
                                     "'auto' joins the cluster `ray start` runs on this machine; None starts a local "
                                     "Ray of the run's own.")
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
        problems = cross_field_problems({name: getattr(self, name) for name in type(self).model_fields})
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    @property
    def gpu_worker_share(self) -> float:
        """The GPU share each GPU worker of the loop asks for (diagnosis and evaluation actors, training workers):
        a whole GPU, or with ``refine.gpu_handoff='sleep'`` the rest of the one a sleeping teacher holds a share of."""
        return 1.0 - self.refine.sleep_gpu_share if self.refine.gpu_handoff == "sleep" else 1.0


def cross_field_problems(sections: dict[str, Any]) -> list[str]:
    """The rules that tie fields of several sections together, every one that fails.

    ``sections`` maps a section name to its validated model, or to None where that section is invalid: a rule
    that needs an invalid section is skipped, so :func:`build_config` reports these rules beside the field
    errors of other sections (pydantic would run none of them while any field is wrong).
    """
    problems: list[str] = []

    def have(*names: str) -> bool:
        return all(sections.get(n) is not None for n in names)

    if have("select", "diagnose"):
        sel, diag = sections["select"], sections["diagnose"]
        if "diversity" in sel.axes and diag.knn_k != 2:
            # The synthesis prompt shows exactly two hint prompts, as the reference does.
            problems.append("diagnose.knn_k must be 2 while 'diversity' is in select.axes (the synthesis prompt "
                            "uses two neighbours as hints); set diagnose.knn_k=2")
        if "quality" in sel.axes and not diag.judge:
            problems.append("select.axes contains 'quality' but diagnose.judge is false; set diagnose.judge=true or "
                            "remove 'quality' from select.axes")
    if have("refine", "train"):
        ref, train = sections["refine"], sections["train"]
        if (ref.judge == "current" and ref.judge_engine == "vllm" and train.method == "lora"
                and train.lora_save == "adapter"):
            problems.append("refine.judge_engine='vllm' serves each round's checkpoint, but train.lora_save=adapter "
                            "saves adapters vLLM cannot load as a model; set train.lora_save=merged or "
                            "refine.judge_engine=transformers")
    if have("refine") and sections["refine"].gpu_handoff == "sleep" and sections["refine"].gpus_per_replica <= 0:
        problems.append("refine.gpu_handoff=sleep hands the teacher's GPU to training, but refine.gpus_per_replica "
                        "is 0 (the teacher holds no GPU); set gpus_per_replica=1 or gpu_handoff=keep")
    return problems


def _valid_sections(tree: dict) -> dict[str, Any]:
    """Each section of ``tree`` validated on its own: its model, or None where it has an error."""
    out: dict[str, Any] = {}
    for name, info in MiddoConfig.model_fields.items():
        try:
            out[name] = info.annotation.model_validate(tree.get(name) or {})
        except (ValidationError, TypeError, ValueError):
            out[name] = None
    return out


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
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg if not err["loc"] else f"{loc}: {msg}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def build_config(tree: dict | None = None, overrides: list[str] | None = None,
                 check_files: bool = False) -> MiddoConfig:
    """Validates a config tree plus dotted overrides, raising ConfigError with every problem.

    ``check_files`` also checks the files and folders the config names (:mod:`middo_ray.preflight`: the data
    file, the held-out and multiple-choice files, a writable run folder), for every section that is valid, so
    one error lists the config's mistakes and the missing files together.
    """
    from types import SimpleNamespace

    from middo_ray.preflight import check_inputs

    tree = dict(tree or {})
    problems: list[str] = []
    for item in overrides or []:
        _apply_override(tree, item, problems)
    try:
        cfg = MiddoConfig.model_validate(tree)
        sections: Any = cfg
    except ValidationError as exc:
        # Top-level errors are the rules across sections: asked again below, one problem each, on the sections
        # that are valid (pydantic runs none of them while a section has an error).
        problems.extend(_describe(e) for e in exc.errors() if e["loc"])
        valid = _valid_sections(tree)
        problems.extend(p for p in cross_field_problems(valid) if p not in problems)
        cfg, sections = None, SimpleNamespace(**valid)
    if check_files:
        problems.extend(check_inputs(sections))
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = False) -> MiddoConfig:
    """Loads a YAML file (or the defaults when path is None) and applies dotted overrides (``check_files``: see
    :func:`build_config`)."""
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
    return build_config(tree, overrides, check_files)


def config_hash(cfg: MiddoConfig) -> str:
    """Short stable hash of the config (for run ids and cache keys)."""
    import hashlib

    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:10]

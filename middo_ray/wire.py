"""The wire models of the refiner/judge HTTP API, and the Serve settings the run config and the app share.

Kept in the library (not in ``serve/``) so the loop's client and the service agree on one definition;
``serve/`` imports this module and never a stage.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from middo_ray.schema import OPERATIONS

#
# Hard caps below are the wire contract (a body beyond them is a 422); each server also has its own,
# usually lower, configured limits (samples per request, generated tokens, body bytes), which it
# answers with 413 and a message naming the limit.

Operation = Literal[OPERATIONS]

MAX_TEXT_CHARS = 200_000        # one instruction/input/output/hint
MAX_WIRE_SAMPLES = 4096         # samples in one refine or judge request
MAX_WIRE_TOKENS = 32_768        # generated tokens per item
# Seeds stay within JSON's exact integer range (2**53 - 1): beyond it JSON tools that read numbers as
# doubles (JavaScript, schema validators) would change them silently.
MAX_SEED = 2**53 - 1

# The refiner app's model deployment: the loop calls it through its handle, past the HTTP gateway.
REFINER_DEPLOYMENT = "Refiner"


class TeacherUnavailable(RuntimeError):
    """The engine behind the refiner app could not answer: an external endpoint that kept failing (5xx, 429,
    refused or dropped connections, timeouts) after its retries, or refused the app's credentials or model.

    Raised in the model replica and re-raised to the caller by Ray (it pickles: its args are its fields). The
    refine stage counts it as a failed request (the request's items keep their originals, nothing is cached)
    and stops after ``refine.max_consecutive_failures`` of them in a row. The HTTP gateway answers it with 502.

    Attributes:
        endpoint: The URL that failed.
        status: Its last HTTP status, or None for a connection that failed.
    """

    def __init__(self, message: str, endpoint: str | None = None, status: int | None = None):
        super().__init__(message, endpoint, status)
        self.message, self.endpoint, self.status = message, endpoint, status

    def __str__(self) -> str:
        return self.message


def valid_text(value: str) -> str:
    """Refuses text that is not valid Unicode: a lone UTF-16 surrogate (JSON's ``"\\ud800"``) parses into a
    Python string, but no tokenizer, log or file can take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone UTF-16 surrogate (\\u{ord(value[exc.start]):04x} at character {exc.start}), "
                         f"which is not valid Unicode text; send valid UTF-8") from None
    return value


# Every string of the wire: valid Unicode (see valid_text).
Text = Annotated[str, AfterValidator(valid_text)]


def _whole_float_as_int(value: Any) -> Any:
    # JSON Schema's "integer" includes 1.0; strict mode would refuse it (and should: 1.5, "1", true).
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Every integer of the wire: an int, or a float with no fractional part (JSON Schema's integer).
Int = Annotated[int, BeforeValidator(_whole_float_as_int)]


def bounded_int(ge: int, le: int) -> Any:
    """:data:`Int` within [ge, le], as a type (a bound on an optional field must sit inside the union for
    the OpenAPI schema to carry it)."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_whole_float_as_int)]


class _Wire(BaseModel):
    # Strict: a value of the wrong JSON type is refused (no "1" for 1, no 0 for false), so what the
    # OpenAPI schema says is what the server accepts. NaN/Infinity are accepted by Python's JSON
    # parser; they are never meaningful here.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class RefineSample(_Wire):
    sample_id: Text | None = Field(None, max_length=512, description="Caller's id, echoed back.")
    instruction: Text = Field(..., max_length=MAX_TEXT_CHARS, description="Prompt (instruction) of the sample.")
    input: Text = Field("", max_length=MAX_TEXT_CHARS, description="Optional extra input of the prompt.")
    output: Text = Field("", max_length=MAX_TEXT_CHARS, description="Current response (not needed for synthesize).")
    hints: list[Annotated[Text, Field(max_length=MAX_TEXT_CHARS)]] = Field(default_factory=list, max_length=8,
                             description="synthesize only: neighbour prompts used as hints (2).")


class SamplingParams(_Wire):
    max_new_tokens: Int = Field(160, ge=1, le=MAX_WIRE_TOKENS,
                                description="Token cap per generated text (the server may allow fewer: 413).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: bounded_int(-MAX_SEED, MAX_SEED) | None = Field(None,
                             description="Seed for sampling; same seed and input give the same output, whatever "
                                         "else is batched with the request. None: a fresh random seed.")


class RefineRequest(_Wire):
    operation: Operation = Field(..., description="simplify (hard) | improve (low quality) | synthesize (sparse).")
    samples: list[RefineSample] = Field(..., min_length=1, max_length=MAX_WIRE_SAMPLES,
                                        description="Samples to refine (the server may allow fewer: 413).")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    max_retries: Int = Field(1, ge=0, le=5)
    prefill_marker: bool = Field(
        True, description="Start the teacher's rewrite with the operation's marker (assistant prefill). Small "
                          "teachers rarely write the marker themselves; false lets the teacher work through the "
                          "four steps first, as the reference does with gpt-4o-mini. Engines that cannot "
                          "prefill ignore it.")


class RefineResult(_Wire):
    sample_id: str | None = None
    status: Literal["ok", "failed"]
    reason: str = Field("", description="Why the item failed (the original must then be kept).")
    instruction: str = Field("", description="New prompt (empty on failure).")
    input: str = ""
    output: str = Field("", description="Fresh answer to the new prompt (empty on failure).")
    attempts: int = 0
    quality_before: float | None = Field(
        None, description="Set by the loop's re-judge: judged quality (0-10) of the original sample.")
    quality_after: float | None = Field(
        None, description="Set by the loop's re-judge: judged quality (0-10) of the rewrite.")
    ifd_after: float | None = Field(
        None, description="Set by the loop's re-judge under refine.accept_max_ifd: IFD of the rewrite under the judge.")


class RefineResponse(_Wire):
    operation: Operation
    model: str
    results: list[RefineResult]


JudgeMode = Literal["prob", "generate"]


def _judge_sampling() -> "SamplingParams":
    return SamplingParams(max_new_tokens=8, temperature=0.1, top_p=1.0)


class JudgeSample(_Wire):
    sample_id: Text | None = Field(None, max_length=512, description="Caller's id, echoed back.")
    instruction: Text = Field(..., max_length=MAX_TEXT_CHARS, description="Prompt (instruction) of the sample.")
    input: Text = Field("", max_length=MAX_TEXT_CHARS, description="Optional extra input of the prompt.")
    output: Text = Field("", max_length=MAX_TEXT_CHARS, description="Response to judge.")


class JudgeRequest(_Wire):
    samples: list[JudgeSample] = Field(..., min_length=1, max_length=MAX_WIRE_SAMPLES,
                                       description="Samples to judge (the server may allow fewer: 413).")
    mode: JudgeMode = Field(
        "prob", description="'prob': expected 0-10 score under the model's next-token distribution over the score "
                            "tokens (needs an engine with logits); 'generate': generate at low temperature and "
                            "parse a leading 0-10 number, unparseable answers are null (never 0).")
    template: Literal["auto", "default", "chat"] = Field(
        "auto", description="Prompt template of 'prob' mode: 'default' (the training template), 'chat' (the "
                            "tokenizer's chat template) or 'auto' (chat when the tokenizer has one).")
    cutoff_len: Int = Field(1024, ge=16, le=MAX_WIRE_TOKENS, description="Token cap of one judge prompt ('prob').")
    sampling: SamplingParams = Field(default_factory=_judge_sampling,
                                     description="Sampling of 'generate' mode (paper: temperature 0.1).")
    ifd: bool = Field(
        False, description="Also give each sample's IFD: the response's mean token loss after its prompt over its "
                           "loss alone, under the judge model (as the diagnosis computes it, same template and "
                           "cutoff_len). Needs an engine with logits (transformers, vllm).")


class DimensionScores(_Wire):
    factuality: float | None = None
    clarity: float | None = None
    completeness: float | None = None


class JudgeResult(_Wire):
    sample_id: str | None = None
    prompt: DimensionScores = Field(..., description="Scores (0-10) of the prompt; null = no score.")
    response: DimensionScores = Field(..., description="Scores (0-10) of the response; null = no score.")
    quality: float | None = Field(None, description="Mean over dimensions of (prompt + response) / 2, missing "
                                                    "judgements left out; null when none was given.")
    missing: int = Field(0, description="Judgements (of 6) that gave no score.")
    ifd: float | None = Field(None, description="IFD of the sample (request 'ifd': true); above 1 the prompt makes "
                                                "its response no easier to predict. null when not asked or "
                                                "undefined.")


class JudgeResponse(_Wire):
    mode: JudgeMode
    model: str
    results: list[JudgeResult]


# ---------------------------------------------------------------------------------------------
# Settings of the refiner Serve app that the run config and the app's own arguments share.


class ServeSettings(BaseModel):
    """The refiner app's engine, scaling, limits and security settings.

    One definition for both sides: the run config's ``refine`` section (``middo_ray.config.RefineConfig``)
    and the app's arguments (``serve.app.RefinerArgs``, for ``serve run serve.app:build_app key=value``)
    inherit these fields, and the loop passes them across unchanged.
    """

    engine: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="Engine of the refiner LLM: 'transformers' (the model runs in the Serve replicas), "
                                    "'vllm' (Ray Serve LLM's vLLM deployment behind the app; needs vllm installed) or "
                                    "'openai' (an external OpenAI-compatible endpoint at openai_base_url).")
    openai_base_url: str | None = Field(None, description="engine 'openai': base URL of the endpoint, e.g. https://host/v1.")
    openai_api_key_env: str = Field("OPENAI_API_KEY", description="engine 'openai': NAME of the environment variable "
                                                                  "holding the endpoint's API key (never the key itself).")
    openai_prefill: bool = Field(False, description="engine 'openai': the endpoint continues an assistant prefix "
                                                    "(continue_final_message; vLLM and this app do, the hosted OpenAI API does not).")
    openai_max_parallel: int = Field(8, ge=1, description="engine 'openai': requests in flight to the endpoint per replica.")
    openai_retries: int = Field(
        3, ge=0, le=20, description="engine 'openai': retries of a call that failed for a transient reason (HTTP 408, "
                                    "409, 429, 5xx, a refused, dropped or timed-out connection), after waits of 0.5, "
                                    "1, 2, ... s (at most 8 s, or the endpoint's Retry-After up to 30 s). While the "
                                    "endpoint fails, one row probes it and the others wait. The only retries: the "
                                    "HTTP client itself retries nothing.")
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="engine 'vllm': vLLM engine arguments (Ray Serve LLM's LLMConfig.engine_kwargs), "
                                          "e.g. {max_model_len: 4096, tensor_parallel_size: 2, gpu_memory_utilization: 0.9}.")
    num_replicas: int = Field(1, ge=1, description="Replicas of the refiner deployment (fixed; see autoscale).")
    autoscale: bool = Field(False, description="Let Serve scale replicas between min_replicas and max_replicas "
                                               "(clusters); num_replicas is then ignored.")
    min_replicas: int = Field(1, ge=0, description="autoscale: fewest replicas (0 lets the app scale to zero).")
    max_replicas: int = Field(4, ge=1, description="autoscale: most replicas.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscale: ongoing requests per replica Serve aims for.")
    max_ongoing_requests: int = Field(16, ge=1, le=1024, description="Requests a replica works on at once (batched together).")
    max_queued_requests: int = Field(64, ge=1, description="Requests queued per caller beyond that; more are refused "
                                                           "with 503 and Retry-After.")
    retry_after_s: float = Field(2.0, ge=0, description="Retry-After (seconds) sent with a 503.")
    batch_max_rows: int = Field(16, ge=1, le=1024, description="Most prompts in one dynamic batch (one forward batch) "
                                                               "of the engine.")
    batch_wait_s: float = Field(0.1, ge=0, le=10, description="How long a dynamic batch waits to fill up (longer fills "
                                                              "batches better when a batch takes seconds, as on CPU; "
                                                              "shorter cuts latency on fast GPUs).")
    max_samples_per_request: int = Field(64, ge=1, description="HTTP: most samples in one refine/judge request (413 above).")
    max_new_tokens_limit: int = Field(2048, ge=1, description="Most tokens one request may ask to generate per item (413 above).")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="HTTP: largest request body in bytes (413 above).")
    max_request_tokens: int = Field(
        131_072, ge=1, description="Most tokens one request may ask to generate in all: samples x max_new_tokens x "
                                   "steps (2 for refine, 6 judgements for generate-mode judging) x attempts, or "
                                   "n x max_tokens for a chat (413 above).")
    generation_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of one request's work in the replica: generation stops there (refine "
                                 "items fail with the reason, chat answers end with finish_reason 'length'; 504 "
                                 "for engines that cannot stop between tokens).")
    body_timeout_s: float = Field(30.0, gt=0, description="HTTP: seconds a client has to send its whole request body "
                                                          "(408 and the connection closed after).")
    slice_s: float = Field(1.0, ge=0, description="transformers engine: a generation running this long makes room for "
                                                  "the requests waiting behind it (its rows continue in the next batch); "
                                                  "0 = never.")
    gateway_max_ongoing_requests: int = Field(
        512, ge=1, description="HTTP connections one gateway replica holds at once (reading bodies, waiting for the "
                               "model); they cost no model time.")
    api_key_env: str = Field("MIDDO_SERVE_API_KEY", description="NAME of the environment variable holding the app's API "
                                                                "key (clients send 'Authorization: Bearer <key>'). "
                                                                "Required when http_host is not a loopback address.")
    http_host: str = Field("127.0.0.1", description="Host Serve's HTTP proxy binds (a key is required beyond loopback).")
    log_text: bool = Field(False, description="Log sample text at debug level (off: logs carry counts and ids only).")

    @field_validator("vllm_engine_kwargs", mode="before")
    @classmethod
    def _kwargs_from_text(cls, value: Any) -> Any:
        """``serve run ... vllm_engine_kwargs='{"max_model_len": 4096}'`` passes JSON text."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"vllm_engine_kwargs must be a JSON object, e.g. '{{\"max_model_len\": 4096}}' "
                                 f"({exc})") from None
        return value

"""Request, output, error and stats types of the inference engine.

These are the engine's internal, already-typed request model: the gRPC
servicer and the HTTP routes convert their wire messages into a
`GenerationRequest`, hand it to `Engine.submit`, and map the typed errors
below to status codes in one place (DESIGN.md "Contracts"). Nothing here
imports torch, Ray or gRPC, so the serving shim and the metrics module can
import it cheaply.

Units: every duration is in seconds (`*_s`), except `latency_budget_ms`,
which keeps the unit of the public API field it mirrors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]
QUALITY_TIERS = ("fast", "balanced", "best")


# ----------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How tokens are drawn and when generation stops.

    Attributes:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 = greedy; otherwise logits are divided by it (>= 0).
        top_p: nucleus mass kept, in (0, 1]; 1 disables it.
        top_k: most likely tokens kept; 0 disables it.
        seed: seeds the request's own generator, so the same seed and
            settings give the same text alone or batched; None = random.
        stop: strings that end generation; the matched string and anything
            after it are not emitted.
        stop_token_ids: token ids that end generation (finish_reason "stop").
        ignore_eos: keep generating after the end-of-text token (benchmarks).
        presence_penalty: subtracted once from the logit of every token that
            already appears in the completion, in [-2, 2] (OpenAI's field).
        frequency_penalty: subtracted from a token's logit once per time it
            appears in the completion, in [-2, 2] (OpenAI's field).
        logit_bias: token id -> bias added to its logit before sampling, each
            in [-100, 100] (OpenAI's field; -100 bans a token, 100 forces it).
        logprobs: None = no log-probabilities; k >= 0 = report the sampled
            token's log-probability and the k most likely alternatives
            (OpenAI's `logprobs`, at most `MAX_LOGPROBS`). Log-probabilities
            are of the distribution the token was drawn from after
            penalties and bias, before temperature and top-k / top-p.
        truncate_prompt_tokens: keep only the last N prompt tokens, in
            [1, context_length] (vLLM's field); None = a prompt that does not
            fit is refused, naming `prompt`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    truncate_prompt_tokens: int | None = None


MAX_LOGPROBS = 20  # OpenAI's bound for completions' `logprobs`


@dataclass
class ComputeParams:
    """Per-request compute dials; all optional (see runtime/policy.py).

    Attributes:
        steps: explicit Euler step count; wins over everything else.
        quality: named tier ("fast", "balanced", "best") from profile.json.
        latency_budget_ms: whole-request budget mapped through the cost model
            to the largest step count predicted to fit (the server also
            passes the gRPC deadline here).
        experts_top_k: experts per token (MoE models only).
        expert_depth: tree truncation depth (tree-FFN models only).
        draft_steps: self-speculative decoding (runtime/speculation.py): draft
            with this many Euler steps of the same weights and verify with the
            request's steps, in [model min_steps, steps - 1]; 0 = off; None =
            the server's default (`EngineConfig.draft_steps`).
        draft_tokens: tokens drafted per round, in [1, `MAX_DRAFT_TOKENS`];
            None = the server's default (`EngineConfig.draft_tokens`).
        exit_threshold: models with an exit gate (Ouro) only, in (0, 1]: every
            loop runs (all of them unless `steps` says fewer) and each token is
            read from the first loop whose cumulative exit probability reaches
            it, else the last; the reference's threshold exit. None = off.
        exit_mode: with `exit_threshold`: "all_loops" (the reference: every
            loop runs, None means this) or "stop_early" (experimental: a
            generated token that exits stops looping, the loops it skips get
            its exit loop's keys and values; the prompt runs every loop).
    """

    steps: int | None = None
    quality: str | None = None
    latency_budget_ms: float | None = None
    experts_top_k: int | None = None
    expert_depth: int | None = None
    draft_steps: int | None = None
    draft_tokens: int | None = None
    exit_threshold: float | None = None
    exit_mode: str | None = None


EXIT_MODES = ("all_loops", "stop_early")
MAX_DRAFT_TOKENS = 8  # draft_tokens' bound: a round's verification forward holds draft_tokens + 1 tokens


@dataclass
class GenerationRequest:
    """One generation request, exactly one of `prompt` / `prompt_token_ids` set.

    Attributes:
        request_id: unique among live requests of one engine.
        prompt: text prompt, tokenised by the engine.
        prompt_token_ids: pre-tokenised prompt.
        sampling: sampling parameters.
        compute: compute parameters.
        arrival_time: `time.monotonic()` when the request arrived.
        deadline: absolute `time.monotonic()` after which the request fails
            with `DeadlineExceededError` (None = no deadline).
        client_id: who sent it (OpenAI `user`, gRPC metadata `x-leanserve-client`,
            else the caller's address); admission shares capacity fairly
            among clients (runtime/scheduler.py). "" = the anonymous client.
        priority: order among the same client's waiting requests, lower first
            (vLLM's convention), in [-100, 100]; it never lets one client
            overtake another's fair share.
    """

    request_id: str
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    client_id: str = ""
    priority: int = 0


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and its most likely alternatives.

    Attributes:
        token_id: the generated token.
        logprob: its natural-log probability.
        top: the `SamplingParams.logprobs` most likely tokens as (id, logprob),
            most likely first (may include `token_id`).
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """One streamed delta of a request (the last one has `finished=True`).

    Attributes:
        request_id: the request.
        text: newly emitted text (may be "" while text is held back).
        token_ids: newly generated token ids.
        finished: this is the request's last output.
        finish_reason: why it finished; None while running.
        prompt_tokens: prompt length in tokens.
        completion_tokens: tokens generated so far.
        steps: Euler steps the request runs.
        experts: experts top-k / tree depth used (None for a dense FFN).
        policy_reason: why those steps were chosen ("explicit",
            "quality:balanced", "latency_budget", "default:slo", ...).
        queue_s: seconds from arrival to admission.
        first_token_s: seconds from arrival to the first token (None before).
        total_s: seconds from arrival to this output.
        logprobs: one entry per id in `token_ids` when the request asked for
            log-probabilities, else None.
        speculation: the request's speculative decoding so far (None: it
            never speculated); see `SpecReport`.
        mean_loops: requests with `exit_threshold`: loops computed per
            generated token so far (fewer than `steps` when tokens stopped
            early, `exit_mode` "stop_early"); None otherwise.
    """

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    steps: int
    experts: int | None
    policy_reason: str
    queue_s: float | None = None
    first_token_s: float | None = None
    total_s: float | None = None
    logprobs: list[TokenLogprob] | None = None
    speculation: SpecReport | None = None
    mean_loops: float | None = None


@dataclass
class SpecReport:
    """What self-speculative decoding did for one request (runtime/speculation.py).

    Attributes:
        draft_steps: Euler steps of the draft ("auto" may lower or stop it; the last used).
        draft_tokens: tokens drafted per round (the last setting used).
        rounds: draft-and-verify rounds run.
        drafted_tokens: tokens the draft proposed.
        accepted_tokens: drafted tokens the verification kept.
        mode: "explicit" (the request's fields), "default" (the server's fixed
            setting) or "auto" (the server's adaptive setting).
    """

    draft_steps: int
    draft_tokens: int
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    mode: str = "explicit"

    @property
    def ran(self) -> bool:
        """Whether at least one round ran."""
        return self.rounds > 0

    @property
    def acceptance(self) -> float | None:
        """accepted / drafted, or None before any draft."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None


# ----------------------------------------------------------------------------
# Errors (the server maps each class to one gRPC status code)
# ----------------------------------------------------------------------------
class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request field is invalid (gRPC INVALID_ARGUMENT).

    Attributes:
        field: the offending field, e.g. "sampling.top_p".
        value: its value.
        allowed: what would be accepted, in words.
    """

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={short_repr(value)}: {allowed}")


def short_repr(value: Any, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters (error messages echo client values).

    Large values are never formatted whole: a 1 MB prompt or a 10**400
    integer would make the message itself the problem.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**limit:
        return f"<integer with more than {limit} digits>"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deep; an int too long for str()
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


class OverloadedError(EngineError):
    """The waiting queue is full (gRPC RESOURCE_EXHAUSTED)."""


class EngineUnavailableError(EngineError):
    """The engine is not started, is draining, or has died (gRPC UNAVAILABLE)."""


class RequestCancelledError(EngineError):
    """The request was cancelled before it finished (gRPC CANCELLED)."""


class UnauthenticatedError(EngineError):
    """No or a wrong API key (gRPC UNAUTHENTICATED, HTTP 401)."""


class RequestFailedError(EngineError):
    """This request failed inside the engine; the others were unaffected (gRPC INTERNAL)."""


class DeadlineExceededError(EngineError):
    """The request's deadline passed before it finished (gRPC DEADLINE_EXCEEDED)."""


# ----------------------------------------------------------------------------
# Stats (consumed by runtime/metrics; plain data, no Prometheus here)
# ----------------------------------------------------------------------------
@dataclass
class RequestStats:
    """Emitted once per request when it leaves the engine.

    Attributes:
        request_id: the request.
        queue_time_s: arrival to admission (None if never admitted).
        ttft_s: arrival to first token (None if none was generated).
        itl_s: inter-token latencies, seconds between consecutive tokens.
        total_s: arrival to finish.
        steps: Euler steps used.
        experts: expert setting used (None for a dense FFN).
        policy_reason: why the steps were chosen.
        prompt_tokens: prompt length.
        generated_tokens: tokens generated.
        predicted_s: the step policy's prediction of `total_s` when it chose
            the steps (None when it made none), for the prediction-error metric.
        finish_reason: "stop", "length", "cancelled", or "deadline"/"error"
            for requests that failed.
        speculation: the request's speculative decoding (None: it never speculated).
    """

    request_id: str
    queue_time_s: float | None
    ttft_s: float | None
    itl_s: list[float]
    total_s: float
    steps: int
    experts: int | None
    policy_reason: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    predicted_s: float | None = None
    speculation: SpecReport | None = None


@dataclass
class IterationStats:
    """Emitted once per engine iteration (prefills plus one decode pass).

    Attributes:
        batch_size: rows that produced a token this iteration.
        num_prefill: rows prefilled.
        num_decode: rows decoded.
        steps_histogram: step count -> rows running it this iteration.
        expert_token_counts: tokens routed to each expert / tree node this
            iteration (empty for a dense FFN).
        kv_used_bytes: KV bytes reserved after the iteration.
        kv_capacity_bytes: KV pool size in bytes.
        num_waiting: requests waiting for admission after the iteration.
        num_running: requests holding KV after the iteration.
        duration_s: wall time of the iteration's model work.
        speculation: (draft_steps, mode) -> (drafted, accepted) tokens of
            this iteration's speculative rounds (empty when none ran).
        num_speculating: rows that ran a speculative round.
        kv_pages_used: KV pages holding cached tokens after the iteration.
        kv_pages_reserved: KV pages allocated to requests after the iteration
            (more than used: the rest of a reservation, or a page being filled).
        kv_pages_capacity: allocatable KV pages in the pool.
        preemptions_total: requests preempted since start (KV on demand).
        recomputed_tokens_total: tokens fed again by recompute prefills since start.
        kv_lowered_total: admissions at fewer steps for lack of KV since
            start (the memory dial, `EngineConfig.kv_min_steps`).
    """

    batch_size: int
    num_prefill: int
    num_decode: int
    steps_histogram: dict[int, int]
    expert_token_counts: list[int]
    kv_used_bytes: int
    kv_capacity_bytes: int
    num_waiting: int
    num_running: int
    duration_s: float
    speculation: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    num_speculating: int = 0
    kv_pages_used: int = 0
    kv_pages_reserved: int = 0
    kv_pages_capacity: int = 0
    preemptions_total: int = 0
    recomputed_tokens_total: int = 0
    kv_lowered_total: int = 0


@dataclass
class EngineStats:
    """Snapshot returned by `Engine.stats()`.

    Attributes:
        state: "created", "running", "draining", "stopped" or "dead".
        model: the model's config name.
        backend: the backend's name.
        num_waiting: requests waiting for admission.
        num_running: requests holding KV.
        kv_used_bytes: KV bytes reserved.
        kv_capacity_bytes: KV pool size in bytes.
        kv_free_pages: free pages in the pool.
        iterations: iterations run since start.
        requests_finished: requests that left the engine.
        tokens_generated: tokens generated since start.
        default_steps: the step count the default policy currently gives.
        slo: the SLO controller's decision, inputs and predictions
            (`SLOController.snapshot`); None without a controller.
        policy: the step policy's state (`StepPolicy.snapshot`: its cost
            model's online terms and prediction error).
        kv_pages_used: KV pages holding cached tokens.
        kv_pages_reserved: KV pages allocated to requests.
        kv_pages_capacity: allocatable KV pages in the pool.
        preemptions_total: requests preempted since start (KV on demand).
        recomputed_tokens_total: tokens fed again by recompute prefills since start.
        kv_lowered_total: admissions at fewer steps for lack of KV since
            start (the memory dial, `EngineConfig.kv_min_steps`).
    """

    state: str
    model: str
    backend: str
    num_waiting: int
    num_running: int
    kv_used_bytes: int
    kv_capacity_bytes: int
    kv_free_pages: int
    iterations: int
    requests_finished: int
    tokens_generated: int
    default_steps: int
    slo: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    kv_pages_used: int = 0
    kv_pages_reserved: int = 0
    kv_pages_capacity: int = 0
    preemptions_total: int = 0
    recomputed_tokens_total: int = 0
    kv_lowered_total: int = 0

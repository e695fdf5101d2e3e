"""The inference engine: validation, step policy, continuous batching, streaming.

One `Engine` owns one backend, one paged KV pool and one scheduler. Requests
enter through `submit`, which validates them (all request validation lives in
`validate_request`, here), chooses their compute with the step policy, and
queues them; the caller gets an async iterator of `RequestOutput` deltas.

The model runs in a background asyncio task (`_run`): each iteration applies
pending cancellations, asks the scheduler what to run (runtime/scheduler.py
explains the design), runs prefills and one batched decode forward plus
sampling in a single worker thread (so the event loop keeps accepting and
streaming while the model computes; a decode iteration expected to be short,
`EngineConfig.inline_decode_ms`, runs on the loop itself, saving the thread
hand-off), then, back on the loop, records the
tokens, detokenises, applies stop strings and pushes deltas to each request's
queue. Scheduler and KV state are only ever mutated on the event loop thread
between forwards; the worker only reads them, which is why a `cancel` is
queued and applied at the start of the next iteration rather than
immediately. That still frees the request's KV within one iteration.

Stats: every finished request produces a `RequestStats` and every iteration
an `IterationStats`; both go to the callables in `stats_callbacks` (the
metrics module subscribes there; nothing here knows about Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from models.config import ModelConfig
from models.kv_cache import KVBatch, PagedKVCache
from models.tokenizer import eot_id, text_only
from runtime.backends import Backend
from runtime.policy import ModelProfile, PolicyDecision, SLOController, StepPolicy, Tier, automatic_steps
from runtime.sampling import Draw, LogitAdjust, TextStream, is_greedy, make_generator, sample_rows
from runtime.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from runtime.types import (
    MAX_LOGPROBS,
    DeadlineExceededError,
    EngineStats,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    IterationStats,
    RequestCancelledError,
    RequestFailedError,
    RequestOutput,
    RequestStats,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)

StatsCallback = Callable[[RequestStats | IterationStats], None]


@dataclass
class EngineConfig:
    """Engine settings (one per replica).

    Attributes:
        kv_cache_bytes: byte budget of the paged KV pool.
        page_size: tokens per KV page.
        max_batch_size: most requests running (holding KV) at once.
        max_waiting: waiting-queue bound; beyond it `submit` raises
            `OverloadedError`.
        max_prefills: most requests admitted (prefilled) per iteration.
        default_steps: fixed default step count (None = the model's default).
        slo_target_itl_ms: when set, the default step count is chosen by an
            `SLOController` (runtime/policy.py) for this inter-token latency target.
        slo_target_ttft_ms: the controller's time-to-first-token target (None = not checked).
        slo_window: measured ITL samples the controller reports.
        slo_hysteresis: the controller's capacity headroom (plans for (1 + h) x demand).
        slo_min_steps: lower bound for the controller (None = model minimum).
        slo_max_steps: upper bound for the controller (None = model maximum).
        slo_quality_ladder: the controller skips step counts that profile.json
            measures no better than a smaller count (`ModelProfile.step_ladder`).
        inline_decode_ms: a decode iteration whose forward is expected to
            take less than this (the previous decode iteration's time) runs
            on the event-loop thread instead of the worker thread: the
            thread hand-off and its cache misses cost ~0.1-0.2 ms per
            iteration on CPU, 10-20 % of a small model's token. Loop work
            that arrives meanwhile (new requests, I/O) waits for at most
            about two such forwards. Prefills and longer decodes always run
            in the worker. 0 = never inline. The 5 ms default is Python's
            GIL switch interval, which already bounds how long a forward in
            the worker can keep the loop waiting.
        max_waiting_per_client: waiting-queue bound per client (None =
            `max_waiting`); see runtime/scheduler.py for fair admission.
        fair_quantum: tokens a client earns per turn of the scheduler's
            deficit round robin.
        max_consecutive_failures: an iteration that raises fails only its
            own requests; this many failing in a row mark the engine dead
            (health checks then fail and Ray replaces the replica).
        tokenize_inline_chars: `submit_async` tokenises text prompts longer
            than this in a thread, so a large prompt never holds up the event
            loop (and with it every other stream of the replica).
    """

    kv_cache_bytes: int = 64 * 2**20
    page_size: int = 16
    max_batch_size: int = 32
    max_waiting: int = 256
    max_prefills: int = 8
    default_steps: int | None = None
    slo_target_itl_ms: float | None = None
    slo_target_ttft_ms: float | None = None
    slo_window: int = 64
    slo_hysteresis: float = 0.1
    slo_min_steps: int | None = None
    slo_max_steps: int | None = None
    slo_quality_ladder: bool = True
    inline_decode_ms: float = 5.0
    max_waiting_per_client: int | None = None
    fair_quantum: int = 256
    max_consecutive_failures: int = 3
    tokenize_inline_chars: int = 2048

    def slo_range(self, model: ModelConfig) -> tuple[int, int] | None:
        """The SLO controller's step bounds for `model` (None: no controller)."""
        if self.slo_target_itl_ms is None:
            return None
        lo, hi = model.step_range
        return (
            self.slo_min_steps if self.slo_min_steps is not None else lo,
            self.slo_max_steps if self.slo_max_steps is not None else hi,
        )


# ----------------------------------------------------------------------------
# Validation: the one place that decides whether a request is acceptable
# ----------------------------------------------------------------------------
# Size limits, checked before any work is done on a field (a client is hostile
# until proven otherwise). The prompt's own limit comes from the model: see
# `max_prompt_chars`.
MAX_ID_CHARS = 256  # request_id, client_id
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300
MAX_TEMPERATURE = 100.0
MAX_PRIORITY = 100
PENALTY_RANGE = 2.0  # presence_penalty, frequency_penalty in [-2, 2] (OpenAI's range)
LOGIT_BIAS_RANGE = 100.0
MAX_LATENCY_BUDGET_MS = 86_400_000.0  # one day
_FLOAT_MAX = 3.4028234663852886e38  # float32: what sampling computes in


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float that converts to a finite float32 (10**400 does not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and abs(float(value)) <= _FLOAT_MAX
    except OverflowError:
        return False


def check_text(name: str, value: Any, max_chars: int | None = None) -> str:
    """A string that is valid Unicode (encodable as UTF-8) and at most `max_chars` long."""
    if not isinstance(value, str):
        raise InvalidRequestError(name, value, "must be a string")
    if max_chars is not None and len(value) > max_chars:
        raise InvalidRequestError(name, value, f"must be at most {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            name, value, f"must be valid Unicode: a lone surrogate at character {e.start} cannot be encoded"
        ) from None
    return value


def _check_ids(name: str, ids: Any, V: int, max_len: int | None = None) -> list[int]:
    if not isinstance(ids, list):
        raise InvalidRequestError(name, ids, "must be a list of token ids")
    if max_len is not None and len(ids) > max_len:
        raise InvalidRequestError(name, ids, f"must hold at most {max_len} token ids")
    for t in ids:
        if not _is_int(t) or not 0 <= t < V:
            raise InvalidRequestError(name, t, f"every id must be an integer in [0, {V - 1}]")
    return list(ids)


def max_prompt_chars(config: ModelConfig, tokenizer: Tokenizer) -> int:
    """The longest text prompt that could still fit the context (checked before tokenising).

    No token spells more than the longest vocabulary entry's characters
    (byte-level entries are one symbol per byte, so this over-counts), so a
    text longer than `context_length` times that always tokenises to more
    than `context_length` tokens.
    """
    longest = max((len(t) for t in tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return config.context_length * max(longest, 1)


def check_prompt_text(text: Any, limit: int) -> str:
    """The cheap checks of a text prompt, before it is tokenised (type, size, Unicode).

    Raises:
        InvalidRequestError: naming `prompt`.
    """
    if not isinstance(text, str) or not text:
        raise InvalidRequestError("prompt", text, "must be a non-empty string")
    return check_text("prompt", text, limit)


def _check_range(name: str, value: Any, lo: float, hi: float, integer: bool = False) -> None:
    ok = _is_int(value) if integer else _is_number(value)
    if not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(name, value, f"must be {kind} in [{lo:g}, {hi:g}]")


def validate_request(
    request: GenerationRequest,
    config: ModelConfig,
    tokenizer: Tokenizer,
    tiers: dict[str, Tier],
    prompt_limit: int | None = None,
    prompt_ids: list[int] | None = None,
) -> list[int]:
    """Check every field of a request and return its prompt token ids.

    Every check is bounded in cost by the field's size limit before the
    field is used, and every value accepted here can be computed with
    (sampling is float32; see runtime/sampling.py).

    Args:
        request: the request.
        config: the model's configuration (ranges, vocabulary, context).
        tokenizer: tokenises a text prompt.
        tiers: quality tiers the model offers.
        prompt_limit: most characters of a text prompt (default
            `max_prompt_chars`).
        prompt_ids: the text prompt's ids when the caller tokenised it
            already (`Engine.submit_async` does, off the event loop).

    Returns:
        The prompt token ids (tokenised text or the given ids).

    Raises:
        InvalidRequestError: naming the first invalid field, its value and
            the allowed range.
    """
    if not isinstance(request.request_id, str) or not request.request_id:
        raise InvalidRequestError("request_id", request.request_id, "must be a non-empty string")
    check_text("request_id", request.request_id, MAX_ID_CHARS)
    check_text("client_id", request.client_id, MAX_ID_CHARS)
    _check_range("priority", request.priority, -MAX_PRIORITY, MAX_PRIORITY, integer=True)

    # --- prompt ---------------------------------------------------------------
    text, ids = request.prompt, request.prompt_token_ids
    if (text is None) == (ids is None):
        which = "both" if text is not None else "neither"
        raise InvalidRequestError("prompt", which, "give exactly one of prompt or prompt_token_ids")
    V = config.vocab_size
    if text is not None:
        limit = prompt_limit if prompt_limit is not None else max_prompt_chars(config, tokenizer)
        check_prompt_text(text, limit)
        if prompt_ids is None:
            prompt_ids = tokenizer.encode(text).ids
        if not prompt_ids:
            raise InvalidRequestError("prompt", text, "must encode to at least one token")
        if max(prompt_ids) >= V:
            raise InvalidRequestError(
                "prompt", text, f"tokenises to ids >= vocab_size={V}; tokenizer and model do not match"
            )
    else:
        if not isinstance(ids, list) or not ids:
            raise InvalidRequestError("prompt_token_ids", ids, "must be a non-empty list of token ids")
        prompt_ids = _check_ids("prompt_token_ids", ids, V, config.context_length)

    # --- sampling -------------------------------------------------------------
    s = request.sampling
    if not _is_int(s.max_tokens) or not 1 <= s.max_tokens <= config.context_length:
        raise InvalidRequestError(
            "max_tokens", s.max_tokens, f"must be an integer in [1, context_length={config.context_length}]"
        )
    total = len(prompt_ids) + s.max_tokens
    if total > config.context_length:
        raise InvalidRequestError(
            "max_tokens",
            s.max_tokens,
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({s.max_tokens}) = {total} "
            f"must be <= context_length={config.context_length}",
        )
    if not _is_number(s.temperature) or not 0 <= s.temperature <= MAX_TEMPERATURE:
        raise InvalidRequestError(
            "temperature", s.temperature, f"must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy)"
        )
    if not _is_number(s.top_p) or not 0 < s.top_p <= 1:
        raise InvalidRequestError("top_p", s.top_p, "must lie in (0, 1]")
    if not _is_int(s.top_k) or s.top_k < 0:
        raise InvalidRequestError("top_k", s.top_k, "must be an integer >= 0 (0 = disabled)")
    if s.seed is not None and (not _is_int(s.seed) or not 0 <= s.seed < 2**63):
        raise InvalidRequestError("seed", s.seed, f"must be an integer in [0, {2**63 - 1}] or unset")
    if not isinstance(s.stop, list) or len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError("stop", s.stop, f"must be a list of at most {MAX_STOP_STRINGS} strings")
    for x in s.stop:
        if not isinstance(x, str) or not x:
            raise InvalidRequestError("stop", x, "every stop string must be a non-empty string")
        check_text("stop", x, MAX_STOP_CHARS)
    _check_ids("stop_token_ids", s.stop_token_ids, V, MAX_STOP_TOKEN_IDS)
    if not isinstance(s.ignore_eos, bool):
        raise InvalidRequestError("ignore_eos", s.ignore_eos, "must be true or false")
    _check_range("presence_penalty", s.presence_penalty, -PENALTY_RANGE, PENALTY_RANGE)
    _check_range("frequency_penalty", s.frequency_penalty, -PENALTY_RANGE, PENALTY_RANGE)
    if not isinstance(s.logit_bias, dict) or len(s.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            "logit_bias", s.logit_bias, f"must map at most {MAX_LOGIT_BIAS} token ids to biases"
        )
    for t, bias in s.logit_bias.items():
        if not _is_int(t) or not 0 <= t < V:
            raise InvalidRequestError("logit_bias", t, f"every key must be a token id in [0, {V - 1}]")
        _check_range("logit_bias", bias, -LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE)
    if s.logprobs is not None:
        _check_range("logprobs", s.logprobs, 0, MAX_LOGPROBS, integer=True)

    # --- compute --------------------------------------------------------------
    c = request.compute
    lo, hi = config.step_range
    if c.steps is not None and (not _is_int(c.steps) or not lo <= c.steps <= hi):
        raise InvalidRequestError("steps", c.steps, f"must be an integer in [{lo}, {hi}] for this model")
    if c.quality is not None and (not isinstance(c.quality, str) or c.quality not in tiers):
        raise InvalidRequestError("quality", c.quality, f"must be one of {', '.join(sorted(tiers))}")
    if c.latency_budget_ms is not None and (
        not _is_number(c.latency_budget_ms) or not 0 < c.latency_budget_ms <= MAX_LATENCY_BUDGET_MS
    ):
        raise InvalidRequestError(
            "latency_budget_ms", c.latency_budget_ms, f"must be a number in (0, {MAX_LATENCY_BUDGET_MS:g}]"
        )
    options = config.expert_options
    for name in ("experts_top_k", "expert_depth"):
        value = getattr(c, name)
        if value is None:
            continue
        if name not in options:
            takes = f"it takes {', '.join(options)} instead" if options else "it takes no expert setting"
            raise InvalidRequestError(name, value, f"not supported by this model (ffn={config.ffn}); {takes}")
        allowed = options[name]
        if not _is_int(value) or value not in allowed:
            raise InvalidRequestError(name, value, f"must be an integer in [{allowed[0]}, {allowed[-1]}]")
    return prompt_ids


# ----------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------
class _Outputs:
    """One request's undelivered outputs: the loop puts, the request's consumer gets.

    `asyncio.Queue` without what one producer and one consumer on one loop do
    not need (getter/putter deques, size bounds): a deque and the consumer's
    waiter future. Runs once per generated token per request.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[RequestOutput | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # done: the consumer was cancelled
            waiter.set_result(None)

    async def get(self) -> RequestOutput | BaseException:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.popleft()


@dataclass(eq=False)
class _RequestState:
    """Everything the engine tracks for one live request besides its Sequence."""

    request: GenerationRequest
    seq: Sequence
    decision: PolicyDecision
    stream: TextStream
    generator: torch.Generator | None
    adjust: LogitAdjust | None = None
    outputs: _Outputs = field(default_factory=_Outputs)
    first_token_time: float | None = None
    last_token_time: float | None = None
    itls: list[float] = field(default_factory=list)
    done: bool = False


def prefill_groups(seqs: list[Sequence], max_padding: float = 2.0) -> list[list[Sequence]]:
    """Split prompts into forwards of right-padded rows.

    Prompts are sorted by length and packed while a group's padded size
    (longest prompt x rows) stays within `max_padding` x its real tokens: one
    forward for typical mixed lengths, separate ones when a long prompt would
    make many short ones pay for its length.
    """
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
        n = len(seq.prompt_ids)
        if groups and n * (len(groups[-1]) + 1) <= max_padding * (real + n):
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups


@dataclass
class _ForwardBatch:
    """One forward's inputs, built on the event loop (`Engine._prepare`)."""

    request_ids: list[str]
    tokens: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    steps: torch.Tensor  # (B,)
    experts: torch.Tensor | None  # (B,)
    kv: KVBatch
    last_index: torch.Tensor | None  # (B,) with right padding
    sampling: list[SamplingParams]
    generators: list[torch.Generator | None]
    adjusts: list[LogitAdjust | None]
    generated: list[list[int]]  # ids so far, for rows whose penalties read them (else [])


@dataclass
class _IterationResult:
    tokens: dict[str, int]
    expert_counts: list[int]
    duration_s: float
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)


class Engine:
    """Continuous-batching engine over one backend; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        profile: ModelProfile | None = None,
    ) -> None:
        """Create an engine (call `await start()` before submitting).

        Args:
            backend: the model runner.
            tokenizer: the model's tokenizer; set to encode special tokens'
                literal text as plain text (`models.tokenizer.text_only`), so a
                prompt or stop string can never become a control token.
            config: engine settings.
            profile: quality tiers and cost model (defaults when None).

        Raises:
            ValueError: a setting is out of range (e.g. a KV budget below one page).
        """
        self.backend = backend
        self.tokenizer = text_only(tokenizer)
        self.config = config or EngineConfig()
        self.model_config: ModelConfig = backend.config
        mc, ec = self.model_config, self.config
        device = getattr(backend, "device", "cpu")
        self.kv = PagedKVCache.for_budget(mc, ec.kv_cache_bytes, ec.page_size, device=device)
        self.scheduler = Scheduler(
            self.kv,
            ec.max_batch_size,
            ec.max_waiting,
            ec.max_prefills,
            ec.max_waiting_per_client,
            ec.fair_quantum,
        )
        if not _is_int(ec.max_consecutive_failures) or ec.max_consecutive_failures < 1:
            raise ValueError(
                f"max_consecutive_failures={ec.max_consecutive_failures!r}: must be an integer >= 1"
            )
        self._prompt_limit = max_prompt_chars(mc, self.tokenizer)
        self._consecutive_failures = 0
        slo = None
        slo_range = ec.slo_range(mc)
        if slo_range is not None:
            prof = profile or ModelProfile.from_dict(mc, None)
            slo = SLOController(
                ec.slo_target_itl_ms / 1000.0,
                *slo_range,
                window=ec.slo_window,
                hysteresis=ec.slo_hysteresis,
                initial_steps=ec.default_steps,
                config=mc,
                cost_model=prof.cost_model,
                ladder=prof.step_ladder(mc, slo_range) if ec.slo_quality_ladder else None,
                target_ttft_s=None if ec.slo_target_ttft_ms is None else ec.slo_target_ttft_ms / 1000.0,
                max_batch_size=ec.max_batch_size,
                max_prefills=ec.max_prefills,
            )
        self.policy = StepPolicy(mc, profile, ec.default_steps, slo)
        self.stats_callbacks: list[StatsCallback] = [] if slo is None else [slo.on_stats]
        try:
            self._eot: int | None = eot_id(tokenizer)
        except ValueError:
            self._eot = None
        self._states: dict[str, _RequestState] = {}
        self._pending_aborts: list[str] = []
        self._state = "created"
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._iterations = 0
        self._finished = 0
        self._tokens = 0
        inline = ec.inline_decode_ms
        if not (_is_number(inline) and 0 <= inline < math.inf):
            raise ValueError(f"inline_decode_ms={inline!r}: must be a number >= 0 (0 = never inline)")
        self._inline_decode_s = inline / 1000.0
        self._last_decode_s = math.inf  # unknown until a decode iteration ran in the worker

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, config: EngineConfig | None = None, backend: str = "torch", **kwargs: Any
    ) -> Engine:
        """Build an engine from a model directory (weights, tokenizer, profile).

        Args:
            model_dir: the model directory.
            config: engine settings.
            backend: "torch" or "onnx".
            **kwargs: passed to `runtime.backends.load_backend`; with
                `compile=True` and no `compile_steps`, the step counts the
                policy picks by itself (`runtime.policy.automatic_steps`).
        """
        from models.checkpoint import TOKENIZER_FILE, load_config
        from models.tokenizer import load_tokenizer
        from runtime.backends import load_backend

        model_config = load_config(model_dir)
        profile = ModelProfile.load(model_config, model_dir)
        if kwargs.get("compile") and kwargs.get("compile_steps") is None:
            # Whole-decode graphs for the step counts this engine's policy picks by itself.
            ec = config or EngineConfig()
            slo = ec.slo_range(model_config)
            kwargs["compile_steps"] = automatic_steps(model_config, profile, ec.default_steps, slo)
        be = load_backend(model_dir, backend, **kwargs)
        tok = load_tokenizer(Path(model_dir) / TOKENIZER_FILE)
        return cls(be, tok, config, profile)

    # --- lifecycle -----------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    async def start(self) -> None:
        """Start the background loop (idempotent while running)."""
        if self._state == "running":
            return
        if self._state != "created":
            raise EngineUnavailableError(f"engine is {self._state}; create a new one")
        self._wakeup = asyncio.Event()
        # One worker thread: forwards are serialised anyway, and torch uses its
        # own intra-op threads inside each forward.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leanserve-forward")
        self._state = "running"
        self._task = asyncio.create_task(self._run(), name="leanserve-engine")

    async def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop the engine.

        Args:
            drain: finish the requests already accepted (new ones are refused
                with `EngineUnavailableError` meanwhile); False fails them at
                once with `EngineUnavailableError`.
            timeout_s: with `drain`, give up draining after this long and fail
                what is left.
        """
        if self._state in ("created", "stopped", "dead"):
            self._state = "stopped" if self._state != "dead" else "dead"
            return
        if drain:
            self._state = "draining"
            self._wake()
            if self._task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        self._state = "stopped"
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(EngineUnavailableError("engine stopped before the request finished"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # --- requests ------------------------------------------------------------
    async def submit_async(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """`submit`, with a long text prompt tokenised in a thread first (what servers call).

        The prompt's cheap checks (type, size limit, Unicode) run first, so an
        oversized prompt is refused before any work; tokenising a prompt longer
        than `EngineConfig.tokenize_inline_chars` then runs off the event loop.

        Raises:
            Whatever `submit` raises.
        """
        text, prompt_ids = request.prompt, None
        if (
            self._state == "running"
            and isinstance(text, str)
            and request.prompt_token_ids is None
            and len(text) > self.config.tokenize_inline_chars
        ):
            check_prompt_text(text, self._prompt_limit)
            prompt_ids = await asyncio.to_thread(self._encode_ids, text)
        return self.submit(request, prompt_ids=prompt_ids)

    def _encode_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def submit(
        self, request: GenerationRequest, prompt_ids: list[int] | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; return its stream of outputs.

        Validation, policy and queueing happen synchronously, so a bad or
        rejected request raises here, before any iterator exists. Closing the
        iterator early (or cancelling the task that consumes it) cancels the
        request. Servers call `submit_async`, which tokenises long prompts off
        the event loop.

        Args:
            request: the request.
            prompt_ids: the text prompt already tokenised (by `submit_async`).

        Raises:
            EngineUnavailableError: the engine is not running (or draining).
            InvalidRequestError: a field is invalid.
            DeadlineExceededError: the request's deadline has already passed.
            OverloadedError: the waiting queue is full.
        """
        if self._state != "running":
            raise EngineUnavailableError(f"engine is {self._state}; not accepting requests")
        if request.request_id in self._states:
            raise InvalidRequestError("request_id", request.request_id, "must be unique among live requests")
        prompt_ids = validate_request(
            request, self.model_config, self.tokenizer, self.policy.tiers, self._prompt_limit, prompt_ids
        )
        if request.deadline is not None and request.deadline <= time.monotonic():
            raise DeadlineExceededError(f"request {request.request_id!r}: deadline passed before submission")
        s = request.sampling
        decision = self.policy.decide(
            request.compute, len(prompt_ids), s.max_tokens, batch=self.scheduler.num_running + 1
        )
        need = self.kv.pages_needed(decision.steps, len(prompt_ids) + s.max_tokens)
        if need > self.kv.num_pages:
            fit = self.kv.num_pages // decision.steps * self.kv.page_size - len(prompt_ids)
            raise InvalidRequestError(
                "max_tokens",
                s.max_tokens,
                f"at steps={decision.steps} the KV cache ({self.kv.capacity_bytes} bytes) holds at most "
                f"{max(fit, 0)} new tokens after this {len(prompt_ids)}-token prompt",
            )
        stop_ids = set(s.stop_token_ids)
        if self._eot is not None and not s.ignore_eos:
            stop_ids.add(self._eot)
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_tokens=s.max_tokens,
            steps=decision.steps,
            experts=decision.model_experts,
            stop_token_ids=frozenset(stop_ids),
            arrival_time=request.arrival_time,
            client_id=request.client_id,
            priority=request.priority,
        )
        self.scheduler.add(seq)  # raises OverloadedError when the queue is full
        state = _RequestState(
            request=request,
            seq=seq,
            decision=decision,
            stream=TextStream(self.tokenizer, prompt_ids, s.stop),
            generator=None if is_greedy(s) else make_generator(s.seed),
            adjust=LogitAdjust.for_params(s),
        )
        self._states[request.request_id] = state
        self._wake()
        return self._stream(state)

    async def _stream(self, state: _RequestState) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await state.outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            # The consumer left early (closed the iterator or was cancelled).
            if not state.done:
                self.cancel(state.request.request_id)

    async def generate(self, request: GenerationRequest) -> RequestOutput:
        """Run a request to completion and return one aggregated output.

        Raises:
            RequestCancelledError: the request was cancelled.
            Any error `submit` or the stream raises.
        """
        text, ids, last = [], [], None
        async for out in self.submit(request):
            text.append(out.text)
            ids.extend(out.token_ids)
            last = out
        assert last is not None
        if last.finish_reason == "cancelled":
            raise RequestCancelledError(f"request {request.request_id!r} was cancelled")
        last.text, last.token_ids = "".join(text), ids
        return last

    def cancel(self, request_id: str) -> bool:
        """Cancel a live request; its KV is freed at the next iteration boundary.

        Returns:
            True if the request was live.
        """
        state = self._states.get(request_id)
        if state is None or state.done:
            return False
        if self._state in ("running", "draining"):
            self._pending_aborts.append(request_id)
            self._wake()
        else:  # no loop to defer to
            self._abort(request_id)
        return True

    def stats(self) -> EngineStats:
        """A snapshot of queue, KV and throughput counters."""
        return EngineStats(
            state=self._state,
            model=self.model_config.name,
            backend=getattr(self.backend, "name", type(self.backend).__name__),
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_used_bytes=self.kv.used_bytes,
            kv_capacity_bytes=self.kv.capacity_bytes,
            kv_free_pages=self.kv.free_pages,
            iterations=self._iterations,
            requests_finished=self._finished,
            tokens_generated=self._tokens,
            default_steps=self.policy.default_steps,
            slo=None if self.policy.slo is None else self.policy.slo.snapshot(),
        )

    # --- the loop --------------------------------------------------------------
    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        try:
            while True:
                self._apply_aborts()
                self._expire_deadlines()
                if self._state == "draining" and not self.scheduler.has_work():
                    return
                out = self.scheduler.schedule()
                if out.is_empty:
                    self._wakeup.clear()
                    # Waiting requests with nothing running cannot happen (a
                    # request that can never fit is rejected at submit), but a
                    # timeout keeps deadlines ticking if it ever did.
                    timeout = 0.05 if self.scheduler.num_waiting else None
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
                    continue
                inline = not out.prefill and self._last_decode_s < self._inline_decode_s
                try:
                    batches = self._prepare(out)
                    if inline:
                        result = self._execute(batches)
                    else:
                        result = await loop.run_in_executor(self._executor, self._execute, batches)
                except Exception as e:
                    if self._iteration_failed(out, e):
                        return
                    continue
                self._consecutive_failures = 0
                if not out.prefill:
                    self._last_decode_s = result.duration_s
                self._process(out, result)
                if inline:
                    # Let the consumers just woken, and I/O that arrived
                    # during the forward, run before the next one.
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug outside the model's iteration: the engine cannot go on
            log.exception("engine loop died")
            self._die(e)

    def _die(self, error: BaseException) -> None:
        """Mark the engine dead (health checks fail at once) and fail every live request."""
        self._state = "dead"
        self._fail_all(
            EngineUnavailableError(f"engine failed ({type(error).__name__}); retry on another replica")
        )

    def _iteration_failed(self, out: SchedulerOutput, error: BaseException) -> bool:
        """An iteration's forward raised: fail its requests only; True when the engine is now dead."""
        self._consecutive_failures += 1
        n = self.config.max_consecutive_failures
        log.error(
            "iteration failed (%d in a row, %d allowed) with %d requests; failing them: %s: %s",
            self._consecutive_failures, n, len(out.sequences), type(error).__name__, error,
            exc_info=error if self._consecutive_failures == 1 else None,
        )  # fmt: skip
        failure = EngineUnavailableError(
            f"the model failed while running this request's batch ({type(error).__name__}); retry"
        )
        for seq in out.sequences:
            state = self._states.get(seq.request_id)
            if state is not None and not state.done:
                self._fail(state, failure)
        if self._consecutive_failures >= n:
            log.error("engine dead after %d failed iterations in a row", n)
            self._die(error)
            return True
        return False

    def _prepare(self, out: SchedulerOutput) -> list[_ForwardBatch]:
        """Event loop: this iteration's forward inputs, so the worker thread never
        reads the scheduler's or the KV pool's bookkeeping while the loop may change it."""
        batches = prefill_groups(out.prefill)
        if out.decode:
            batches.append(out.decode)
        prepared = []
        for seqs in batches:
            ids, positions, last_index = self._inputs(seqs)
            request_ids = [s.request_id for s in seqs]
            states = [self._states[r] for r in request_ids]
            prepared.append(
                _ForwardBatch(
                    request_ids=request_ids,
                    tokens=ids,
                    positions=positions,
                    steps=torch.tensor([s.steps for s in seqs], dtype=torch.long),  # (B,)
                    experts=self._experts_tensor(seqs),
                    kv=self.kv.batch(request_ids),
                    last_index=last_index,
                    sampling=[st.request.sampling for st in states],
                    generators=[st.generator for st in states],
                    adjusts=[st.adjust for st in states],
                    generated=[
                        list(st.seq.output_ids) if st.adjust is not None and st.adjust.uses_history else []
                        for st in states
                    ],
                )
            )
        return prepared

    def _inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Token ids (B, T), positions (B, T) and, with right padding, last_index (B,) of one forward."""
        inputs = [s.next_input() for s in seqs]
        lens = [len(i) for i, _ in inputs]
        T = max(lens)
        ids = torch.tensor([i + [0] * (T - len(i)) for i, _ in inputs], dtype=torch.long)  # (B, T)
        start = torch.tensor([p for _, p in inputs], dtype=torch.long)  # (B,)
        positions = start[:, None] if T == 1 else start[:, None] + torch.arange(T)[None, :]  # (B, T)
        last_index = None
        if min(lens) < T:
            # Right padding: a pad's key/value lands on a slot the row has
            # reserved but not reached (clamped to its last reserved slot),
            # which is overwritten before any query may see it; its logits
            # are never read (last_index picks each row's last real token).
            cap = torch.tensor([self.kv.capacity(s.request_id) for s in seqs], dtype=torch.long)
            positions = torch.minimum(positions, cap[:, None] - 1)
            last_index = torch.tensor(lens, dtype=torch.long) - 1  # (B,)
        return ids, positions, last_index

    def _execute(self, batches: list[_ForwardBatch]) -> _IterationResult:
        """Worker thread: run this iteration's forwards and sample (touches only its inputs)."""
        t0 = time.perf_counter()
        result = _IterationResult({}, [], 0.0)
        counts: torch.Tensor | None = None
        for b in batches:
            res = self.backend.forward(b.tokens, b.positions, b.steps, b.kv, b.experts, True, b.last_index)
            draws = sample_rows(res.logits[:, -1, :], b.sampling, b.generators, b.adjusts, b.generated)
            for request_id, draw in zip(b.request_ids, draws):
                if not isinstance(draw, Draw):
                    result.errors[request_id] = draw
                    continue
                result.tokens[request_id] = draw.token
                if draw.logprob is not None:
                    result.logprobs[request_id] = draw.logprob
            if res.expert_counts is not None:
                c = res.expert_counts.detach().to("cpu", torch.long)
                counts = c if counts is None else counts + c
        result.expert_counts = [] if counts is None else counts.tolist()
        result.duration_s = time.perf_counter() - t0
        return result

    def _experts_tensor(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Per-row expert settings, or None when every row uses the maximum."""
        if all(s.experts is None for s in seqs):
            return None
        top = self.model_config.max_expert_setting
        return torch.tensor([top if s.experts is None else s.experts for s in seqs], dtype=torch.long)

    def _process(self, out: SchedulerOutput, result: _IterationResult) -> None:
        """Event loop: record tokens, detokenise, stream, finish, emit stats."""
        self._iterations += 1
        steps_hist: dict[int, int] = {}
        for seq in out.sequences:
            steps_hist[seq.steps] = steps_hist.get(seq.steps, 0) + 1
        self.scheduler.update(out, result.tokens)
        now = time.monotonic()
        for seq in out.sequences:
            state = self._states.get(seq.request_id)
            if state is None or state.done:
                continue  # aborted while the model ran
            error = result.errors.get(seq.request_id)
            if error is not None:
                log.error("request %r failed: %s", seq.request_id, error)
                self._fail(state, error)
                continue
            if seq.request_id not in result.tokens:
                continue
            try:
                self._deliver(state, seq, result, now)
            except Exception as e:  # this request's text handling failed: only it fails
                log.exception("request %r failed while its output was processed", seq.request_id)
                self._fail(state, RequestFailedError(f"output processing failed ({type(e).__name__})"))
        self._publish(
            IterationStats(
                batch_size=len(result.tokens),
                num_prefill=len(out.prefill),
                num_decode=len(out.decode),
                steps_histogram=steps_hist,
                expert_token_counts=result.expert_counts,
                kv_used_bytes=self.kv.used_bytes,
                kv_capacity_bytes=self.kv.capacity_bytes,
                num_waiting=self.scheduler.num_waiting,
                num_running=self.scheduler.num_running,
                duration_s=result.duration_s,
            )
        )

    def _deliver(self, state: _RequestState, seq: Sequence, result: _IterationResult, now: float) -> None:
        """Event loop: one row's new token -> timings, text, stop strings, the output delta."""
        token = result.tokens[seq.request_id]
        self._tokens += 1
        if state.first_token_time is None:
            state.first_token_time = now
        else:
            itl = now - (state.last_token_time or now)
            state.itls.append(itl)
            if self.policy.slo is not None:
                self.policy.slo.observe(itl, self.scheduler.num_waiting)
        state.last_token_time = now
        if seq.finish_reason == "stop" and token in seq.stop_token_ids:
            text = state.stream.finish()  # the stop token itself has no text
        else:
            text = state.stream.push(token)
            if state.stream.stopped and seq.status is SequenceStatus.RUNNING:
                self.scheduler.finish(seq.request_id, "stop")  # frees KV now
            elif seq.status is SequenceStatus.FINISHED:
                text += state.stream.finish()
        logprob = result.logprobs.get(seq.request_id)
        self._emit(state, text, [token], None if logprob is None else [logprob])

    def _emit(
        self,
        state: _RequestState,
        text: str,
        token_ids: list[int],
        logprobs: list[TokenLogprob] | None = None,
    ) -> None:
        seq, now = state.seq, time.monotonic()
        finished = seq.status is SequenceStatus.FINISHED
        arrival = seq.arrival_time
        state.outputs.put(
            RequestOutput(
                request_id=seq.request_id,
                text=text,
                token_ids=token_ids,
                finished=finished,
                finish_reason=seq.finish_reason if finished else None,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.output_ids),
                steps=seq.steps,
                experts=state.decision.experts,
                policy_reason=state.decision.reason,
                queue_s=None if seq.admitted_time is None else seq.admitted_time - arrival,
                first_token_s=None if state.first_token_time is None else state.first_token_time - arrival,
                total_s=now - arrival,
                logprobs=(logprobs or []) if state.request.sampling.logprobs is not None else None,
            )
        )
        if finished:
            self._finalize(state, seq.finish_reason or "stop")

    def _finalize(self, state: _RequestState, reason: str) -> None:
        state.done = True
        self._states.pop(state.request.request_id, None)
        self._finished += 1
        seq, now = state.seq, time.monotonic()
        self._publish(
            RequestStats(
                request_id=seq.request_id,
                queue_time_s=None if seq.admitted_time is None else seq.admitted_time - seq.arrival_time,
                ttft_s=None if state.first_token_time is None else state.first_token_time - seq.arrival_time,
                itl_s=state.itls,
                total_s=now - seq.arrival_time,
                steps=seq.steps,
                experts=state.decision.experts,
                policy_reason=state.decision.reason,
                prompt_tokens=len(seq.prompt_ids),
                generated_tokens=len(seq.output_ids),
                finish_reason=reason,
            )
        )

    def _publish(self, stats: RequestStats | IterationStats) -> None:
        for callback in list(self.stats_callbacks):
            try:
                callback(stats)
            except Exception:  # a broken subscriber must not kill the engine
                log.exception("stats callback %r failed", callback)

    # --- leaving early -----------------------------------------------------------
    def _apply_aborts(self) -> None:
        pending, self._pending_aborts = self._pending_aborts, []
        for request_id in pending:
            self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        state = self._states.get(request_id)
        if state is None or state.done:
            return
        self.scheduler.abort(request_id)  # releases KV
        self._emit(state, "", [])

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for state in list(self._states.values()):
            deadline = state.request.deadline
            if deadline is not None and now >= deadline and not state.done:
                self._fail(
                    state, DeadlineExceededError(f"request {state.seq.request_id!r}: deadline exceeded")
                )

    def _fail(self, state: _RequestState, error: BaseException) -> None:
        self.scheduler.abort(state.seq.request_id)
        state.outputs.put(error)
        reason = "deadline" if isinstance(error, DeadlineExceededError) else "error"
        self._finalize(state, reason)

    def _fail_all(self, error: BaseException) -> None:
        for state in list(self._states.values()):
            if not state.done:
                self._fail(state, error)

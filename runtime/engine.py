"""The inference engine: the loop, the queues and streaming.

    submit -> validation (runtime/validation.py) -> step policy (runtime/policy.py)
           -> scheduler queue (runtime/scheduler.py)
    _run:  scheduler.schedule() -> runner.prepare (rows -> batch descriptions)
           -> runner.execute (forwards + sampling; runtime/runner.py)
           -> outputs.process (tokens -> text, stop strings, deltas, stats;
              runtime/output_processor.py, runtime/request_state.py)

One `Engine` owns one model runner (the backend and the paged KV pool) and one
scheduler. Requests enter through `submit`, which validates them, chooses
their compute with the step policy, and queues them; the caller gets an async
iterator of `RequestOutput` deltas.

The model runs in a background asyncio task (`_run`): each iteration applies
pending cancellations, asks the scheduler what to run, has the runner build
this iteration's forwards on the event loop, and runs them with sampling in a
single worker thread (so the event loop keeps accepting and streaming while
the model computes; a decode iteration expected to be short,
`EngineConfig.inline_decode_ms`, runs on the loop itself, saving the thread
hand-off), then, back on the loop, hands the results to the output processor
(runtime/output_processor.py), which records the tokens, detokenises, applies
stop strings and pushes deltas to each request's queue. Scheduler and KV state
are only ever mutated on the event loop thread between forwards; the worker
only reads what the runner prepared, which is why a `cancel` is queued and
applied at the start of the next iteration rather than immediately. That
still frees the request's KV within one iteration.

Faults: an iteration whose forward raises fails only its own requests;
`EngineConfig.max_consecutive_failures` in a row mark the engine dead. A bug
in the loop itself (outside a forward) marks it dead at once, failing every
live request, so health checks fail and clients retry elsewhere.

Stats: every finished request produces a `RequestStats` and every iteration
an `IterationStats` (the output processor publishes both); both go to the
callables in `stats_callbacks` (the step
policy and the metrics module subscribe there; nothing here knows about
Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenizers import Tokenizer

from models.config import ModelConfig
from models.tokenizer import eot_id, text_only
from runtime.backends import Backend
from runtime.output_processor import OutputProcessor
from runtime.policy import ModelProfile, StepPolicy, automatic_steps
from runtime.request_state import RequestState
from runtime.runner import ModelRunner, Plan
from runtime.scheduler import Scheduler, SchedulerOutput
from runtime.settings import CompileSpec, EngineConfig
from runtime.speculation import EngineSpeculation
from runtime.types import (
    DeadlineExceededError,
    EngineStats,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    RequestCancelledError,
    RequestOutput,
)
from runtime.validation import check_prompt_text, max_prompt_chars, validate_request

log = logging.getLogger(__name__)
INLINE_YIELDS = 4  # loop turns after an inline decode iteration (see Engine._run)


# ----------------------------------------------------------------------------
# Engine
# ----------------------------------------------------------------------------
class Engine:
    """Continuous-batching engine over one backend; see the module docstring."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        profile: ModelProfile | None = None,
        stop_ids: tuple[int, ...] = (),
    ) -> None:
        """Create an engine (call `await start()` before submitting).

        Args:
            backend: the model runner.
            tokenizer: the model's tokenizer; set to encode special tokens'
                literal text as plain text (`models.tokenizer.text_only`), so a
                prompt or stop string can never become a control token.
            config: engine settings.
            profile: quality tiers and cost model (defaults when None).
            stop_ids: end-of-sequence ids besides the tokenizer's end-of-text token
                (a Hugging Face directory's `generation_config.json`, e.g. Ouro's
                `<|im_end|>`), stop tokens of every request unless `ignore_eos`.

        Raises:
            ValueError: a setting is out of range (e.g. a KV budget below one page).
        """
        self.backend = backend
        self.tokenizer = text_only(tokenizer)
        self.config = config or EngineConfig()
        self.model_config: ModelConfig = backend.config
        mc, ec = self.model_config, self.config
        self.runner = ModelRunner(backend, ec.kv_cache_bytes, ec.page_size)
        self.kv = self.runner.allocator  # the scheduler reserves and releases through it
        self.scheduler = Scheduler(
            self.kv,
            ec.max_batch_size,
            ec.max_waiting,
            ec.max_prefills,
            ec.max_waiting_per_client,
            ec.fair_quantum,
            ec.kv_allocation,  # type: ignore[arg-type]  # the scheduler checks the value
            ec.kv_watermark,
            ec.max_preemptions,
        )
        self._prompt_limit = max_prompt_chars(mc, self.tokenizer)
        self._consecutive_failures = 0
        self.policy = StepPolicy.from_settings(mc, profile, ec)
        try:
            eot: tuple[int, ...] = (eot_id(tokenizer),)
        except ValueError:
            eot = ()
        self._eot: tuple[int, ...] = tuple(dict.fromkeys(eot + tuple(stop_ids)))
        self._pending_aborts: list[str] = []
        self._state = "created"
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inline_decode_s = ec.inline_decode_ms / 1000.0
        self._last_decode_s = math.inf  # unknown until a decode iteration ran in the worker
        self.speculation = EngineSpeculation(mc, ec, self.runner)
        self.outputs = OutputProcessor(self.scheduler, self.kv, self.policy, self.speculation)
        # Subscribers to every RequestStats and IterationStats (the step policy is the first).
        self.stats_callbacks = self.outputs.stats_callbacks
        self._states = self.outputs.states  # the live requests, by id

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        backend: str = "torch",
        compile: CompileSpec | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> Engine:
        """Build an engine from a model directory (weights, tokenizer, profile).

        Args:
            model_dir: the model directory.
            config: engine settings.
            backend: "torch" or "onnx".
            compile: the torch backend's compiled decode; its "auto" step
                counts resolve here to the ones this engine's policy picks by
                itself (`runtime.policy.automatic_steps`). None = eager.
            device: torch device of the weights and the KV pool.
            dtype: "float32" or "bfloat16", of the weights and the KV pool
                (`runtime.backends.load_backend`).
        """
        from models.checkpoint import TOKENIZER_FILE, generation_stop_ids, load_config
        from models.tokenizer import load_tokenizer
        from runtime.backends import load_backend

        model_config = load_config(model_dir)
        profile = ModelProfile.load(model_config, model_dir)
        if compile is not None:
            ec = config or EngineConfig()
            auto = automatic_steps(model_config, profile, ec.default_steps, ec.slo_range(model_config))
            compile = dataclasses.replace(compile, steps=compile.graph_steps(model_config, auto))
        be = load_backend(model_dir, backend, device=device, compile=compile, dtype=dtype)
        tok = load_tokenizer(Path(model_dir) / TOKENIZER_FILE)
        stops = generation_stop_ids(model_dir, model_config.vocab_size)
        return cls(be, tok, config, profile, stops)

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
        self.outputs.fail_all(EngineUnavailableError("engine stopped before the request finished"))
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
        compute = request.compute
        if compute.exit_threshold is not None:
            # The threshold exit reads every loop's state: all of them unless `steps` says
            # fewer, and no speculation (validate_request refused an explicit draft).
            steps = compute.steps if compute.steps is not None else self.model_config.step_range[1]
            compute = dataclasses.replace(compute, steps=steps, draft_steps=0)
        decision = self.policy.decide(
            compute, len(prompt_ids), s.max_tokens, batch=self.scheduler.num_running + 1
        )
        spec = self.speculation.admit(
            compute, decision.steps, len(prompt_ids), s.max_tokens, request.request_id, decision.min_steps
        )  # checks the KV fits (with the draft's entries; at the memory dial's floor)
        state = RequestState.create(request, prompt_ids, decision, self.tokenizer, self._eot, spec)
        seq = state.seq
        self.scheduler.add(seq)  # raises OverloadedError when the queue is full
        self.outputs.add(state)
        self._wake()
        return self._stream(state)

    async def _stream(self, state: RequestState) -> AsyncIterator[RequestOutput]:
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
            self.outputs.abort(request_id)
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
            iterations=self.outputs.iterations,
            requests_finished=self.outputs.finished,
            tokens_generated=self.outputs.tokens,
            default_steps=self.policy.default_steps,
            slo=None if self.policy.slo is None else self.policy.slo.snapshot(),
            policy=self.policy.snapshot(),
            kv_pages_used=self.scheduler.kv_pages_used,
            kv_pages_reserved=self.kv.num_pages - self.kv.free_pages,
            kv_pages_capacity=self.kv.num_pages,
            preemptions_total=self.scheduler.num_preemptions,
            recomputed_tokens_total=self.scheduler.recomputed_tokens,
            kv_lowered_total=self.scheduler.num_steps_lowered,
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
                self.outputs.expire_deadlines()
                if self._state == "draining" and not self.scheduler.has_work():
                    return
                out = self.scheduler.schedule()
                self.outputs.after_preemption(out)
                if out.is_empty:
                    if out.preempted or out.failed:
                        continue  # admission resumes next iteration
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
                    plan = self._prepare(out)
                    if inline:
                        result = self.runner.execute(plan)
                    else:
                        result = await loop.run_in_executor(self._executor, self.runner.execute, plan)
                except Exception as e:
                    if self._iteration_failed(out, e):
                        return
                    continue
                self._consecutive_failures = 0
                if not out.prefill:
                    self._last_decode_s = result.duration_s
                self.outputs.process(out, result)
                if inline:
                    # Let the consumers just woken, and I/O that arrived during the
                    # forward, run before the next one. One turn of the loop moves a
                    # token's delta one await further (queue -> stream -> SSE -> Ray's
                    # transport); with one turn, HTTP events left in bursts at small
                    # step counts (openai client, ode-tiny N=2: 15-26 of 189 gaps under
                    # 0.1 ms, p90 12-15 ms); with INLINE_YIELDS turns every event leaves
                    # on its own (0 of 189, p50/p90/mean 2.6/3.8/2.8 ms, against
                    # 0.35/15.1/3.8 with one turn and 2.8/5.1/3.0 with inline_decode_ms=0).
                    for _ in range(INLINE_YIELDS):
                        await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug outside the model's iteration: the engine cannot go on
            log.exception("engine loop died")
            self._die(e)

    def _die(self, error: BaseException) -> None:
        """Mark the engine dead (health checks fail at once) and fail every live request."""
        self._state = "dead"
        self.outputs.fail_all(
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
        self.outputs.fail_batch(out, failure)
        if self._consecutive_failures >= n:
            log.error("engine dead after %d failed iterations in a row", n)
            self._die(error)
            return True
        return False

    def _prepare(self, out: SchedulerOutput) -> Plan:
        """Event loop: this iteration's rows and forwards (`ModelRunner.prepare`), so the
        worker thread never reads the scheduler's or the allocator's state while the loop may change it."""
        batch = len(out.sequences)
        states = self._states
        rows = [states[seq.request_id].row() for seq in out.prefill]
        for seq in out.decode:
            state = states[seq.request_id]
            if state.spec is None:
                rows.append(state.row())
                continue
            remaining = seq.max_tokens - len(seq.output_ids)
            rows.append(state.row(self.speculation.draft_tokens(state.spec, seq.steps, remaining, batch)))
        return self.runner.prepare(rows)

    # --- leaving early -----------------------------------------------------------
    def _apply_aborts(self) -> None:
        pending, self._pending_aborts = self._pending_aborts, []
        for request_id in pending:
            self.outputs.abort(request_id)

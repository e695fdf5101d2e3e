"""What happens to an iteration's results on the event loop: tokens -> text -> deltas -> stats.

    Engine._run: runner.execute -> OutputProcessor.process
        per row: scheduler.update/commit (KV, finish on max_tokens or stop token)
                 -> RequestState (detokenise, stop strings, timings)
                 -> the request's output queue (what `Engine.submit`'s iterator reads)
        per iteration: IterationStats; per finished request: RequestStats
                 -> `stats_callbacks` (step policy, SLO controller, Prometheus metrics)

`OutputProcessor` owns the live requests (`states`) and every way a request
leaves: finishing, aborting (a cancel, applied between forwards), failing
(its forward raised, its deadline passed, it was preempted too often, its
text handling raised), and the engine stopping. Each of those frees the
request's KV through the scheduler and ends its stream exactly once. It runs
only on the event loop thread, between forwards, like the scheduler it
updates; the engine's loop (runtime/engine.py) decides when.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from models.kv_cache import PageAllocator
from runtime.policy import StepPolicy
from runtime.request_state import RequestState
from runtime.runner import IterationResult
from runtime.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from runtime.speculation import EngineSpeculation, SpecOutcome
from runtime.types import (
    DeadlineExceededError,
    IterationStats,
    RequestFailedError,
    RequestStats,
    TokenLogprob,
)

log = logging.getLogger(__name__)

StatsCallback = Callable[[RequestStats | IterationStats], None]


class OutputProcessor:
    """The live requests and their outputs; see the module docstring."""

    def __init__(
        self, scheduler: Scheduler, kv: PageAllocator, policy: StepPolicy, speculation: EngineSpeculation
    ) -> None:
        """Args: the engine's scheduler, page allocator, step policy (its `on_stats`
        subscribes first; its SLO controller observes inter-token latencies) and
        speculation (accounts each speculative round)."""
        self.scheduler = scheduler
        self.kv = kv
        self.policy = policy
        self.speculation = speculation
        self.states: dict[str, RequestState] = {}
        self.stats_callbacks: list[StatsCallback] = [policy.on_stats]
        self.iterations = 0
        self.finished = 0
        self.tokens = 0

    def add(self, state: RequestState) -> None:
        """A request the scheduler has just queued."""
        self.states[state.request.request_id] = state

    def live(self, request_id: str) -> RequestState | None:
        """The request's state while it has not finished, else None."""
        state = self.states.get(request_id)
        return None if state is None or state.done else state

    # --- an iteration's results --------------------------------------------------
    def process(self, out: SchedulerOutput, result: IterationResult) -> None:
        """Record tokens, detokenise, stream, finish, emit stats."""
        self.iterations += 1
        steps_hist: dict[int, int] = {}
        for seq in out.sequences:
            steps_hist[seq.steps] = steps_hist.get(seq.steps, 0) + 1
        self.scheduler.update(out, result.tokens)
        now = time.monotonic()
        spec_counts: dict[tuple[int, str], tuple[int, int]] = {}
        for seq in out.sequences:
            state = self.live(seq.request_id)
            if state is None:
                continue  # aborted while the model ran
            error = result.errors.get(seq.request_id)
            if error is not None:
                log.error("request %r failed: %s", seq.request_id, error)
                self.fail(state, error)
                continue
            outcome = result.spec.get(seq.request_id)
            if outcome is None and seq.request_id not in result.tokens:
                continue
            try:
                if outcome is not None:
                    self._deliver_round(state, seq, outcome, now, spec_counts)
                else:
                    self._deliver(state, seq, result, now)
            except Exception as e:  # this request's text handling failed: only it fails
                log.exception("request %r failed while its output was processed", seq.request_id)
                self.fail(state, RequestFailedError(f"output processing failed ({type(e).__name__})"))
        self.publish(
            IterationStats(
                batch_size=len(result.tokens) + len(result.spec),
                num_prefill=len(out.prefill),
                num_decode=len(out.decode),
                steps_histogram=steps_hist,
                expert_token_counts=result.expert_counts,
                kv_used_bytes=self.kv.used_bytes,
                kv_capacity_bytes=self.kv.capacity_bytes,
                num_waiting=self.scheduler.num_waiting,
                num_running=self.scheduler.num_running,
                duration_s=result.duration_s,
                kv_pages_used=self.scheduler.kv_pages_used,
                kv_pages_reserved=self.kv.num_pages - self.kv.free_pages,
                kv_pages_capacity=self.kv.num_pages,
                preemptions_total=self.scheduler.num_preemptions,
                recomputed_tokens_total=self.scheduler.recomputed_tokens,
                kv_lowered_total=self.scheduler.num_steps_lowered,
                speculation=spec_counts,
                num_speculating=len(result.spec),
            )
        )

    def _deliver(self, state: RequestState, seq: Sequence, result: IterationResult, now: float) -> None:
        """One row's new token -> timings, text, stop strings, the output delta."""
        token = result.tokens[seq.request_id]
        self.tokens += 1
        state.loops_run += result.loops.get(seq.request_id, seq.steps)
        self._observe(state.record_token(now))
        text, stopped = state.text_for(token)
        if stopped:
            self.scheduler.finish(seq.request_id, "stop")  # frees KV now
        logprob = result.logprobs.get(seq.request_id)
        self._emit(state, text, [token], None if logprob is None else [logprob])

    def _deliver_round(
        self,
        state: RequestState,
        seq: Sequence,
        outcome: SpecOutcome,
        now: float,
        counts: dict[tuple[int, str], tuple[int, int]],
    ) -> None:
        """A speculative round's tokens, committed one at a time as a plain decode would
        (a stop token, `max_tokens` or a stop string ends it at that token)."""
        spec = state.spec
        assert spec is not None
        if seq.status is not SequenceStatus.RUNNING:
            return  # aborted while the model ran
        self.speculation.account(spec, seq.num_cached, outcome, counts)
        texts, tokens = [], []
        for token in outcome.tokens:
            finished = self.scheduler.commit(seq, token, 1)
            tokens.append(token)
            text, stopped = state.text_for(token)
            texts.append(text)
            if stopped:
                self.scheduler.finish(seq.request_id, "stop")
            if finished or stopped:
                break
        self.tokens += len(tokens)
        self._observe(state.record_tokens(now, len(tokens)))
        logprobs = None if outcome.logprobs is None else outcome.logprobs[: len(tokens)]
        self._emit(state, "".join(texts), tokens, logprobs)

    def _observe(self, itl: float | None) -> None:
        if itl is not None and self.policy.slo is not None:
            self.policy.slo.observe(itl, self.scheduler.num_waiting)

    def _emit(
        self, state: RequestState, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None = None
    ) -> None:
        out = state.output(text, token_ids, logprobs)
        state.outputs.put(out)
        if out.finished:
            self._finalize(state, state.seq.finish_reason or "stop")

    def _finalize(self, state: RequestState, reason: str) -> None:
        state.done = True
        self.states.pop(state.request.request_id, None)
        self.finished += 1
        self.publish(state.stats(reason))

    def publish(self, stats: RequestStats | IterationStats) -> None:
        """Hand `stats` to every subscriber; a broken one is logged, never raised."""
        for callback in list(self.stats_callbacks):
            try:
                callback(stats)
            except Exception:  # a broken subscriber must not kill the engine
                log.exception("stats callback %r failed", callback)

    # --- leaving early -------------------------------------------------------------
    def after_preemption(self, out: SchedulerOutput) -> None:
        """A preempted request's draft starts over with its KV; one preempted past
        `max_preemptions` fails with an error naming the cause."""
        for seq in out.preempted:
            state = self.states.get(seq.request_id)
            if state is not None and state.spec is not None:
                state.spec.cached = 0  # the draft's KV was freed too: its next round catches up
        for seq in out.failed:
            state = self.live(seq.request_id)
            if state is not None:
                self.fail(
                    state,
                    RequestFailedError(
                        f"request {seq.request_id!r}: preempted {seq.preemptions} times for lack of KV "
                        f"memory (max_preemptions={self.scheduler.max_preemptions}); retry"
                    ),
                )

    def fail_batch(self, out: SchedulerOutput, error: BaseException) -> None:
        """The iteration's forward raised: fail the requests it ran, and only those."""
        for seq in out.sequences:
            state = self.live(seq.request_id)
            if state is not None:
                self.fail(state, error)

    def abort(self, request_id: str) -> None:
        """End a cancelled request's stream with a final `cancelled` delta; frees its KV."""
        state = self.live(request_id)
        if state is None:
            return
        self.scheduler.abort(request_id)  # releases KV
        self._emit(state, "", [])

    def expire_deadlines(self) -> None:
        """Fail every request whose deadline has passed."""
        now = time.monotonic()
        for state in list(self.states.values()):
            deadline = state.request.deadline
            if deadline is not None and now >= deadline and not state.done:
                self.fail(
                    state, DeadlineExceededError(f"request {state.seq.request_id!r}: deadline exceeded")
                )

    def fail(self, state: RequestState, error: BaseException) -> None:
        """End the request's stream with `error` (raised to its consumer); frees its KV."""
        self.scheduler.abort(state.seq.request_id)
        state.outputs.put(error)
        reason = "deadline" if isinstance(error, DeadlineExceededError) else "error"
        self._finalize(state, reason)

    def fail_all(self, error: BaseException) -> None:
        """Fail every live request (the engine stopped or died)."""
        for state in list(self.states.values()):
            if not state.done:
                self.fail(state, error)

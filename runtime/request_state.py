"""One live request as the engine tracks it: its output queue, its text stream, its timings.

The engine (runtime/engine.py) keeps a `RequestState` per live request next to
its scheduler `Sequence`. Everything a client sees of the request is made
here, from one set of timestamps, so the streamed `RequestOutput` deltas and
the final `RequestStats` can never disagree:

    queue_s        admission - arrival
    first_token_s  first token - arrival (time to first token)
    total_s        now - arrival
    itls           gaps between consecutive tokens
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from runtime.policy import PolicyDecision
from runtime.runner import Row
from runtime.sampling import LogitAdjust, TextStream, is_greedy, make_generator
from runtime.scheduler import Sequence, SequenceStatus
from runtime.speculation import SpecState
from runtime.types import GenerationRequest, RequestOutput, RequestStats, TokenLogprob


class Outputs:
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
class RequestState:
    """Everything the engine tracks for one live request besides its Sequence."""

    request: GenerationRequest
    seq: Sequence
    decision: PolicyDecision
    stream: TextStream
    generator: torch.Generator | None
    adjust: LogitAdjust | None = None
    outputs: Outputs = field(default_factory=Outputs)
    first_token_time: float | None = None
    last_token_time: float | None = None
    itls: list[float] = field(default_factory=list)
    done: bool = False
    spec: SpecState | None = None
    loops_run: int = 0  # loops computed over the generated tokens (requests with an exit threshold)

    @classmethod
    def create(
        cls,
        request: GenerationRequest,
        prompt_ids: list[int],
        decision: PolicyDecision,
        tokenizer: Tokenizer,
        eot: int | tuple[int, ...] | None,
        spec: SpecState | None = None,
    ) -> RequestState:
        """The state and scheduler `Sequence` of a validated request at the policy's decision.

        Args:
            eot: the model's end-of-sequence id or ids (stop tokens unless `ignore_eos`), or None.
            spec: its speculative decoding (runtime/speculation.py), or None.
        """
        s = request.sampling
        stop_ids = set(s.stop_token_ids)
        if eot is not None and not s.ignore_eos:
            stop_ids.update((eot,) if isinstance(eot, int) else eot)
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
            draft_steps=0 if spec is None else spec.draft_steps,
            min_steps=decision.min_steps,  # the scheduler never lowers a speculating sequence
        )
        return cls(
            request=request,
            seq=seq,
            decision=decision,
            stream=TextStream(tokenizer, prompt_ids, s.stop),
            generator=None if is_greedy(s) else make_generator(s.seed),
            adjust=LogitAdjust.for_params(s),
            spec=spec,
        )

    def row(self, draft_tokens: int = 0) -> Row:
        """This iteration's share of the request for the model runner.

        Args:
            draft_tokens: run a speculative round drafting this many tokens
                (a prefilled, speculating request only; 0 = one token as usual).
        """
        seq = self.seq
        tokens, start = seq.next_input()
        history = list(seq.output_ids) if self.adjust is not None and self.adjust.uses_history else []
        draft = None
        if draft_tokens and self.spec is not None and seq.is_prefilled:
            draft = self.spec.round(self._span(self.spec.cached, start + 1), draft_tokens)
        return Row(
            seq.request_id,
            tokens,
            start,
            seq.steps,
            seq.experts,
            self.request.sampling,
            self.generator,
            self.adjust,
            history,
            draft,
            self.request.compute.exit_threshold,
            self.request.compute.exit_mode == "stop_early",
        )

    @property
    def policy_reason(self) -> str:
        """Why it runs its steps: the policy's reason, with "+kv" when admission lowered
        them for lack of KV (the memory dial, runtime/scheduler.py)."""
        reason = self.decision.reason
        return reason if self.seq.steps == self.decision.steps else reason + "+kv"

    def _span(self, lo: int, hi: int) -> list[int]:
        """The ids at positions lo..hi-1 of prompt + generated (copies only those)."""
        seq = self.seq
        n = len(seq.prompt_ids)
        if lo >= n:
            return seq.output_ids[lo - n : hi - n]
        return (seq.prompt_ids + seq.output_ids)[lo:hi]

    def record_tokens(self, now: float, n: int) -> float | None:
        """Note `n` tokens that arrived together (a speculative round): the gap since the
        previous token is divided among them, so inter-token latencies stay per token.

        Returns:
            That per-token gap, or None when the first token is among them and nothing
            came before (the tokens after it then count the round's time as 0).
        """
        if n == 1:
            return self.record_token(now)
        if self.first_token_time is None:
            self.record_token(now)
            self.itls.extend([0.0] * (n - 1))
            self.last_token_time = now
            return None
        itl = (now - (self.last_token_time or now)) / n
        self.itls.extend([itl] * n)
        self.last_token_time = now
        return itl

    def record_token(self, now: float) -> float | None:
        """Note a new token's time; the inter-token gap, or None for the first token."""
        itl = None
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            itl = now - (self.last_token_time or now)
            self.itls.append(itl)
        self.last_token_time = now
        return itl

    def text_for(self, token: int) -> tuple[str, bool]:
        """The text a new token adds, and whether a stop string has now ended the request."""
        seq = self.seq
        if seq.finish_reason == "stop" and token in seq.stop_token_ids:
            return self.stream.finish(), False  # the stop token itself has no text
        text = self.stream.push(token)
        if self.stream.stopped and seq.status is SequenceStatus.RUNNING:
            return text, True
        if seq.status is SequenceStatus.FINISHED:
            text += self.stream.finish()
        return text, False

    def _timings(self, now: float) -> tuple[float | None, float | None, float]:
        """(queue_s, first_token_s, total_s), each since arrival."""
        seq = self.seq
        arrival = seq.arrival_time
        queue = None if seq.admitted_time is None else seq.admitted_time - arrival
        first = None if self.first_token_time is None else self.first_token_time - arrival
        return queue, first, now - arrival

    def output(
        self, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        """The delta a client receives now."""
        seq = self.seq
        finished = seq.status is SequenceStatus.FINISHED
        queue, first, total = self._timings(time.monotonic())
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=len(seq.output_ids),
            steps=seq.steps,
            experts=self.decision.experts,
            policy_reason=self.policy_reason,
            queue_s=queue,
            first_token_s=first,
            total_s=total,
            logprobs=(logprobs or []) if self.request.sampling.logprobs is not None else None,
            speculation=None if self.spec is None else dataclasses.replace(self.spec.report),
            mean_loops=self._mean_loops(),
        )

    def _mean_loops(self) -> float | None:
        """Loops computed per generated token so far (requests with an exit threshold), else None."""
        n = len(self.seq.output_ids)
        if self.request.compute.exit_threshold is None or n == 0:
            return None
        return self.loops_run / n

    def stats(self, reason: str) -> RequestStats:
        """The record of the request when it leaves the engine (same timings as `output`)."""
        seq = self.seq
        queue, first, total = self._timings(time.monotonic())
        return RequestStats(
            request_id=seq.request_id,
            queue_time_s=queue,
            ttft_s=first,
            itl_s=self.itls,
            total_s=total,
            steps=seq.steps,
            experts=self.decision.experts,
            policy_reason=self.policy_reason,
            prompt_tokens=len(seq.prompt_ids),
            generated_tokens=len(seq.output_ids),
            finish_reason=reason,
            predicted_s=self.decision.predicted_s,
            speculation=None if self.spec is None else dataclasses.replace(self.spec.report),
        )

"""Iteration-level continuous batching, with no model in sight.

Design
------
The engine runs a loop of *iterations*. Each iteration the scheduler is asked
`schedule() -> SchedulerOutput` (which sequences to prefill, which to
decode), the engine runs the model and samples one token per scheduled row,
and hands the tokens back with `update(output, tokens)`. Exactly like vLLM's
`schedule()` / `update_from_output()`, the scheduler never sees a tensor, so
its tests build "model outputs" (a dict of sampled token ids) by hand.

Queues. A sequence is WAITING (in a FIFO of at most `max_waiting` entries;
`add` raises `OverloadedError` when it is full, so overload is rejected at the
edge instead of growing latency without bound), then RUNNING (holds its KV
reservation), then FINISHED (gone from both queues, KV released).

Admission (start of `schedule`). The head of the waiting queue is admitted
while (a) fewer than `max_batch_size` sequences run and (b) the KV pool has
the pages for its whole reservation: `steps x (prompt + max_tokens)` tokens
(`PagedKVCache.pages_needed`). Reserving the whole request up front means a
running sequence can never run out of KV mid-generation, so there is no
preemption and no recomputation. Admission is strict FCFS: if the head does
not fit, nobody behind it is admitted, even a smaller request that would fit
(no head-of-line skipping at all). That keeps latency fair and starvation-free;
the price is some idle KV while a large request waits for pages. A request
that could never fit the pool is rejected at validation (engine), so the head
always fits eventually. At most `max_prefills` sequences are admitted per
iteration, which bounds how long one iteration's prefills can stall the decode
rows (their inter-token latency).

Prefill then decode. Newly admitted sequences are prefilled this iteration
(their whole prompt in one forward; the engine groups equal-length prompts,
because rows of one forward share T) and each yields its first token.
Sequences admitted in earlier iterations decode one token each, all in one
T = 1 forward. Rows with different step counts and expert settings decode
together: the model runs iteration i of the trunk only over rows whose step
count exceeds i (DESIGN.md), so nothing is padded. A sequence's step count
and expert setting are fixed at admission (its KV holds one entry per step).

Leaving. `update` appends each sampled token and finishes a sequence on a stop
token id or at `max_tokens`; the engine may also finish one on a stop string
(`finish`) or cancel it (`abort`). Every way out releases the sequence's KV
at once, so the pages are free for the admission at the start of the very next
iteration. New requests join between iterations (`add` at any time; they are
admitted by the next `schedule`).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from runtime.types import FinishReason, OverloadedError


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Scheduling state of one request.

    Attributes:
        request_id: the request.
        prompt_ids: prompt token ids (non-empty).
        max_tokens: tokens to generate at most.
        steps: Euler steps (fixed for the sequence's life).
        experts: expert setting for the model (None = the model's maximum).
        stop_token_ids: ids that finish the sequence with reason "stop".
        arrival_time: `time.monotonic()` of arrival.
        output_ids: generated ids so far.
        num_cached: tokens whose keys/values are in the KV cache.
        status: where the sequence is.
        finish_reason: set when finished.
        admitted_time: `time.monotonic()` of admission.
    """

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    steps: int
    experts: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    admitted_time: float | None = None

    @property
    def reserved_tokens(self) -> int:
        """Tokens the KV reservation covers: the prompt plus every new token."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def is_prefilled(self) -> bool:
        return self.num_cached > 0

    def next_input(self) -> tuple[list[int], int]:
        """Token ids to feed next and the position of the first of them.

        Prefill feeds the whole prompt at position 0; decode feeds the last
        generated token at the position right after the cached ones.
        """
        if not self.is_prefilled:
            return self.prompt_ids, 0
        return [self.output_ids[-1]], self.num_cached


class KVAllocator(Protocol):
    """The part of `models.kv_cache.PagedKVCache` the scheduler uses."""

    @property
    def free_pages(self) -> int: ...

    def pages_needed(self, steps: int, tokens: int) -> int: ...

    def reserve(self, seq_id: object, steps: int, tokens: int) -> None: ...

    def release(self, seq_id: object) -> None: ...


@dataclass
class SchedulerOutput:
    """What one iteration runs.

    Attributes:
        prefill: sequences admitted this iteration; their prompts are run.
        decode: sequences that feed their last token (T = 1).
    """

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def sequences(self) -> list[Sequence]:
        return self.prefill + self.decode


class Scheduler:
    """FCFS continuous-batching scheduler over a paged KV allocator."""

    def __init__(
        self, kv: KVAllocator, max_batch_size: int = 32, max_waiting: int = 256, max_prefills: int = 8
    ) -> None:
        """Create a scheduler.

        Args:
            kv: the KV page allocator (a `PagedKVCache`).
            max_batch_size: most sequences running (holding KV) at once.
            max_waiting: most sequences waiting; more raise `OverloadedError`.
            max_prefills: most sequences admitted (prefilled) per iteration.
        """
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_waiting", max_waiting),
            ("max_prefills", max_prefills),
        ):
            if value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_prefills = max_prefills
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}

    # --- queries -------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    # --- joining -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it is admitted by a later `schedule`.

        Raises:
            OverloadedError: `max_waiting` sequences already wait.
            ValueError: a live sequence has the same request id.
        """
        if seq.request_id in self._by_id:
            raise ValueError(f"request_id={seq.request_id!r}: a request with this id is already live")
        if len(self.waiting) >= self.max_waiting:
            raise OverloadedError(f"waiting queue is full ({self.max_waiting} requests); retry later")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_id[seq.request_id] = seq

    # --- one iteration -------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Admit from the waiting queue (strict FCFS) and list this iteration's rows."""
        # Everything already running and prefilled decodes; listed before
        # admission so that admitted sequences are not decoded before prefill.
        out = SchedulerOutput(decode=[s for s in self.running if s.is_prefilled])
        now = time.monotonic()
        while (
            self.waiting and len(self.running) < self.max_batch_size and len(out.prefill) < self.max_prefills
        ):
            head = self.waiting[0]
            if self.kv.pages_needed(head.steps, head.reserved_tokens) > self.kv.free_pages:
                break  # strict FCFS: nobody overtakes the head
            self.kv.reserve(head.request_id, head.steps, head.reserved_tokens)
            self.waiting.popleft()
            head.status = SequenceStatus.RUNNING
            head.admitted_time = now
            self.running.append(head)
            out.prefill.append(head)
        return out

    def update(self, output: SchedulerOutput, tokens: Mapping[str, int]) -> list[Sequence]:
        """Record the tokens sampled for `output`'s rows.

        Rows missing from `tokens`, or no longer running (aborted while the
        model ran), are skipped. A sequence finishes on a stop token id
        (reason "stop") or when it has `max_tokens` tokens ("length"); its KV
        is released here, before the next iteration's admission.

        Args:
            output: the `schedule()` result the tokens belong to.
            tokens: request id -> sampled token id.

        Returns:
            The sequences that finished in this update.
        """
        finished: list[Sequence] = []
        for seq in output.sequences:
            if seq.status is not SequenceStatus.RUNNING or seq.request_id not in tokens:
                continue
            token = int(tokens[seq.request_id])
            fed, _ = seq.next_input()
            seq.num_cached += len(fed)
            seq.output_ids.append(token)
            if token in seq.stop_token_ids:
                self.finish(seq.request_id, "stop")
            elif len(seq.output_ids) >= seq.max_tokens:
                self.finish(seq.request_id, "length")
            else:
                continue
            finished.append(seq)
        return finished

    # --- leaving -------------------------------------------------------------
    def finish(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """Remove a sequence wherever it is and release its KV at once.

        Returns:
            The sequence, or None if it was not live (already finished).
        """
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.kv.release(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a sequence (reason "cancelled"); see `finish`."""
        return self.finish(request_id, "cancelled")

    def abort_all(self, request_ids: Iterable[str] | None = None) -> list[Sequence]:
        """Cancel the given live sequences, or all of them."""
        ids = list(self._by_id) if request_ids is None else list(request_ids)
        return [s for s in (self.abort(r) for r in ids) if s is not None]

"""Iteration-level continuous batching, with no model in sight.

Design
------
The engine runs a loop of *iterations*. Each iteration the scheduler is asked
`schedule() -> SchedulerOutput` (which sequences to prefill, which to
decode), the engine runs the model and samples one token per scheduled row,
and hands the tokens back with `update(output, tokens)`. Exactly like vLLM's
`schedule()` / `update_from_output()`, the scheduler never sees a tensor, so
its tests build "model outputs" (a dict of sampled token ids) by hand.

Queues. A sequence is WAITING (in its client's queue; `add` raises
`OverloadedError` when `max_waiting` sequences wait in total or
`max_waiting_per_client` wait for that client, so overload is rejected at the
edge instead of growing latency without bound), then RUNNING (holds its KV
reservation), then FINISHED (gone from every queue, KV released).

Fair admission across clients. Every sequence belongs to a client
(`Sequence.client_id`: the OpenAI `user`, gRPC metadata, "" when anonymous).
Each client has its own waiting queue, ordered by `priority` (lower first)
then arrival, and the clients with waiting sequences take turns by deficit
round robin over tokens (Shreedhar and Varghese, 1995): on its turn a client
whose deficit is below its head's cost (`reserved_tokens`) earns `quantum`
tokens and passes the turn on; otherwise its head is admitted and the cost
is taken from its deficit. Each client thus gets an equal share of admitted
tokens whatever its burst size, so one client's 100 queued streams delay
another client's request by at most one quantum of admissions, not by the
whole burst. Priority only orders a client's own requests: it never lets a
client take more than its share. A client that empties its queue leaves the
rotation and forgets its deficit (no credit hoarding while idle).

Admission (start of `schedule`). The next sequence in that order is admitted
while (a) fewer than `max_batch_size` sequences run and (b) the KV pool has
the pages for its whole reservation: `steps x (prompt + max_tokens)` tokens
(`PagedKVCache.pages_needed`). Reserving the whole request up front means a
running sequence can never run out of KV mid-generation, so there is no
preemption and no recomputation. If the chosen sequence does not fit,
admission stops for this iteration: nobody overtakes it (no head-of-line
skipping), so a large request is never starved by a stream of small ones; the
price is some idle KV while it waits for pages. A request that could never
fit the pool is rejected at validation (engine), so it always fits
eventually. At most `max_prefills` sequences are admitted per iteration,
which bounds how long one iteration's prefills can stall the decode rows
(their inter-token latency). With one client this is exactly FCFS.

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

import bisect
import enum
import itertools
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
        client_id: the client that sent it (fair admission).
        priority: order within its client's queue, lower first.
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
    client_id: str = ""
    priority: int = 0
    _order: tuple[int, int] = (0, 0)  # (priority, arrival number): the client-queue key

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
    """Continuous-batching scheduler with fair admission over a paged KV allocator."""

    def __init__(
        self,
        kv: KVAllocator,
        max_batch_size: int = 32,
        max_waiting: int = 256,
        max_prefills: int = 8,
        max_waiting_per_client: int | None = None,
        quantum: int = 256,
    ) -> None:
        """Create a scheduler.

        Args:
            kv: the KV page allocator (a `PagedKVCache`).
            max_batch_size: most sequences running (holding KV) at once.
            max_waiting: most sequences waiting; more raise `OverloadedError`.
            max_prefills: most sequences admitted (prefilled) per iteration.
            max_waiting_per_client: most sequences waiting per client (None =
                `max_waiting`).
            quantum: tokens a client earns per turn of the deficit round robin.
        """
        per_client = max_waiting if max_waiting_per_client is None else max_waiting_per_client
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_waiting", max_waiting),
            ("max_prefills", max_prefills),
            ("max_waiting_per_client", per_client),
            ("quantum", quantum),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_prefills = max_prefills
        self.max_waiting_per_client = per_client
        self.quantum = quantum
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._queues: dict[str, list[Sequence]] = {}  # client -> waiting, sorted by _order
        self._turns: deque[str] = deque()  # clients with waiting sequences, in turn order
        self._deficit: dict[str, int] = {}
        self._num_waiting = 0
        self._arrivals = itertools.count()

    # --- queries -------------------------------------------------------------
    @property
    def waiting(self) -> list[Sequence]:
        """Every waiting sequence, client by client in turn order (a snapshot)."""
        return [seq for client in self._turns for seq in self._queues[client]]

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def num_waiting_for(self, client_id: str) -> int:
        """Sequences waiting for one client."""
        return len(self._queues.get(client_id, ()))

    def has_work(self) -> bool:
        return bool(self._num_waiting or self.running)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._by_id

    # --- joining -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence in its client's queue; it is admitted by a later `schedule`.

        Raises:
            OverloadedError: `max_waiting` sequences already wait, or
                `max_waiting_per_client` of this client's.
            ValueError: a live sequence has the same request id.
        """
        if seq.request_id in self._by_id:
            raise ValueError(f"request_id={seq.request_id!r}: a request with this id is already live")
        if self._num_waiting >= self.max_waiting:
            raise OverloadedError(f"waiting queue is full ({self.max_waiting} requests); retry later")
        queue = self._queues.get(seq.client_id)
        if queue is not None and len(queue) >= self.max_waiting_per_client:
            raise OverloadedError(
                f"this client already has {self.max_waiting_per_client} requests waiting; retry later"
            )
        if queue is None:
            queue = self._queues[seq.client_id] = []
            self._turns.append(seq.client_id)
            self._deficit[seq.client_id] = 0
        seq.status = SequenceStatus.WAITING
        seq._order = (seq.priority, next(self._arrivals))
        bisect.insort(queue, seq, key=lambda q: q._order)
        self._num_waiting += 1
        self._by_id[seq.request_id] = seq

    def _remove_waiting(self, seq: Sequence) -> None:
        queue = self._queues[seq.client_id]
        queue.remove(seq)
        self._num_waiting -= 1
        if not queue:  # the client leaves the rotation and forgets its deficit
            del self._queues[seq.client_id], self._deficit[seq.client_id]
            self._turns.remove(seq.client_id)

    def _next_candidate(self) -> Sequence:
        """The next sequence in deficit-round-robin order (does not admit it)."""
        while True:
            client = self._turns[0]
            head = self._queues[client][0]
            if self._deficit[client] >= head.reserved_tokens:
                return head
            self._deficit[client] += self.quantum
            self._turns.rotate(-1)

    # --- one iteration -------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Admit waiting sequences (fair order, no overtaking) and list this iteration's rows."""
        # Everything already running and prefilled decodes; listed before
        # admission so that admitted sequences are not decoded before prefill.
        out = SchedulerOutput(decode=[s for s in self.running if s.is_prefilled])
        now = time.monotonic()
        while (
            self._num_waiting
            and len(self.running) < self.max_batch_size
            and len(out.prefill) < self.max_prefills
        ):
            head = self._next_candidate()
            if self.kv.pages_needed(head.steps, head.reserved_tokens) > self.kv.free_pages:
                break  # nobody overtakes the chosen sequence
            self.kv.reserve(head.request_id, head.steps, head.reserved_tokens)
            self._deficit[head.client_id] -= head.reserved_tokens
            self._remove_waiting(head)
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
            self._remove_waiting(seq)
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

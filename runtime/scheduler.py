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
reservation; with pages on demand it may be preempted back to WAITING),
then FINISHED (gone from every queue, KV released).

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
(`PageAllocator.pages_needed`), plus `draft_steps x (prompt + max_tokens)`
under `Sequence.draft_key` for a sequence that may speculate (its draft's own
KV entries; runtime/speculation.py). Reserving the whole request up front means a
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

KV pages on demand (`allocation="on_demand"`; "reserve" is the policy above).
Reserving `prompt + max_tokens` up front leaves most of the pool idle when
clients send large `max_tokens` and stop early, so, as vLLM does, a request
can instead hold only what it has cached:

- Admission takes the pages of its prefill: `steps x (prompt + produced)`
  tokens (`Sequence.cached_after_prefill`; plus the same at `draft_steps` for a
  sequence that may speculate), and only while `watermark x num_pages` pages
  stay free afterwards (unless nothing runs), so running requests have room
  to grow. DRR still charges `reserved_tokens`, and nobody overtakes.
- Growth: at the start of each `schedule`, every decoding sequence gets the
  pages its next decode writes (`Sequence.decode_capacity`: the fed token,
  plus `MAX_DRAFT_TOKENS` for a speculating one, capped at its reservation),
  so it takes one page per step (and per draft step) each time it crosses a
  page boundary (`PageAllocator.grow`).
- Preemption by recompute when the pool runs dry: sequences are served most
  important first (lower `priority`, then earlier admission) and, while one
  cannot grow, the least important one left (highest `priority` value, most
  recently admitted; possibly itself) is preempted: its KV (and its draft's)
  is freed, `num_cached` drops to 0 and it waits again, keeping its
  `output_ids`, at the front: its original place in its client's queue
  (ahead of everything that arrived after it), its client's turn first,
  its admission's cost refunded to its client's deficit. Readmitted, it
  prefills prompt + produced tokens in one forward (`next_input`), whose
  sampled token is the next one, so its stream goes on with no duplicate or
  missing token (greedy output is the unpreempted one). An iteration that
  preempted admits nobody, so a victim is not readmitted into the same
  shortage. Priority thus also orders who keeps KV, and a preempted
  request's client loses neither its share nor its place.
- Bound: a sequence may be preempted `max_preemptions` times; chosen once
  more, it finishes instead (reason "cancelled", listed in
  `SchedulerOutput.failed`; the engine fails it with an error naming the
  cause), so a request cannot be recomputed without end. A request that fits
  the pool alone (the engine's check) always finishes while it runs alone.
- `num_preemptions` and `recomputed_tokens` (tokens fed by recompute
  prefills) count the cost; `kv_pages_used` is the pages holding tokens.

Steps as a memory dial (either policy). A sequence's KV is proportional to
its step count, so a sequence with `min_steps` (the engine sets it for
requests whose step count the server chose, when `EngineConfig.kv_min_steps`
is set; 0 = its steps are fixed) that does not fit at its `steps` when its
turn comes is admitted at the most steps in [`min_steps`, `steps`) that do
fit, instead of waiting. That includes a preempted sequence's readmission:
its recompute prefill runs at the lowered count too (its tokens so far stay;
the rest of its stream comes from fewer steps, which its response reports),
so under memory pressure the victims of preemption come back smaller and
sooner. Never more steps than its whole reservation can hold in the pool
(the engine checks a dial request's fit at `min_steps`), so a request alone
always finishes. `num_steps_lowered` counts these admissions and
`steps_lowered` the steps they took off. The rule is the same no-overtaking
one: if even `min_steps` does not fit, admission stops.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from runtime.types import MAX_DRAFT_TOKENS, FinishReason, OverloadedError

KVAllocation = Literal["reserve", "on_demand"]
KV_ALLOCATIONS: tuple[str, ...] = ("reserve", "on_demand")


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
        admitted_time: `time.monotonic()` of its first admission (a
            preempted sequence's readmission keeps it).
        client_id: the client that sent it (fair admission).
        priority: order within its client's queue, lower first.
        draft_steps: steps of its speculative draft's own KV entries, reserved
            next to its own (`draft_key`); 0 = it never speculates.
        preemptions: times it was preempted (its KV freed, to be recomputed).
        min_steps: the fewest steps an admission may lower `steps` to when
            the KV pool is short (module docstring); 0 = `steps` is fixed.
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
    draft_steps: int = 0
    preemptions: int = 0
    min_steps: int = 0
    _order: tuple[int, int] = (0, 0)  # (priority, arrival number): the client-queue key

    @property
    def reserved_tokens(self) -> int:
        """Tokens the KV reservation covers: the prompt plus every new token."""
        return len(self.prompt_ids) + self.max_tokens

    @property
    def draft_key(self) -> tuple[str, str]:
        """The allocator id of the draft's KV reservation (a tuple: no request id can equal it)."""
        return (self.request_id, "draft")

    @property
    def cached_after_prefill(self) -> int:
        """Tokens its (re)prefill caches: the prompt plus every token already produced."""
        return len(self.prompt_ids) + len(self.output_ids)

    def decode_capacity(self) -> int:
        """Tokens its KV must hold before its next decode: the fed token, plus the
        `MAX_DRAFT_TOKENS` a speculative round may verify, never past the reservation."""
        lookahead = MAX_DRAFT_TOKENS if self.draft_steps else 0
        return min(self.reserved_tokens, self.num_cached + 1 + lookahead)

    @property
    def is_prefilled(self) -> bool:
        return self.num_cached > 0

    def next_input(self) -> tuple[list[int], int]:
        """Token ids to feed next and the position of the first of them.

        Prefill feeds the whole prompt at position 0 (after a preemption, the
        prompt and every token produced so far: the recompute); decode feeds
        the last generated token at the position right after the cached ones.
        """
        if not self.is_prefilled:
            return (self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids), 0
        return [self.output_ids[-1]], self.num_cached


class KVAllocator(Protocol):
    """The part of `models.kv_cache.PageAllocator` the scheduler uses."""

    num_pages: int

    @property
    def free_pages(self) -> int: ...

    def pages_needed(self, steps: int, tokens: int) -> int: ...

    def grow_pages(self, seq_id: object, tokens: int) -> int: ...

    def grow(self, seq_id: object, tokens: int) -> int: ...

    def reserve(self, seq_id: object, steps: int, tokens: int) -> None: ...

    def release(self, seq_id: object) -> None: ...


@dataclass
class SchedulerOutput:
    """What one iteration runs.

    Attributes:
        prefill: sequences admitted this iteration; their prompts are run
            (a preempted sequence's prompt and produced tokens: the recompute).
        decode: sequences that feed their last token (T = 1).
        preempted: sequences preempted this iteration (KV freed, waiting
            again at the front, to be recomputed); the caller resets any
            state kept next to their KV (a draft's length pointer).
        failed: sequences finished this iteration because they were chosen
            for preemption more than `max_preemptions` times (their reason
            is "cancelled"; the caller reports the error to the client).
    """

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)

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
        allocation: KVAllocation = "reserve",
        watermark: float = 0.05,
        max_preemptions: int = 8,
    ) -> None:
        """Create a scheduler.

        Args:
            kv: the KV page allocator (the runner's `PageAllocator`).
            max_batch_size: most sequences running (holding KV) at once.
            max_waiting: most sequences waiting; more raise `OverloadedError`.
            max_prefills: most sequences admitted (prefilled) per iteration.
            max_waiting_per_client: most sequences waiting per client (None =
                `max_waiting`).
            quantum: tokens a client earns per turn of the deficit round robin.
            allocation: "reserve" (a request's whole KV at admission, never
                preempted) or "on_demand" (pages as it grows, preemption by
                recompute when the pool runs dry); module docstring.
            watermark: fraction of the pool on-demand admission leaves free
                while anything runs, for running requests to grow into.
            max_preemptions: times one request may be preempted; chosen once
                more, it fails instead (`SchedulerOutput.failed`).
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
        if allocation not in KV_ALLOCATIONS:
            raise ValueError(f"allocation={allocation!r}: must be one of {KV_ALLOCATIONS}")
        if not isinstance(watermark, (int, float)) or isinstance(watermark, bool) or not 0 <= watermark < 1:
            raise ValueError(f"watermark={watermark!r}: must be a fraction in [0, 1)")
        if not isinstance(max_preemptions, int) or isinstance(max_preemptions, bool) or max_preemptions < 0:
            raise ValueError(f"max_preemptions={max_preemptions!r}: must be an integer >= 0")
        self.kv = kv
        self.allocation: KVAllocation = allocation
        self.watermark_pages = math.ceil(watermark * kv.num_pages)
        self.max_preemptions = max_preemptions
        self.num_preemptions = 0  # preemptions so far (metrics)
        self.recomputed_tokens = 0  # tokens fed again by recompute prefills so far (metrics)
        self.num_steps_lowered = 0  # admissions at fewer steps for lack of KV (metrics)
        self.steps_lowered = 0  # the steps those admissions took off, summed (metrics)
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

    @property
    def kv_pages_used(self) -> int:
        """Pages holding cached tokens (the rest of the allocated pages are reserved ahead)."""
        kv = self.kv
        used = 0
        for seq in self.running:  # every iteration (IterationStats): one call per row
            if seq.num_cached:  # the draft's entries cover the same tokens
                used += kv.pages_needed(seq.steps + seq.draft_steps, seq.num_cached)
        return used

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
        on_demand = self.allocation == "on_demand"
        if on_demand:
            self._grow(out)
            if out.preempted or out.failed:
                return out  # the pool ran dry: admit nobody until running requests shrink it
        now = time.monotonic()
        while (
            self._num_waiting
            and len(self.running) < self.max_batch_size
            and len(out.prefill) < self.max_prefills
        ):
            head = self._next_candidate()
            if on_demand:
                tokens = head.cached_after_prefill
                room = self.kv.free_pages - (self.watermark_pages if self.running else 0)
            else:
                tokens = head.reserved_tokens
                room = self.kv.free_pages
            if not self._fits(head, tokens, room):
                break  # nobody overtakes the chosen sequence
            self.kv.reserve(head.request_id, head.steps, tokens)
            if head.draft_steps:
                self.kv.reserve(head.draft_key, head.draft_steps, tokens)
            if head.output_ids:
                self.recomputed_tokens += tokens
            self._deficit[head.client_id] -= head.reserved_tokens
            self._remove_waiting(head)
            head.status = SequenceStatus.RUNNING
            if head.admitted_time is None:  # a recompute keeps the first: queue time is arrival to it
                head.admitted_time = now
            self.running.append(head)
            out.prefill.append(head)
        return out

    def _fits(self, seq: Sequence, tokens: int, room: int) -> bool:
        """Whether `seq`'s admission (its KV for `tokens` tokens, and its draft's) fits in
        `room` pages; with `min_steps` it may take fewer steps to fit (the memory dial).

        A lowered sequence also gets no more steps than its whole reservation can hold in the
        pool (the engine checked it at `min_steps` only), so that, on demand, it still
        finishes whenever it runs alone.
        """
        kv = self.kv
        if not seq.min_steps or seq.draft_steps:  # fixed steps (a draft's entries need them)
            need = kv.pages_needed(seq.steps, tokens)
            if seq.draft_steps:
                need += kv.pages_needed(seq.draft_steps, tokens)
            return need <= room
        for steps in range(seq.steps, seq.min_steps - 1, -1):
            if (
                kv.pages_needed(steps, tokens) <= room
                and kv.pages_needed(steps, seq.reserved_tokens) <= kv.num_pages
            ):
                if steps < seq.steps:
                    self.num_steps_lowered += 1
                    self.steps_lowered += seq.steps - steps
                    seq.steps = steps
                return True
        return False

    def _grow(self, out: SchedulerOutput) -> None:
        """On demand: give each decoding sequence the pages its next decode writes,
        preempting the least important running sequences when the pool runs dry."""
        kv = self.kv
        # The common case, every iteration: most rows' pages already cover their next
        # decode (a row crosses a page boundary once per page_size tokens), and what
        # the others need is free. One pass, no ranking.
        wanting: list[tuple[Sequence, int]] = []
        need_total = 0
        for seq in self.running:
            if not seq.num_cached:  # not prefilled: admission reserved its prefill
                continue
            tokens = seq.decode_capacity()
            need = kv.grow_pages(seq.request_id, tokens)
            if seq.draft_steps:
                need += kv.grow_pages(seq.draft_key, tokens)
            if need:
                wanting.append((seq, tokens))
                need_total += need
        if not wanting:
            return
        if need_total <= kv.free_pages:
            for seq, tokens in wanting:
                kv.grow(seq.request_id, tokens)
                if seq.draft_steps:
                    kv.grow(seq.draft_key, tokens)
            return
        self._grow_preempting(out)

    def _grow_preempting(self, out: SchedulerOutput) -> None:
        """`_grow` when the free pages do not cover every row: the most important rows
        grow first, the least important are preempted to make room."""
        # Most important first: lower priority value, then earlier admission
        # (`running` is in admission order); victims are taken from the end.
        order = sorted(range(len(self.running)), key=lambda i: (self.running[i].priority, i))
        ranked = [self.running[i] for i in order]
        gone: set[int] = set()
        kv = self.kv
        for seq in ranked:
            if id(seq) in gone or not seq.is_prefilled:
                continue
            tokens = seq.decode_capacity()
            while True:
                need = kv.grow_pages(seq.request_id, tokens)
                if seq.draft_steps:
                    need += kv.grow_pages(seq.draft_key, tokens)
                if need <= kv.free_pages:
                    break
                victim = next(v for v in reversed(ranked) if id(v) not in gone)
                gone.add(id(victim))
                self._preempt(victim, out)
                if victim is seq:
                    break
            if id(seq) not in gone:
                kv.grow(seq.request_id, tokens)
                if seq.draft_steps:
                    kv.grow(seq.draft_key, tokens)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Free a running sequence's KV and queue it again at the front, keeping its
        tokens (or fail it, past `max_preemptions`)."""
        if seq in out.decode:
            out.decode.remove(seq)
        if seq.preemptions >= self.max_preemptions:
            self.finish(seq.request_id, "cancelled")
            out.failed.append(seq)
            return
        self.running.remove(seq)
        self.kv.release(seq.request_id)
        self.kv.release(seq.draft_key)
        seq.preemptions += 1
        self.num_preemptions += 1
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        client = seq.client_id
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = []
            self._deficit[client] = 0
        else:
            self._turns.remove(client)
        self._turns.appendleft(client)  # its client's turn comes first
        self._deficit[client] += seq.reserved_tokens  # the refund of its admission's cost
        bisect.insort(queue, seq, key=lambda q: q._order)  # its original place: ahead of later arrivals
        self._num_waiting += 1
        out.preempted.append(seq)

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
            if self.commit(seq, int(tokens[seq.request_id]), len(seq.next_input()[0])):
                finished.append(seq)
        return finished

    def commit(self, seq: Sequence, token: int, cached: int = 1) -> bool:
        """Append one token to a running sequence whose cache grew by `cached` tokens.

        A speculative round commits several tokens, one call each (the
        first with the round's fed token, the others with 1: each accepted
        draft was cached by the verification), so a stop token or
        `max_tokens` ends the sequence exactly where decoding one token at a
        time would have.

        Returns:
            Whether the sequence finished (its KV is released).
        """
        seq.num_cached += cached
        seq.output_ids.append(token)
        if token in seq.stop_token_ids:
            self.finish(seq.request_id, "stop")
        elif len(seq.output_ids) >= seq.max_tokens:
            self.finish(seq.request_id, "length")
        else:
            return False
        return True

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
            self.kv.release(seq.draft_key)  # a no-op when it holds none
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

"""Scheduler tests with a fake KV allocator and hand-made "model outputs" (no model)."""

from __future__ import annotations

import math

import pytest

from runtime.scheduler import Scheduler, Sequence, SequenceStatus
from runtime.types import OverloadedError


class FakeKV:
    """Page accounting only, with PagedKVCache's sizing rule."""

    def __init__(self, num_pages: int, page_size: int = 4) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.held: dict[object, int] = {}

    @property
    def free_pages(self) -> int:
        return self.num_pages - sum(self.held.values())

    def pages_needed(self, steps: int, tokens: int) -> int:
        return steps * math.ceil(tokens / self.page_size)

    def reserve(self, seq_id: object, steps: int, tokens: int) -> None:
        need = self.pages_needed(steps, tokens)
        assert seq_id not in self.held and need <= self.free_pages
        self.held[seq_id] = need

    def release(self, seq_id: object) -> None:
        self.held.pop(seq_id, None)


def seq(rid: str, prompt_len: int = 4, max_tokens: int = 4, steps: int = 2, **kw) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), max_tokens, steps, **kw)


def ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def step(sched: Scheduler, token: int = 7):
    """One iteration: schedule, then feed every scheduled row the same token."""
    out = sched.schedule()
    finished = sched.update(out, {s.request_id: token for s in out.sequences})
    return out, finished


def test_prefill_then_decode_and_inputs():
    sched = Scheduler(FakeKV(100))
    sched.add(seq("a", prompt_len=3))
    out, _ = step(sched, token=9)
    assert ids(out.prefill) == ["a"] and out.decode == []
    a = sched.get("a")
    assert a.num_cached == 3 and a.output_ids == [9]
    assert a.next_input() == ([9], 3)  # decode feeds the last token at position 3
    out, _ = step(sched, token=5)
    assert out.prefill == [] and ids(out.decode) == ["a"]
    assert a.num_cached == 4 and a.output_ids == [9, 5]


def test_join_between_iterations():
    sched = Scheduler(FakeKV(100))
    sched.add(seq("a", max_tokens=10))
    step(sched)
    sched.add(seq("b", max_tokens=10))  # arrives while "a" decodes
    out, _ = step(sched)
    assert ids(out.prefill) == ["b"] and ids(out.decode) == ["a"]
    out, _ = step(sched)
    assert out.prefill == [] and ids(out.decode) == ["a", "b"]


def test_rows_with_different_steps_and_experts_decode_together():
    sched = Scheduler(FakeKV(100))
    sched.add(seq("a", steps=2, experts=1))
    sched.add(seq("b", steps=6, experts=None))
    step(sched)
    out, _ = step(sched)
    assert ids(out.decode) == ["a", "b"]
    assert [s.steps for s in out.decode] == [2, 6]


def test_finished_leave_at_once_and_free_kv():
    kv = FakeKV(100)
    sched = Scheduler(kv)
    sched.add(seq("short", max_tokens=2))
    sched.add(seq("long", max_tokens=5))
    step(sched)
    _, finished = step(sched)
    assert ids(finished) == ["short"]
    short = finished[0]
    assert short.finish_reason == "length" and short.status is SequenceStatus.FINISHED
    assert "short" not in kv.held and "short" not in sched  # freed in the same update
    out, _ = step(sched)
    assert ids(out.decode) == ["long"]


def test_stop_token_finishes_with_reason_stop():
    sched = Scheduler(FakeKV(100))
    sched.add(seq("a", max_tokens=10, stop_token_ids=frozenset({0})))
    step(sched, token=3)
    _, finished = step(sched, token=0)
    assert ids(finished) == ["a"] and finished[0].finish_reason == "stop"
    assert finished[0].output_ids == [3, 0]


def test_cancel_waiting_and_running():
    kv = FakeKV(100)
    sched = Scheduler(kv, max_batch_size=1)
    sched.add(seq("run", max_tokens=10))
    sched.add(seq("wait", max_tokens=10))
    out, _ = step(sched)
    assert ids(out.prefill) == ["run"] and sched.num_waiting == 1
    assert sched.abort("wait").finish_reason == "cancelled"
    assert sched.num_waiting == 0
    aborted = sched.abort("run")
    assert aborted.finish_reason == "cancelled" and kv.held == {}
    assert sched.abort("run") is None  # already gone
    assert not sched.has_work()


def test_tokens_for_a_row_aborted_during_the_forward_are_dropped():
    sched = Scheduler(FakeKV(100))
    sched.add(seq("a", max_tokens=10))
    out = sched.schedule()
    sched.abort("a")  # e.g. the client went away while the model ran
    assert sched.update(out, {"a": 4}) == []
    assert out.prefill[0].output_ids == []


def test_kv_budget_blocks_admission_until_release():
    # page_size 4: a request of 4 prompt + 4 new tokens at 2 steps needs 4 pages.
    kv = FakeKV(num_pages=10, page_size=4)
    sched = Scheduler(kv)
    for rid in ("a", "b", "c"):
        sched.add(seq(rid, max_tokens=4, steps=2))
    out, _ = step(sched)
    assert ids(out.prefill) == ["a", "b"] and kv.free_pages == 2
    assert ids(sched.waiting) == ["c"]
    out, _ = step(sched)  # still no room for "c"
    assert out.prefill == [] and ids(sched.waiting) == ["c"]
    sched.abort("a")  # releases 4 pages
    out, _ = step(sched)
    assert ids(out.prefill) == ["c"] and ids(out.decode) == ["b"]


def test_fcfs_no_head_of_line_skipping():
    kv = FakeKV(num_pages=8, page_size=4)
    sched = Scheduler(kv)
    sched.add(seq("a", max_tokens=4, steps=2))  # 4 pages
    sched.add(seq("big", max_tokens=4, steps=6))  # 12 pages: never fits beside "a"
    sched.add(seq("small", max_tokens=4, steps=2))  # would fit, but must not overtake
    out, _ = step(sched)
    assert ids(out.prefill) == ["a"]
    assert ids(sched.waiting) == ["big", "small"]


def test_max_batch_size_and_max_prefills():
    sched = Scheduler(FakeKV(1000), max_batch_size=3, max_prefills=2)
    for i in range(5):
        sched.add(seq(f"r{i}", max_tokens=10))
    out, _ = step(sched)
    assert ids(out.prefill) == ["r0", "r1"]
    out, _ = step(sched)
    assert ids(out.prefill) == ["r2"] and sched.num_running == 3
    assert ids(sched.waiting) == ["r3", "r4"]


def test_queue_overflow_raises_overloaded():
    sched = Scheduler(FakeKV(100), max_waiting=2)
    sched.add(seq("a"))
    sched.add(seq("b"))
    with pytest.raises(OverloadedError, match="full"):
        sched.add(seq("c"))
    step(sched)  # admission makes room in the queue again
    sched.add(seq("c"))
    assert ids(sched.waiting) == ["c"]


def test_duplicate_request_id_rejected():
    sched = Scheduler(FakeKV(100))
    sched.add(seq("a"))
    with pytest.raises(ValueError, match="request_id"):
        sched.add(seq("a"))


# --- fair admission across clients ----------------------------------------------------------
def _admission_order(sched: Scheduler) -> list[str]:
    """Request ids in the order `schedule` admits them, finishing each at once to free slots."""
    order: list[str] = []
    for _ in range(1000):
        if not sched.num_waiting:
            return order
        out = sched.schedule()
        order += ids(out.prefill)
        for s in out.prefill:
            sched.finish(s.request_id, "length")
    raise AssertionError("admission did not drain")


def test_one_clients_burst_does_not_starve_another():
    """Client A queues 100 requests, then B one: B is admitted within one quantum of A's."""
    sched = Scheduler(FakeKV(10_000), max_batch_size=4, max_waiting=200, max_prefills=2, quantum=16)
    for i in range(100):
        sched.add(seq(f"a{i}", client_id="A"))  # 8 tokens each
    sched.add(seq("b0", client_id="B"))
    order = _admission_order(sched)
    assert order.index("b0") <= 16 // 8 + 1
    assert [r for r in order if r.startswith("a")] == [f"a{i}" for i in range(100)]  # FCFS within A


def test_clients_share_admitted_tokens_equally():
    sched = Scheduler(FakeKV(10_000), max_batch_size=8, max_waiting=400, quantum=8)
    for i in range(60):
        sched.add(seq(f"a{i}", prompt_len=4, max_tokens=4, client_id="A"))  # 8 tokens
        sched.add(seq(f"b{i}", prompt_len=12, max_tokens=4, client_id="B"))  # 16 tokens
    first = _admission_order(sched)[:60]
    a_tokens = 8 * sum(r.startswith("a") for r in first)
    b_tokens = 16 * sum(r.startswith("b") for r in first)
    assert abs(a_tokens - b_tokens) <= 16  # equal shares of tokens, not of requests


def test_priority_orders_only_a_clients_own_queue():
    sched = Scheduler(FakeKV(10_000), max_batch_size=1, max_waiting=10, quantum=8)
    sched.add(seq("a-late", client_id="A", priority=5))
    sched.add(seq("a-urgent", client_id="A", priority=-5))
    sched.add(seq("b", client_id="B", priority=100))
    order = _admission_order(sched)
    assert order.index("a-urgent") < order.index("a-late")
    assert order.index("b") < order.index("a-late")  # A's priority does not overtake B's turn


def test_per_client_queue_bound():
    sched = Scheduler(FakeKV(0), max_waiting=10, max_waiting_per_client=2)
    sched.add(seq("a1", client_id="A"))
    sched.add(seq("a2", client_id="A"))
    with pytest.raises(OverloadedError, match="this client"):
        sched.add(seq("a3", client_id="A"))
    sched.add(seq("b1", client_id="B"))  # another client still gets in
    assert sched.num_waiting == 3 and sched.num_waiting_for("A") == 2


def test_a_chosen_request_that_does_not_fit_is_not_overtaken():
    """Fairness never lets a small request skip a large one that waits for pages."""
    kv = FakeKV(8, page_size=4)
    sched = Scheduler(kv, max_batch_size=8, quantum=64)
    sched.add(seq("running", prompt_len=4, max_tokens=4, steps=2))  # 4 pages
    step(sched)
    sched.add(seq("big", prompt_len=8, max_tokens=8, steps=2, client_id="A"))  # 8 pages
    sched.add(seq("small", prompt_len=2, max_tokens=2, steps=1, client_id="B"))  # 1 page
    out = sched.schedule()
    assert out.prefill == []  # "big" is next and does not fit; "small" waits behind it
    sched.finish("running", "length")
    assert ids(sched.schedule().prefill) == ["big"]

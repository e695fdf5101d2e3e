"""KV pages on demand (issue 27): growth at page boundaries, watermark admission,
preemption by recompute (order, greedy identity, bound, cancellation), speculation.

Scheduler tests run over the real `PageAllocator` (plain Python) with a fake
"model" that checks every row against a simulated cache; engine tests run the
tiny model of conftest.py.
"""

from __future__ import annotations

import asyncio

import pytest

from models.kv_cache import KVCacheFullError, PageAllocator
from runtime.scheduler import Scheduler, SchedulerOutput, Sequence, SequenceStatus
from runtime.types import GenerationRequest, RequestFailedError, SamplingParams
from tests.helpers import collect


def seq(rid: str, prompt_len: int = 3, max_tokens: int = 12, steps: int = 2, **kw) -> Sequence:
    return Sequence(rid, [rid.__hash__() % 50 + i + 1 for i in range(prompt_len)], max_tokens, steps, **kw)


class FakeModel:
    """Greedy "model": the next token is a function of every token before it.

    It keeps a simulated cache per request and checks each row: a prefill
    starts an empty cache at position 0, a decode feeds exactly the position
    after the cached ones, and every position written lies in the request's pages.
    """

    def __init__(self, kv: PageAllocator) -> None:
        self.kv = kv
        self.cache: dict[str, list[int]] = {}
        self.prefill_lens: dict[str, list[int]] = {}

    def __call__(self, out: SchedulerOutput) -> dict[str, int]:
        tokens = {}
        for s in out.sequences:
            fed, start = s.next_input()
            if start == 0:
                self.cache[s.request_id] = []
                self.prefill_lens.setdefault(s.request_id, []).append(len(fed))
            cache = self.cache[s.request_id]
            assert start == len(cache), (s.request_id, start, len(cache))
            assert start + len(fed) <= self.kv.capacity(s.request_id)
            cache.extend(fed)
            tokens[s.request_id] = (sum(i * t for i, t in enumerate(cache, 1)) % 89) + 1
        return tokens


def drive(sched: Scheduler, model: FakeModel, limit: int = 500) -> list[SchedulerOutput]:
    outs = []
    for _ in range(limit):
        if not sched.has_work():
            return outs
        out = sched.schedule()
        sched.update(out, model(out))
        outs.append(out)
    raise AssertionError("did not finish")


def run_all(num_pages: int, seqs: list[Sequence], **kw) -> tuple[Scheduler, FakeModel, list[SchedulerOutput]]:
    kv = PageAllocator(num_pages, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", **kw)
    for s in seqs:
        sched.add(s)
    model = FakeModel(kv)
    return sched, model, drive(sched, model)


# --- allocator ------------------------------------------------------------------
def test_allocator_grow_takes_one_page_per_step_at_each_boundary():
    kv = PageAllocator(10, page_size=4)
    kv.reserve("a", 3, 2)
    assert kv.free_pages == 7 and kv.capacity("a") == 4
    assert kv.grow("a", 4) == 0 and kv.free_pages == 7
    v = kv.version
    assert kv.grow_pages("a", 5) == 3 and kv.grow("a", 5) == 3
    assert kv.free_pages == 4 and kv.capacity("a") == 8 and kv.version != v
    assert all(len(p) == 2 for p in kv.pages("a"))
    with pytest.raises(KVCacheFullError, match="needs 6 more pages"):
        kv.grow("a", 16)
    assert kv.free_pages == 4  # nothing taken
    kv.release("a")
    assert kv.free_pages == 10


# --- growth and watermark ----------------------------------------------------------
def test_growth_allocates_exactly_at_page_boundaries():
    kv = PageAllocator(100, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0)
    sched.add(seq("a", prompt_len=3, max_tokens=12, steps=2))
    model = FakeModel(kv)
    held = []
    for _ in range(12):
        out = sched.schedule()
        if sched.get("a") is not None:
            held.append((sched.get("a").num_cached, 100 - kv.free_pages))
        sched.update(out, model(out))
    # (cached tokens, pages held after growth): a page per step whenever the next
    # decode's position (num_cached) reaches a new page; never past prompt + max_tokens.
    assert held[:7] == [(0, 2), (3, 2), (4, 4), (5, 4), (6, 4), (7, 4), (8, 6)]
    assert held[-1] == (13, 8)  # 15 = 3 + 12 tokens: 4 pages per step
    assert not sched.has_work() and kv.free_pages == 100


def test_reserve_policy_takes_the_whole_reservation():
    kv = PageAllocator(100, page_size=4)
    sched = Scheduler(kv, allocation="reserve")
    sched.add(seq("a", prompt_len=3, max_tokens=12, steps=2))
    sched.schedule()
    assert 100 - kv.free_pages == 8


def test_watermark_admission_leaves_room_to_grow():
    kv = PageAllocator(20, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.25)  # 5 pages
    assert sched.watermark_pages == 5
    for r in "abcdef":
        sched.add(seq(r, prompt_len=4, max_tokens=40, steps=3))  # 3 pages each at admission
    out = sched.schedule()
    # a is admitted whatever the watermark (nothing runs); b..e each leave >= 5 free ...
    assert [s.request_id for s in out.prefill] == ["a", "b", "c", "d", "e"] and kv.free_pages == 5
    # ... and f would leave 5 - 3 = 2 < 5: it waits
    assert [s.request_id for s in sched.waiting] == ["f"]


def test_admission_ignores_the_watermark_when_nothing_runs():
    kv = PageAllocator(6, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.5)
    sched.add(seq("a", prompt_len=8, max_tokens=4, steps=2))  # 4 pages, 2 + 3 would exceed 6
    assert [s.request_id for s in sched.schedule().prefill] == ["a"]


def test_bad_settings():
    kv = PageAllocator(6, page_size=4)
    with pytest.raises(ValueError, match="allocation"):
        Scheduler(kv, allocation="lazy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="watermark"):
        Scheduler(kv, watermark=1.0)
    with pytest.raises(ValueError, match="max_preemptions"):
        Scheduler(kv, max_preemptions=-1)


# --- preemption -------------------------------------------------------------------------
def test_preemption_order_lowest_priority_then_most_recent():
    kv = PageAllocator(12, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0, max_prefills=8)
    sched.add(seq("hi", prompt_len=4, max_tokens=20, steps=2, priority=0))
    sched.add(seq("lo1", prompt_len=4, max_tokens=20, steps=2, priority=1))
    sched.add(seq("lo2", prompt_len=4, max_tokens=20, steps=2, priority=1))
    sched.add(seq("mid", prompt_len=4, max_tokens=20, steps=2, priority=0))
    model = FakeModel(kv)
    out = sched.schedule()  # 4 x 2 pages of 12
    assert len(out.prefill) == 4
    sched.update(out, model(out))
    # Each needs 2 more pages at position 4, 4 are free: hi then mid (priority 0) grow; lo1
    # cannot, and the least important left, lo2 (priority 1, admitted last), is preempted.
    out = sched.schedule()
    assert [s.request_id for s in out.preempted] == ["lo2"]
    assert [s.request_id for s in out.decode] == ["hi", "mid", "lo1"] and out.prefill == []
    assert sched.num_preemptions == 1 and kv.free_pages == 0
    lo2 = sched.get("lo2")
    assert lo2.status is SequenceStatus.WAITING and lo2.num_cached == 0 and lo2.output_ids
    assert lo2.preemptions == 1 and "lo2" not in kv
    first = lo2.admitted_time
    assert first is not None
    sched.add(seq("late", prompt_len=1, max_tokens=1, steps=1, priority=1))
    assert [s.request_id for s in sched.waiting] == ["lo2", "late"]  # at the front
    assert sched.schedule().prefill == []  # lo2's recompute takes 2 x 2 pages, none are free; late waits
    sched.abort("hi")
    assert [s.request_id for s in sched.schedule().prefill] == ["lo2"]
    assert lo2.admitted_time == first  # queue time stays arrival to its first admission


def test_preempted_request_goes_before_later_arrivals_and_other_clients():
    kv = PageAllocator(8, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0, quantum=1)
    sched.add(seq("a", prompt_len=4, max_tokens=12, steps=2, client_id="x"))
    sched.add(seq("b", prompt_len=4, max_tokens=12, steps=2, client_id="y"))
    model = FakeModel(kv)
    out = sched.schedule()
    sched.update(out, model(out))
    assert sched.num_running == 2
    sched.add(seq("c", prompt_len=4, max_tokens=4, steps=2, client_id="z"))
    sched.add(seq("b2", prompt_len=4, max_tokens=4, steps=2, client_id="y"))
    for _ in range(10):
        out = sched.schedule()
        if out.preempted:
            break
        sched.update(out, model(out))
    assert [s.request_id for s in out.preempted] == ["b"]
    assert sched.waiting[0].request_id == "b"  # its client's turn first, ahead of its later b2


def test_recompute_gives_the_unpreempted_greedy_output():
    def make():
        return [seq(f"r{i}", prompt_len=3 + i, max_tokens=30 + 3 * i, steps=2 + i % 3) for i in range(6)]

    _, ref_model, _ = run_all(1000, ref := make())
    # r5 alone takes 4 x 14 = 56 pages; all six at full length 211
    sched, model, outs = run_all(60, got := make(), watermark=0.05)
    assert sched.num_preemptions > 0
    assert any(len(v) > 1 for v in model.prefill_lens.values())
    for a, b in zip(ref, got):
        assert b.output_ids == a.output_ids and len(b.output_ids) == b.max_tokens
        assert b.finish_reason == "length"
    # recompute prefills feed prompt + produced tokens; their count is recorded
    redone = sum(sum(v[1:]) for v in model.prefill_lens.values())
    assert sched.recomputed_tokens == redone > 0
    assert sched.kv.free_pages == 60 and len(sched.kv) == 0


def test_preemption_bound_fails_the_request():
    # b is admitted after a and has a's priority: it is the victim once a grows past 8 tokens.
    two = [seq(r, prompt_len=4, max_tokens=12, steps=2) for r in "ab"]
    sched, _, outs = run_all(8, two, watermark=0.0, max_preemptions=0)
    failed = [s for o in outs for s in o.failed]
    assert [s.request_id for s in failed] == ["b"]
    b = failed[0]
    assert b.preemptions == 0 and b.finish_reason == "cancelled" and b.status is SequenceStatus.FINISHED
    assert sched.num_preemptions == 0 and sched.kv.free_pages == 8
    assert sched.get("b") is None and len(two[0].output_ids) == 12
    # with a bound of 1 the same b is preempted once, recomputed and finishes
    two = [seq(r, prompt_len=4, max_tokens=12, steps=2) for r in "ab"]
    sched, _, outs = run_all(8, two, watermark=0.0, max_preemptions=1)
    assert sched.num_preemptions == 1 and not any(o.failed for o in outs)
    assert all(len(s.output_ids) == 12 for s in two)


def test_cancel_a_preempted_waiting_request():
    kv = PageAllocator(8, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0)
    sched.add(seq("a", prompt_len=4, max_tokens=12, steps=2))
    sched.add(seq("b", prompt_len=4, max_tokens=12, steps=2))
    model = FakeModel(kv)
    for _ in range(20):
        out = sched.schedule()
        if out.preempted:
            break
        sched.update(out, model(out))
    assert [s.request_id for s in out.preempted] == ["b"]
    sched.update(out, model(out))
    b = sched.abort("b")
    assert b is not None and b.finish_reason == "cancelled" and sched.num_waiting == 0
    assert "b" not in kv and "b" not in sched
    drive(sched, model)
    assert kv.free_pages == 8


def test_speculating_sequence_grows_and_frees_its_draft():
    kv = PageAllocator(200, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0)
    s = seq("a", prompt_len=3, max_tokens=40, steps=4, draft_steps=2)
    sched.add(s)
    model = FakeModel(kv)
    out = sched.schedule()
    assert 200 - kv.free_pages == 4 + 2  # one page per step, its own and its draft's
    sched.update(out, model(out))
    sched.schedule()  # room for the fed token + MAX_DRAFT_TOKENS (8): 12 tokens = 3 pages
    assert kv.capacity("a") == kv.capacity(s.draft_key) == 12
    assert 200 - kv.free_pages == 3 * (4 + 2)
    sched.abort("a")
    assert kv.free_pages == 200 and s.draft_key not in kv


# --- engine ------------------------------------------------------------------------------
def _req(rid: str, prompt: str, max_tokens: int, **compute) -> GenerationRequest:
    from runtime.types import ComputeParams

    s = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(rid, prompt=prompt, sampling=s, compute=ComputeParams(**compute))


PROMPTS = ["In the beginning", "And the LORD spake", "Blessed are the", "Now these are"]
POOL = 48 * 8 * 256  # 48 pages of the tiny model's 8 tokens x 256 bytes


async def _run(engine, requests):
    await engine.start()
    try:
        return await asyncio.gather(*(collect(engine.submit(r)) for r in requests), return_exceptions=True)
    finally:
        await engine.stop()


@pytest.mark.parametrize("draft_steps", [0, 2])
def test_engine_preemption_streams_the_unpreempted_greedy_output(make_engine, arun, draft_steps):
    def reqs():
        return [_req(f"r{i}", p, 24, steps=6, draft_steps=draft_steps) for i, p in enumerate(PROMPTS)]

    ref = arun(_run(make_engine(kv_allocation="reserve"), reqs()))
    # 48 pages of 8 tokens (2 KiB): one request at full length takes 6 x 5 = 30 (40 with its
    # draft's), the four 120 (160): they run together on demand and preempt each other.
    engine = make_engine(kv_allocation="on_demand", kv_cache_bytes=POOL)
    assert engine.kv.num_pages == 48
    got = arun(_run(engine, reqs()))
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.recomputed_tokens > 0
    for (text_a, ids_a, _), (text_b, ids_b, last) in zip(ref, got):
        assert ids_b == ids_a and text_b == text_a and len(ids_b) == 24  # no duplicate, none missing
        assert last.finished
    assert engine.stats().kv_used_bytes == 0 and engine.kv.free_pages == engine.kv.num_pages


def test_engine_fails_a_request_past_the_preemption_bound(make_engine, arun):
    engine = make_engine(kv_allocation="on_demand", kv_cache_bytes=POOL, max_preemptions=0)
    got = arun(_run(engine, [_req(f"r{i}", p, 24, steps=6) for i, p in enumerate(PROMPTS)]))
    errors = [g for g in got if isinstance(g, BaseException)]
    assert errors and all(isinstance(e, RequestFailedError) and "preempted" in str(e) for e in errors)
    assert any(not isinstance(g, BaseException) for g in got)
    assert engine.stats().kv_used_bytes == 0


def test_engine_cancel_while_preempted(make_engine, arun):
    engine = make_engine(kv_allocation="on_demand", kv_cache_bytes=POOL)

    async def go():
        await engine.start()
        try:
            streams = [engine.submit(_req(f"r{i}", p, 24, steps=6)) for i, p in enumerate(PROMPTS)]
            tasks = [asyncio.ensure_future(collect(s)) for s in streams]
            for _ in range(2000):
                await asyncio.sleep(0.001)
                waiting = [s for s in engine.scheduler.waiting if s.preemptions]
                if waiting:
                    assert engine.cancel(waiting[0].request_id)
                    break
            else:
                raise AssertionError("nothing was preempted")
            results = await asyncio.gather(*tasks)
            return waiting[0].request_id, results
        finally:
            await engine.stop()

    rid, results = arun(go())
    finished = {r[2].request_id: r[2] for r in results}
    assert finished[rid].finish_reason == "cancelled"
    assert sum(r[2].finish_reason == "length" for r in results) == 3
    assert engine.stats().kv_used_bytes == 0


# --- metrics -------------------------------------------------------------------------------
def test_metrics_export_pages_and_preemption_counters_from_zero():
    from runtime.metrics import EngineMetrics, PrometheusMetrics
    from runtime.types import IterationStats

    f = PrometheusMetrics()
    m = EngineMetrics("tiny", f)
    value = f.registry.get_sample_value
    base = {"model": "tiny"}
    assert value("leanserve_preemptions_total", base) == 0  # exported before any preemption
    assert value("leanserve_recomputed_tokens_total", base) == 0

    def it(preempted: int, recomputed: int) -> IterationStats:
        return IterationStats(
            1, 0, 1, {2: 1}, [], 512, 4096, 0, 1, 0.01,
            kv_pages_used=3, kv_pages_reserved=4, kv_pages_capacity=32,
            preemptions_total=preempted, recomputed_tokens_total=recomputed,
        )  # fmt: skip

    m(it(2, 40))
    m(it(3, 70))
    assert value("leanserve_preemptions_total", base) == 3
    assert value("leanserve_recomputed_tokens_total", base) == 70
    for state, pages in (("used", 3), ("reserved", 4), ("capacity", 32)):
        assert value("leanserve_kv_pages", {"model": "tiny", "state": state}) == pages
    m(it(1, 10))  # a new engine's totals start over: the counter only grows
    m(it(2, 10))
    assert value("leanserve_preemptions_total", base) == 4

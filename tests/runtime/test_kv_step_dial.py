"""Steps as a memory dial (issue 27): admission at fewer steps when the KV pool is short.

Scheduler tests run over the real `PageAllocator`; policy tests check which
requests may be lowered; engine tests run the tiny model of conftest.py.
"""

from __future__ import annotations

import asyncio

import pytest

from models.kv_cache import PageAllocator
from runtime.policy import StepPolicy
from runtime.scheduler import Scheduler
from runtime.types import ComputeParams, GenerationRequest, IterationStats, SamplingParams
from tests.helpers import collect
from tests.runtime.conftest import tiny_model_config
from tests.runtime.test_kv_on_demand import FakeModel, drive, seq


# --- scheduler ----------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["reserve", "on_demand"])
def test_a_short_pool_admits_at_the_most_steps_that_fit(allocation):
    kv = PageAllocator(20, page_size=4)
    sched = Scheduler(kv, allocation=allocation, watermark=0.0)
    # Admission takes 16 tokens at 3 steps = 12 pages: prompt 4 + max_tokens 12 reserved, or
    # on demand a prompt of 16 tokens (its prefill)
    prompt = 4 if allocation == "reserve" else 16
    tokens = 16
    sched.add(seq("a", prompt_len=prompt, max_tokens=12, steps=3))
    first = sched.schedule()
    assert [s.request_id for s in first.prefill] == ["a"]
    free = kv.free_pages
    per_step = kv.pages_needed(1, tokens)
    assert free < 3 * per_step  # b does not fit at its 3 steps ...
    b = seq("b", prompt_len=prompt, max_tokens=12, steps=3, min_steps=1)
    c = seq("c", prompt_len=prompt, max_tokens=12, steps=3)
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    # ... so it runs at the most steps that do; c (fixed steps) waits, nobody overtakes it
    assert [s.request_id for s in out.prefill] == ["b"]
    assert b.steps == free // per_step == 2
    assert [s.request_id for s in sched.waiting] == ["c"] and c.steps == 3
    assert (sched.num_steps_lowered, sched.steps_lowered) == (1, 1)
    assert len(kv.pages("b")) == 2  # its KV holds two steps' entries


def test_on_demand_a_lowered_sequence_can_always_finish_alone():
    # Its prefill (4 tokens) fits at 3 steps, but its whole 32 tokens at 3 steps need 24 of
    # the 20 pages: it would preempt itself for ever; it is admitted at 2 steps and finishes.
    kv = PageAllocator(20, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0)
    sched.add(a := seq("a", prompt_len=4, max_tokens=28, steps=3, min_steps=1))
    drive(sched, FakeModel(kv))
    assert a.steps == 2 and len(a.output_ids) == 28 and sched.num_preemptions == 0
    assert kv.free_pages == 20


def test_the_dial_stops_at_min_steps():
    kv = PageAllocator(20, page_size=4)
    sched = Scheduler(kv, allocation="reserve")
    sched.add(seq("a", prompt_len=4, max_tokens=12, steps=4))  # 16 pages
    sched.add(b := seq("b", prompt_len=4, max_tokens=12, steps=4, min_steps=2))  # 2 steps = 8 > 4 free
    sched.add(seq("c", prompt_len=1, max_tokens=1, steps=1))
    out = sched.schedule()
    assert [s.request_id for s in out.prefill] == ["a"]
    assert b.steps == 4 and sched.num_steps_lowered == 0
    assert [s.request_id for s in sched.waiting] == ["b", "c"]  # c does not overtake b


def test_a_speculating_sequence_keeps_its_steps():
    kv = PageAllocator(20, page_size=4)
    sched = Scheduler(kv, allocation="reserve")
    sched.add(seq("a", prompt_len=4, max_tokens=12, steps=3))  # 12 pages
    sched.add(b := seq("b", prompt_len=4, max_tokens=12, steps=3, draft_steps=1, min_steps=1))
    sched.schedule()
    assert b.steps == 3 and sched.num_steps_lowered == 0 and "b" not in kv


def test_a_preempted_sequence_comes_back_at_fewer_steps_when_short():
    def make(min_steps: int):
        return [seq(r, prompt_len=4, max_tokens=20, steps=2, min_steps=min_steps) for r in "ab"]

    kv = PageAllocator(1000, page_size=4)
    ref = Scheduler(kv, allocation="on_demand")
    for s in (ref_seqs := make(0)):
        ref.add(s)
    drive(ref, FakeModel(kv))
    # 12 pages: both are admitted at 2 steps (2 + 2 pages); growing, b is preempted, and its
    # recompute (prompt + produced) fits beside a only at 1 step: it comes back at 1 step.
    kv = PageAllocator(12, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0)
    for s in (got := make(1)):
        sched.add(s)
    model = FakeModel(kv)
    outs = drive(sched, model)
    assert [s.request_id for o in outs for s in o.preempted][:1] == ["b"]
    assert got[0].steps == 2 and got[1].steps == 1 and sched.num_steps_lowered >= 1
    assert len(model.prefill_lens["b"]) > 1  # it was recomputed ...
    for a, b in zip(ref_seqs, got):
        assert b.output_ids == a.output_ids  # ... with no token lost or repeated (the fake
        # model's tokens depend on the tokens only, not on the steps)
    assert kv.free_pages == 12


def test_without_the_dial_a_preempted_sequence_keeps_its_steps():
    kv = PageAllocator(12, page_size=4)
    sched = Scheduler(kv, allocation="on_demand", watermark=0.0)
    two = [seq(r, prompt_len=4, max_tokens=20, steps=2) for r in "ab"]
    for s in two:
        sched.add(s)
    drive(sched, FakeModel(kv))
    assert sched.num_preemptions > 0 and sched.num_steps_lowered == 0
    assert [s.steps for s in two] == [2, 2] and all(len(s.output_ids) == 20 for s in two)


# --- policy ---------------------------------------------------------------------------------
def test_only_server_chosen_step_counts_carry_a_floor():
    config = tiny_model_config(64)
    policy = StepPolicy(config, default_steps=5, kv_min_steps=3)
    assert policy.decide(ComputeParams(), 4, 8).min_steps == 3  # default:fixed
    assert policy.decide(ComputeParams(steps=5), 4, 8).min_steps == 0  # explicit
    assert policy.decide(ComputeParams(quality="best"), 4, 8).min_steps == 0  # a tier the client chose
    assert policy.decide(ComputeParams(latency_budget_ms=1000), 4, 8).min_steps == 3  # uncalibrated: default
    assert StepPolicy(config, default_steps=3, kv_min_steps=3).decide(ComputeParams(), 4, 8).min_steps == 0
    assert StepPolicy(config, default_steps=5).decide(ComputeParams(), 4, 8).min_steps == 0  # dial off


@pytest.mark.parametrize("bad", [1, 7, 2.5, True, "3"])
def test_kv_min_steps_outside_the_model_range_is_named(bad):
    with pytest.raises(ValueError, match=r"kv_min_steps=.*\[2, 6\]"):
        StepPolicy(tiny_model_config(64), kv_min_steps=bad)


# --- engine ---------------------------------------------------------------------------------
POOL = 48 * 8 * 256  # 48 pages of the tiny model's 8 tokens x 256 bytes
PROMPTS = ["In the beginning", "And the LORD spake", "Blessed are the", "Now these are"]


def _req(rid: str, prompt: str, **compute) -> GenerationRequest:
    s = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    return GenerationRequest(rid, prompt=prompt, sampling=s, compute=ComputeParams(**compute))


async def _run(engine, requests, stats=None):
    if stats is not None:
        engine.stats_callbacks.append(lambda s: stats.append(s) if isinstance(s, IterationStats) else None)
    await engine.start()
    try:
        return await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
    finally:
        await engine.stop()


def test_engine_admits_default_requests_at_fewer_steps_and_says_so(make_engine, arun):
    # "reserve": one request of 24 new tokens at 6 steps takes 6 x 5 = 30 of the 48 pages,
    # so without the dial they run one at a time; with it the next ones fit at 3 steps.
    requests = [_req(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    plain: list[IterationStats] = []
    arun(_run(make_engine(kv_allocation="reserve", kv_cache_bytes=POOL, default_steps=6), requests, plain))
    assert max(s.num_running for s in plain) == 1
    engine = make_engine(kv_allocation="reserve", kv_cache_bytes=POOL, default_steps=6, kv_min_steps=3)
    dial: list[IterationStats] = []
    got = arun(_run(engine, [_req(f"r{i}", p) for i, p in enumerate(PROMPTS)], dial))
    assert max(s.num_running for s in dial) >= 2
    lowered = [last for _, _, last in got if last.steps < 6]
    assert lowered and all(last.steps >= 3 and last.policy_reason == "default:fixed+kv" for last in lowered)
    assert engine.scheduler.num_steps_lowered == len(lowered) == dial[-1].kv_lowered_total
    assert engine.stats().kv_lowered_total == len(lowered)
    # A lowered request is exactly a request that asked for those steps.
    for (text, ids, last), prompt in zip(got, PROMPTS):
        if last.steps < 6:
            ref = arun(_run(make_engine(), [_req("ref", prompt, steps=last.steps)]))
            assert ref[0][1] == ids and ref[0][0] == text
    assert engine.kv.free_pages == engine.kv.num_pages


def test_engine_preempted_requests_come_back_at_fewer_steps(make_engine, arun):
    # On demand, the four run together and preempt each other (test_kv_on_demand.py); with
    # the dial the victims are recomputed at fewer steps, and every stream is still whole.
    engine = make_engine(kv_allocation="on_demand", kv_cache_bytes=POOL, default_steps=6, kv_min_steps=3)
    got = arun(_run(engine, [_req(f"r{i}", p) for i, p in enumerate(PROMPTS)]))
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_steps_lowered > 0
    assert all(len(ids) == 24 and last.finished for _, ids, last in got)
    assert any(last.steps < 6 and last.policy_reason == "default:fixed+kv" for _, _, last in got)
    assert engine.kv.free_pages == engine.kv.num_pages


def test_engine_never_lowers_explicit_steps(make_engine, arun):
    engine = make_engine(kv_allocation="reserve", kv_cache_bytes=POOL, kv_min_steps=2)
    got = arun(_run(engine, [_req(f"r{i}", p, steps=6) for i, p in enumerate(PROMPTS)]))
    assert all(last.steps == 6 and last.policy_reason == "explicit" for _, _, last in got)
    assert engine.scheduler.num_steps_lowered == 0


def test_metrics_export_lowered_admissions_from_zero():
    from runtime.metrics import EngineMetrics, PrometheusMetrics

    f = PrometheusMetrics()
    m = EngineMetrics("tiny", f)
    name, base = "leanserve_kv_lowered_admissions_total", {"model": "tiny"}
    assert f.registry.get_sample_value(name, base) == 0
    m(IterationStats(1, 0, 1, {2: 1}, [], 512, 4096, 0, 1, 0.01, kv_lowered_total=4))
    assert f.registry.get_sample_value(name, base) == 4


def test_a_request_that_fits_only_below_its_steps_is_served_not_refused(make_engine, arun):
    from runtime.types import InvalidRequestError

    per_step = -(-(len(make_engine().tokenizer.encode(PROMPTS[0]).ids) + 24) // 8)  # pages
    small = (6 * per_step - 1) * 8 * 256  # one page short of 6 steps: 5 fit

    async def refused(engine, request):
        await engine.start()
        try:
            with pytest.raises(InvalidRequestError, match="max_tokens"):
                engine.submit(request)
        finally:
            await engine.stop()

    arun(refused(make_engine(kv_cache_bytes=small, default_steps=6), _req("r", PROMPTS[0])))
    engine = make_engine(kv_cache_bytes=small, default_steps=6, kv_min_steps=3)
    ((_, ids, last),) = arun(_run(engine, [_req("r", PROMPTS[0])]))
    assert last.steps == 5 and last.policy_reason == "default:fixed+kv" and len(ids) == 24
    # an explicit count is still checked at its own steps
    arun(refused(make_engine(kv_cache_bytes=small, kv_min_steps=3), _req("r2", PROMPTS[0], steps=6)))

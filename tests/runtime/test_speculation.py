"""Self-speculative decoding (runtime/speculation.py): lossless, in the continuous batch, KV-exact.

Greedy identity runs on the zoo's ode-tiny (a trained model: drafts are
partly accepted, so both the accepted and the rejected paths run); the
rejection rule is checked statistically on a five-token vocabulary against
the exactly known target distribution; KV rollback and cancellation on the
tiny random model of conftest.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from runtime.engine import Engine, EngineConfig
from runtime.runner import ModelRunner, Row
from runtime.sampling import make_generator
from runtime.speculation import DraftRound, _Round, accept_or_resample
from runtime.types import ComputeParams, GenerationRequest, InvalidRequestError, SamplingParams
from tests.helpers import collect

ZOO = Path(__file__).resolve().parents[2] / "models" / "zoo" / "ode-tiny"
PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying", "Blessed are the"]


def request(
    rid: str,
    prompt: str = PROMPTS[0],
    steps: int | None = 12,
    draft_steps: int | None = None,
    draft_tokens: int | None = None,
    max_tokens: int = 24,
    experts_top_k: int | None = None,
    **sampling,
) -> GenerationRequest:
    s = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, "ignore_eos": True, **sampling})
    c = ComputeParams(
        steps=steps, draft_steps=draft_steps, draft_tokens=draft_tokens, experts_top_k=experts_top_k
    )
    return GenerationRequest(rid, prompt=prompt, sampling=s, compute=c)


@pytest.fixture(scope="module")
def zoo_engine():
    """`zoo_engine(**engine_config)` -> a not-yet-started engine over ode-tiny (weights loaded once)."""
    base = Engine.from_model_dir(ZOO, EngineConfig(kv_cache_bytes=8 * 2**20))

    def make(**kwargs) -> Engine:
        return Engine(base.backend, base.tokenizer, EngineConfig(kv_cache_bytes=8 * 2**20, **kwargs))

    return make


async def _run(engine: Engine, requests: list[GenerationRequest]):
    await engine.start()
    try:
        return await asyncio.gather(*(collect(engine.submit(r)) for r in requests))
    finally:
        await engine.stop()


def _alone(make, r: GenerationRequest, arun):
    return arun(_run(make(), [r]))[0]


# --- greedy identity ---------------------------------------------------------------
@pytest.mark.parametrize("draft_steps,draft_tokens", [(2, 1), (3, 4), (4, 8)])
def test_greedy_speculation_is_token_for_token_the_plain_output(zoo_engine, arun, draft_steps, draft_tokens):
    for i, prompt in enumerate(PROMPTS):
        plain = _alone(zoo_engine, request(f"p{i}", prompt), arun)
        spec = _alone(
            zoo_engine, request(f"s{i}", prompt, draft_steps=draft_steps, draft_tokens=draft_tokens), arun
        )
        assert spec[1] == plain[1] and spec[0] == plain[0]
        report = spec[2].speculation
        assert report is not None and report.ran and report.drafted_tokens > 0
        assert 0 < report.accepted_tokens <= report.drafted_tokens
        assert plain[2].speculation is None
    # Partial acceptance somewhere: the rejection path ran too.
    assert report.accepted_tokens < report.drafted_tokens or draft_tokens == 1


def test_greedy_identity_batched_with_a_mix(zoo_engine, arun):
    """Different steps, experts, prompts, draft settings, some not speculating, penalties,
    logprobs, a stop token: each output equals the same request alone without speculation."""
    mix = [
        request("a", PROMPTS[0], steps=12, draft_steps=3, draft_tokens=4),
        request("b", PROMPTS[1], steps=8, draft_steps=2, draft_tokens=2, experts_top_k=1),
        request("c", PROMPTS[2], steps=12),
        request("d", PROMPTS[1], steps=6, draft_steps=2, draft_tokens=5, max_tokens=17),
        request("e", PROMPTS[0], steps=10, draft_steps=4, draft_tokens=3, frequency_penalty=0.7),
        request("f", PROMPTS[2], steps=5, experts_top_k=1),
        request("g", PROMPTS[2], steps=12, draft_steps=2, draft_tokens=3, logprobs=2),
    ]
    plain = {}
    for r in mix:
        solo = GenerationRequest(
            r.request_id,
            prompt=r.prompt,
            sampling=r.sampling,
            compute=ComputeParams(steps=r.compute.steps, experts_top_k=r.compute.experts_top_k),
        )
        plain[r.request_id] = _alone(zoo_engine, solo, arun)
    batched = arun(_run(zoo_engine(), mix))
    for r, got in zip(mix, batched):
        want = plain[r.request_id]
        assert got[1] == want[1], r.request_id
        assert got[0] == want[0], r.request_id
        assert (got[2].speculation is not None) == (r.compute.draft_steps is not None), r.request_id
    # Log-probabilities are the target's, as without speculation.
    assert batched[-1][2].logprobs is not None


def test_stop_tokens_and_strings_end_a_round_where_plain_decoding_stops(zoo_engine, arun):
    plain = _alone(zoo_engine, request("p", max_tokens=30), arun)
    stop_id = plain[1][9]  # a token in the middle: a round may have drafted past it
    first = plain[1].index(stop_id)
    for fields in ({"stop_token_ids": [stop_id]}, {"stop": [plain[0][12:16]]}):
        want = _alone(zoo_engine, request("p", max_tokens=30, **fields), arun)
        got = _alone(zoo_engine, request("s", max_tokens=30, draft_steps=3, draft_tokens=6, **fields), arun)
        assert got[1] == want[1] and got[0] == want[0]
        assert got[2].finish_reason == want[2].finish_reason == "stop"
        assert got[2].completion_tokens == want[2].completion_tokens
    assert len(
        _alone(zoo_engine, request("s", max_tokens=30, draft_steps=3, stop_token_ids=[stop_id]), arun)[1]
    ) == (first + 1)


# --- sampling -----------------------------------------------------------------------
def test_seeded_speculative_sampling_is_reproducible_alone_and_batched(zoo_engine, arun):
    r = request("s", temperature=0.9, top_k=50, seed=7, draft_steps=3, draft_tokens=4, max_tokens=20)
    once = _alone(zoo_engine, r, arun)
    again = _alone(zoo_engine, r, arun)
    others = [request(f"o{i}", p, temperature=1.0, seed=i, draft_steps=2) for i, p in enumerate(PROMPTS)]
    batched = arun(_run(zoo_engine(), [*others, r]))[-1]
    assert once[1] == again[1] == batched[1]
    assert once[2].speculation.drafted_tokens > 0


V = 5
P = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
Q = torch.tensor([0.1, 0.3, 0.1, 0.3, 0.2])


def test_rejection_rule_draws_exactly_the_target_distribution():
    """Draft from q, accept / resample: the tokens follow p. 40 000 draws with seed 0; tolerance
    0.012 per token (sd of a frequency <= 0.0025 at this n, so ~5 sd: fails by chance < 1e-6)."""
    gen = make_generator(0)
    n = 40_000
    counts = torch.zeros(V)
    accepted = 0
    drafts = torch.multinomial(Q, n, replacement=True, generator=gen).tolist()
    for d in drafts:
        token, ok = accept_or_resample(P, Q, d, gen)
        counts[token] += 1
        accepted += ok
    assert float((counts / n - P).abs().max()) < 0.012
    # The acceptance rate is sum(min(p, q)) = 0.65.
    assert abs(accepted / n - float(torch.minimum(P, Q).sum())) < 0.012


def test_a_whole_round_commits_tokens_distributed_as_the_target():
    """Through `_Round` (draft sampling, verification, bonus token) with fixed logits: the first
    and the second committed token are each distributed as p (tolerance as above, 20 000 rounds)."""
    gen = make_generator(1)
    sampling = SamplingParams(temperature=1.0)
    draft_logits, target_logits = Q.log(), P.log()
    n = 20_000
    first, second = torch.zeros(V), torch.zeros(V)
    seconds = 0
    for _ in range(n):
        row = Row("r", [0], 3, 6, sampling=sampling, generator=gen)
        rnd = _Round(row, 2, targets=[[], []])
        rnd.draft(draft_logits)
        rnd.draft(draft_logits)
        out = rnd.verify(target_logits.expand(3, V))
        first[out.tokens[0]] += 1
        if len(out.tokens) > 1:
            second[out.tokens[1]] += 1
            seconds += 1
    assert float((first / n - P).abs().max()) < 0.012
    assert seconds > 5000 and float((second / seconds - P).abs().max()) < 0.02


# --- KV ---------------------------------------------------------------------------------
def test_a_round_rolls_back_by_pointer_and_leaves_the_pool_as_it_was(make_engine):
    """Runner level: reservations and free list unchanged by a round; the target's keys and
    values of the committed positions equal a plain decode's of the same tokens."""
    engine = make_engine()
    runner: ModelRunner = engine.runner
    a = runner.allocator
    prompt = [5, 9, 13, 2, 7]
    a.reserve("r", 6, 24)
    a.reserve(("r", "draft"), 2, 24)
    pages, free, version = [list(p) for p in a.pages("r")], a.free_pages, a.version
    greedy = SamplingParams(temperature=0.0)
    out = runner.execute(runner.prepare([Row("r", prompt, 0, 6, sampling=greedy)]))
    t0 = out.tokens["r"]
    k = 4
    draft = DraftRound(("r", "draft"), 2, k, prompt + [t0], 0)
    row = Row("r", [t0], len(prompt), 6, sampling=greedy, draft=draft)
    res = runner.execute(runner.prepare([row]))
    got = res.spec["r"]
    assert got.drafted == k and 1 <= len(got.tokens) <= k + 1
    assert a.pages("r") == pages and a.free_pages == free and a.version == version
    # A plain decode of the committed tokens writes the same keys and values.
    ref = make_engine().runner
    ref.allocator.reserve("r", 6, 24)
    ref.execute(ref.prepare([Row("r", prompt, 0, 6, sampling=greedy)]))
    fed = [t0, *got.tokens[:-1]]
    for i, t in enumerate(fed):
        step = ref.execute(ref.prepare([Row("r", [t], len(prompt) + i, 6, sampling=greedy)]))
        assert step.tokens["r"] == got.tokens[i]  # greedy: the same tokens one at a time
    n = len(prompt) + len(fed)
    for mine, theirs in zip(_kv(runner, "r"), _kv(ref, "r")):
        assert float((mine[:, :, :n] - theirs[:, :, :n]).abs().max()) < 1e-5


def tiny_request(max_tokens: int) -> GenerationRequest:
    """A greedy request for the tiny model of conftest.py: steps 6, drafting 3 tokens at 2 steps."""
    return request("r", "In the beginning", steps=6, draft_steps=2, draft_tokens=3, max_tokens=max_tokens)


def _kv(runner: ModelRunner, rid) -> tuple[torch.Tensor, torch.Tensor]:
    return runner.storage.gather(torch.tensor(runner.allocator.pages(rid)))


def test_reservation_counts_the_draft_and_finishing_frees_both(make_engine, arun):
    engine = make_engine(kv_allocation="reserve")
    seen = []
    forward = engine.backend.forward

    def spy(fwd):
        seen.append((len(engine.kv), engine.kv.free_pages))
        return forward(fwd)

    engine.backend.forward = spy
    r = tiny_request(10)
    out = arun(_run(engine, [r]))[0]
    a = engine.kv
    tokens = out[2].prompt_tokens + 10
    expect = a.pages_needed(6, tokens) + a.pages_needed(2, tokens)
    assert {n for n, _ in seen} == {2} and {a.num_pages - f for _, f in seen} == {expect}
    assert len(a) == 0 and a.free_pages == a.num_pages


def test_cancel_mid_round_frees_everything(make_engine, arun):
    engine = make_engine(inline_decode_ms=0)
    forward = engine.backend.forward
    in_round = threading.Event()

    def slow(fwd):
        if not fwd.last_only:  # a verification forward
            in_round.set()
            time.sleep(0.2)
        return forward(fwd)

    engine.backend.forward = slow
    r = tiny_request(40)

    async def go():
        await engine.start()
        stream = engine.submit(r)
        first = await stream.__anext__()
        while not in_round.is_set():
            await asyncio.sleep(0.005)
        assert engine.cancel("r")
        rest = [o async for o in stream]
        await engine.stop()
        return first, rest

    first, rest = arun(go())
    assert rest[-1].finish_reason == "cancelled"
    assert len(engine.kv) == 0 and engine.kv.free_pages == engine.kv.num_pages


# --- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "compute,field",
    [
        (dict(steps=6, draft_steps=6), "draft_steps"),
        (dict(steps=4, draft_steps=5), "draft_steps"),
        (dict(draft_steps=1), "draft_steps"),
        (dict(draft_steps=-1), "draft_steps"),
        (dict(draft_steps="2"), "draft_steps"),
        (dict(draft_steps=True), "draft_steps"),
        (dict(steps=2, draft_steps=2), "draft_steps"),
        (dict(draft_tokens=0), "draft_tokens"),
        (dict(draft_tokens=9), "draft_tokens"),
        (dict(draft_tokens=2.5), "draft_tokens"),
    ],
)
def test_validation_names_the_field_and_the_range(make_engine, compute, field):
    engine = make_engine()
    engine._state = "running"  # submit's checks run before anything is queued
    r = GenerationRequest("r", prompt="In", compute=ComputeParams(**compute))
    with pytest.raises(InvalidRequestError) as e:
        engine.submit(r)
    assert e.value.field == field
    assert "[" in e.value.allowed or "0 (off)" in e.value.allowed


def test_draft_steps_at_or_above_policy_steps_turns_speculation_off(make_engine, arun):
    """Without explicit steps the policy picks them (here the server default, 3): a draft_steps
    that is not below them is valid for the model, so the request runs, without speculation."""
    engine = make_engine(default_steps=3)
    r = GenerationRequest(
        "r", prompt="In", sampling=SamplingParams(max_tokens=4, temperature=0),
        compute=ComputeParams(draft_steps=4),
    )  # fmt: skip
    out = arun(_run(engine, [r]))[0]
    assert out[2].speculation is None and len(out[1]) >= 1


# --- the wire ----------------------------------------------------------------------------------
def test_grpc_and_openai_fields_reach_the_request_and_the_report_comes_back():
    from runtime import grpc_servicer as conv
    from runtime import openai_http as oa
    from runtime.openai_common import leanserve_block
    from runtime.proto_build import load_stubs
    from runtime.types import RequestOutput, SpecReport

    pb2, _ = load_stubs()
    msg = pb2.GenerateRequest(prompt="hi", compute=pb2.ComputeParams(draft_steps=3, draft_tokens=5))
    c = conv.to_engine_request(msg).compute
    assert (c.draft_steps, c.draft_tokens) == (3, 5)
    c = conv.to_engine_request(
        pb2.GenerateRequest(prompt="hi", compute=pb2.ComputeParams(draft_steps=0))
    ).compute
    assert (c.draft_steps, c.draft_tokens) == (0, None)  # 0 = off, told apart from unset
    assert conv.to_engine_request(pb2.GenerateRequest(prompt="hi")).compute.draft_steps is None
    (r,) = oa.parse_completions(
        {"model": "m", "prompt": "hi", "draft_steps": 2, "draft_tokens": 3}, "m"
    ).requests
    assert (r.compute.draft_steps, r.compute.draft_tokens) == (2, 3)
    with pytest.raises(InvalidRequestError) as e:
        oa.parse_completions({"model": "m", "prompt": "hi", "draft_steps": "x"}, "m")
    assert e.value.field == "draft_steps"

    report = SpecReport(3, 4, rounds=2, drafted_tokens=8, accepted_tokens=6, mode="explicit")
    out = RequestOutput("r", "ab", [1, 2], True, "length", 3, 2, 12, None, "explicit", speculation=report)
    spec = conv.to_response(pb2, out).compute.speculation
    assert (spec.ran, spec.draft_steps, spec.drafted_tokens, spec.accepted_tokens, spec.rounds) == (
        True, 3, 8, 6, 2,
    )  # fmt: skip
    assert spec.mode == "explicit" and spec.draft_tokens == 4
    assert not conv.to_response(
        pb2, RequestOutput("r", "", [], True, "length", 1, 0, 4, None, "x")
    ).compute.HasField("speculation")
    block = leanserve_block(out)["speculation"]
    assert block == {
        "ran": True, "draft_steps": 3, "draft_tokens": 4, "drafted_tokens": 8, "accepted_tokens": 6,
        "rounds": 2, "mode": "explicit",
    }  # fmt: skip


def test_speculation_metrics_are_exported_by_draft_setting(make_engine, arun):
    from runtime.metrics import EngineMetrics, PrometheusMetrics

    engine = make_engine()
    factory = PrometheusMetrics()
    engine.stats_callbacks.append(EngineMetrics("tiny", factory))
    r = tiny_request(12)
    out = arun(_run(engine, [r]))[0][2].speculation
    text = factory.render().decode()
    labels = 'draft_steps="2",mode="explicit",model="tiny"'
    assert f"leanserve_spec_drafted_tokens_total{{{labels}}} {float(out.drafted_tokens)}" in text
    assert f"leanserve_spec_accepted_tokens_total{{{labels}}} {float(out.accepted_tokens)}" in text
    assert f"leanserve_spec_acceptance_rate_count{{{labels}}} 1.0" in text


# --- the server's default and "auto" ---------------------------------------------------------
def test_server_default_and_auto_are_lossless_and_reported(zoo_engine, arun):
    plain = _alone(zoo_engine, request("p", PROMPTS[1]), arun)
    for setting, mode in ((3, "default"), ("auto", "auto")):
        engine = zoo_engine(draft_steps=setting, draft_tokens=3)
        got = arun(_run(engine, [request("s", PROMPTS[1]), request("off", PROMPTS[1], draft_steps=0)]))
        assert got[0][1] == plain[1] and got[1][1] == plain[1]
        report = got[0][2].speculation
        assert report.mode == mode and report.ran and report.draft_tokens == 3
        assert got[1][2].speculation is None  # draft_steps=0 overrides the server's default
    # "auto" drafts with the model's minimum only where it is at most a third of the steps.
    got = arun(_run(zoo_engine(draft_steps="auto"), [request("s", steps=5)]))[0]
    assert got[2].speculation is None


def test_auto_drafts_at_batch_one_and_stops_when_the_batch_or_misses_grow():
    from runtime.speculation import AutoSpeculation, SpecState
    from runtime.types import SpecReport

    auto = AutoSpeculation()
    spec = SpecState(("r", "draft"), SpecReport(2, 4, mode="auto"), acceptance=0.8)
    assert auto.tokens(spec, 12, batch=1, limit=8) >= 2
    assert auto.tokens(spec, 12, batch=1, limit=1) == 1  # never past the request's remaining tokens
    assert auto.tokens(spec, 12, batch=16, limit=8) == 0  # verification tokens cost ~a row each
    low = SpecState(("r", "draft"), SpecReport(2, 4, mode="auto"), acceptance=0.2)
    decisions = [auto.tokens(low, 12, batch=1, limit=8) for _ in range(auto.retry_every)]
    assert decisions[:-1] == [0] * (auto.retry_every - 1) and decisions[-1] == 1  # a probe round


def test_engine_config_checks_the_speculation_settings():
    assert EngineConfig(draft_steps="3").draft_steps == 3  # a flag's text
    assert EngineConfig(draft_steps="auto").draft_steps == "auto"
    for bad in ({"draft_steps": "fast"}, {"draft_steps": -1}, {"draft_tokens": 0}, {"draft_tokens": 9}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EngineConfig(**bad)


def test_auto_stays_off_on_the_compiled_decode(make_engine, arun):
    """Verification forwards run eagerly beside compiled one-token graphs: auto does not draft there
    (the backend's name is all the engine reads; an explicit draft_steps still speculates)."""
    engine = make_engine(draft_steps="auto")
    engine.backend.name = "torch-aot"
    got = arun(
        _run(engine, [tiny_request(6), request("auto", "In", steps=6, draft_steps=None, max_tokens=6)])
    )
    assert got[0][2].speculation.ran and got[1][2].speculation is None

"""The gRPC deadline path: `x-leanserve-timeout-ms` -> latency budget -> steps chosen by prediction.

The metadata is parsed and converted as the servicer does (runtime/grpc_servicer.py), the
request goes through a real engine, and the steps it runs at are the ones the engine's own
predictor bounds within the budget at that moment. The cost model here is deliberately slow
(seconds per request), so the budgets are seconds and the tiny model never nears its deadline:
nothing depends on how fast this machine is.
"""

from __future__ import annotations

import grpc
import pytest

from models.cost import CostModel
from runtime import grpc_servicer as conv
from runtime.policy import ModelProfile
from runtime.proto_build import load_stubs
from runtime.types import InvalidRequestError, RequestStats

pb2, _ = load_stubs()
MAX_TOKENS = 8
SLOW = CostModel(
    a_bytes=2e-6, b_flops=0.0, c=1e-2, r2_bytes=1, r2_flops=1, r2_both=1, n_samples=1, config_name="slow"
)


class Context:
    """The metadata side of Ray's gRPC context."""

    def __init__(self, timeout_ms: float) -> None:
        self._metadata = [(conv.TIMEOUT_METADATA_KEY, f"{timeout_ms:g}")]

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._metadata


def _request(timeout_ms: float, **compute: int):
    message = pb2.GenerateRequest(
        prompt="In the beginning", sampling=pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
        compute=pb2.ComputeParams(**compute),
    )  # fmt: skip
    return conv.to_engine_request(message, timeout_ms=conv.timeout_ms_from_metadata(Context(timeout_ms)))


@pytest.fixture
def engine(make_engine):
    profile = ModelProfile(ModelProfile.default_tiers(make_engine().model_config), SLOW)
    e = make_engine(profile=profile)
    assert e.model_config.step_range == (2, 6)
    return e


def test_deadline_metadata_chooses_the_steps_the_predictor_bounds_within_it(engine, arun):
    stats: list[RequestStats] = []
    engine.stats_callbacks.append(lambda s: stats.append(s) if isinstance(s, RequestStats) else None)
    prompt = len(engine.tokenizer.encode("In the beginning").ids)

    def bounds() -> dict[int, float]:
        predict = engine.policy.predictor.predict
        return {n: 1000 * predict(n, prompt, MAX_TOKENS, 1).bound_s for n in range(2, 7)}

    async def go() -> list[tuple[int, str, float]]:
        await engine.start()
        seen = []
        try:
            for pick in ("between 3 and 4", "above 6", "below 2", "explicit steps"):
                b = bounds()
                timeout = {"between 3 and 4": (b[3] + b[4]) / 2, "above 6": 2 * b[6], "below 2": b[2] / 2,
                           "explicit steps": b[2] / 2}[pick]  # fmt: skip
                compute = {"steps": 5} if pick == "explicit steps" else {}
                out = await engine.generate(_request(timeout, **compute))
                seen.append((out.steps, out.policy_reason, timeout))
        finally:
            await engine.stop()
        return seen

    seen = arun(go())
    assert [(s, r) for s, r, _ in seen] == [
        (3, "latency_budget"),
        (6, "latency_budget"),
        (2, "latency_budget:min"),
        (5, "explicit"),  # an explicit compute field wins; the metadata is only the deadline
    ]
    # Every request carried its prediction to its stats (the error metric and the ratios).
    assert len(stats) == 4 and all(s.predicted_s is not None and s.predicted_s > 0 for s in stats)
    assert engine.policy.snapshot()["predictor"]["error_n"] == 4


def test_deadline_below_the_minimum_is_refused_when_the_server_rejects(engine, arun):
    engine.policy.budget_unmet = "reject"  # EngineConfig.latency_budget_unmet="reject"
    prompt = len(engine.tokenizer.encode("In the beginning").ids)

    async def go() -> BaseException:
        await engine.start()
        try:
            low = 1000 * engine.policy.predictor.predict(2, prompt, MAX_TOKENS, 1).bound_s / 2
            with pytest.raises(InvalidRequestError) as e:
                engine.submit(_request(low))
            return e.value
        finally:
            await engine.stop()

    error = arun(go())
    code, details = conv.status_for(error)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "latency_budget_ms" in details and "steps=2" in details

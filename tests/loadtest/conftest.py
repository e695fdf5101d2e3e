"""A tiny in-process `TextGeneration` server (generated stubs, grpc.aio, 127.0.0.1) for loadtest tests.

It runs in its own thread and event loop, so both `asyncio.run(...)` in a test
and `run_sweep` (which makes its own loop) can drive it. Behaviour:

* each token takes `token_s * steps` seconds, so latency grows with steps as a
  real server's would (the sweep's cost-model comparison has something to fit);
* `serial=True` handles one request at a time (like a saturated single-slot
  engine), so a stall delays everything queued behind it;
* the request with index `stall_index` (arrival order) first sleeps `stall_s`;
* prompt "reject" is refused with RESOURCE_EXHAUSTED;
* no compute field -> 3 steps, reason "default:slo" (an SLO controller's answer);
* `draft_steps` D > 0 (self-speculation): tokens take half as long, and the last message's
  speculation report says every token after the first was drafted and a fraction D / steps
  of them accepted.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from runtime.proto_build import load_stubs

pb2, pb2_grpc = load_stubs()
MIN_STEPS, MAX_STEPS = 2, 8


class FakeServicer(pb2_grpc.TextGenerationServicer):
    """See the module docstring."""

    def __init__(self, token_s: float, serial: bool, stall_index: int | None, stall_s: float) -> None:
        self.token_s = token_s
        self.serial = serial
        self.stall_index = stall_index
        self.stall_s = stall_s
        self.arrivals = itertools.count()
        self.lock: asyncio.Lock | None = None
        self.seen: list[Any] = []

    async def GetModelInfo(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        return pb2.ModelInfo(
            name="fake", context_length=128, min_steps=MIN_STEPS, max_steps=MAX_STEPS,
            default_steps=MAX_STEPS,
            ffn="moe", experts_top_k_options=[1, 2], backend="torch",
            quality_tiers=[pb2.QualityTier(name="fast", steps=2), pb2.QualityTier(name="best", steps=8)],
        )  # fmt: skip

    async def GenerateStream(self, request: Any, context: Any) -> Any:  # noqa: N802 - the RPC's name
        index = next(self.arrivals)
        self.seen.append(request)
        if request.prompt == "reject":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        c = request.compute
        if c.HasField("steps"):
            steps, reason = c.steps, "explicit"
        elif c.HasField("quality"):
            steps, reason = (2 if c.quality == "fast" else MAX_STEPS), f"quality:{c.quality}"
        else:
            steps, reason = 3, "default:slo"
        experts = c.experts_top_k if c.HasField("experts_top_k") else 2
        if self.lock is None:
            self.lock = asyncio.Lock()
        n = request.sampling.max_tokens or 4
        draft = c.draft_steps if c.HasField("draft_steps") else 0
        spec = None
        if draft:
            accepted = round((n - 1) * draft / steps)
            spec = pb2.SpeculationReport(ran=True, draft_steps=draft, draft_tokens=c.draft_tokens or 4,
                                         drafted_tokens=n - 1, accepted_tokens=accepted)  # fmt: skip
        async with self.lock if self.serial else _nothing():
            if index == self.stall_index:
                await asyncio.sleep(self.stall_s)
            for i in range(n):
                await asyncio.sleep(self.token_s * steps * (0.5 if draft else 1.0))
                last = i == n - 1
                yield pb2.GenerateResponse(
                    request_id=str(index), text=f" w{i}", token_ids=[i],
                    finish_reason=pb2.FINISH_REASON_LENGTH if last else pb2.FINISH_REASON_UNSPECIFIED,
                    usage=pb2.Usage(prompt_tokens=len(request.prompt.split()), completion_tokens=i + 1),
                    compute=pb2.ComputeUsed(steps=steps, experts=experts, policy_reason=reason,
                                            speculation=spec if last else None),
                )  # fmt: skip


class _nothing:  # noqa: N801 - used like contextlib.nullcontext, but async
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeServer:
    """The servicer on a background loop; `target` is "127.0.0.1:PORT"."""

    def __init__(self, **kw: Any) -> None:
        self.servicer = FakeServicer(**kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        pb2_grpc.add_TextGenerationServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def fake_server() -> Iterator[Any]:
    """`fake_server(token_s=0.002, serial=False, stall_index=None, stall_s=0.3)` -> a started FakeServer."""
    started: list[FakeServer] = []

    def make(token_s: float = 0.002, serial: bool = False, stall_index: int | None = None,
             stall_s: float = 0.3) -> FakeServer:  # fmt: skip
        server = FakeServer(token_s=token_s, serial=serial, stall_index=stall_index, stall_s=stall_s)
        started.append(server)
        return server

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def fakes() -> Iterator[Any]:
    """The fuzzer's fake gRPC and HTTP servers (tests/loadtest/fuzz_fakes.py): (state, grpc, http)."""
    from tests.loadtest.fuzz_fakes import fake_servers

    with fake_servers() as servers:
        yield servers

"""A Locust user issuing the same `GenerateStream` calls as `leanserve loadtest`.

For users who prefer Locust's UI and its own load shapes (note that Locust is
a closed-loop driver: each user waits for its response, so it does not correct
for coordinated omission the way `leanserve loadtest --mode open` does).

    pip install -e '.[loadtest]'
    LEANSERVE_TARGET=127.0.0.1:9000 LEANSERVE_STEPS=8 \
        locust -f loadtest/locustfile.py --headless -u 4 -r 2 -t 30s --host 127.0.0.1:9000

Environment (read when the user starts, never at import):
    LEANSERVE_STEPS      explicit steps per token (unset = the server's default policy)
    LEANSERVE_QUALITY    quality tier ("fast", "balanced", "best")
    LEANSERVE_MAX_TOKENS tokens per request (default 32)
    LEANSERVE_PROMPTS    "synthetic" (default) or "bible"
    LEANSERVE_PROMPT_LENGTHS  words per prompt, as `leanserve loadtest --prompt-lengths` (default fixed:16)

Two request events are fired per call: "GenerateStream" (response_time = E2E
in ms, response_length = completion tokens) and "GenerateStream TTFT".
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, between, task

from loadtest.arrivals import LengthSpec, build_prompts
from runtime.client import channel_options
from runtime.proto_build import load_stubs

# grpc's C core must cooperate with gevent, on which every Locust user runs.
grpc_gevent.init_gevent()


class LeanServeUser(User):
    """One simulated client of `leanserve.v1.TextGeneration`."""

    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        self.pb2, pb2_grpc = load_stubs()
        target = os.environ.get("LEANSERVE_TARGET") or self.host or "127.0.0.1:9000"
        self.channel = grpc.insecure_channel(
            target.removeprefix("grpc://").removeprefix("http://"), options=channel_options()
        )
        self.stub = pb2_grpc.TextGenerationStub(self.channel)
        compute: dict[str, Any] = {}
        if os.environ.get("LEANSERVE_STEPS"):
            compute["steps"] = int(os.environ["LEANSERVE_STEPS"])
        if os.environ.get("LEANSERVE_QUALITY"):
            compute["quality"] = os.environ["LEANSERVE_QUALITY"]
        self.compute = compute
        self.max_tokens = int(os.environ.get("LEANSERVE_MAX_TOKENS", "32"))
        lengths = LengthSpec.parse(os.environ.get("LEANSERVE_PROMPT_LENGTHS", "fixed:16"))
        self.prompts = build_prompts(64, lengths, os.environ.get("LEANSERVE_PROMPTS", "synthetic"))
        self.rng = random.Random()

    def on_stop(self) -> None:
        self.channel.close()

    def _fire(self, name: str, start: float, seconds: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=seconds * 1e3,
            response_length=length,
            exception=exc,
            context={"compute": self.compute},
            start_time=start,
        )

    @task
    def generate_stream(self) -> None:
        """One `GenerateStream` call, timed like the asyncio driver (TTFT, E2E)."""
        pb2 = self.pb2
        request = pb2.GenerateRequest(
            prompt=self.rng.choice(self.prompts),
            sampling=pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0.0),
            compute=pb2.ComputeParams(**self.compute),
        )
        start_wall, start = time.time(), time.perf_counter()
        tokens, first = 0, None
        try:
            for msg in self.stub.GenerateStream(request, timeout=60):
                if first is None and (msg.text or msg.token_ids):
                    first = time.perf_counter() - start
                    self._fire("GenerateStream TTFT", start_wall, first, 0, None)
                tokens = msg.usage.completion_tokens or tokens + len(msg.token_ids)
        except grpc.RpcError as e:
            self._fire("GenerateStream", start_wall, time.perf_counter() - start, 0, e)
            return
        self._fire("GenerateStream", start_wall, time.perf_counter() - start, tokens, None)

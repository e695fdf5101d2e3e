"""Sending fuzz cases: `Sender` talks gRPC (raw bytes through `request_serializer=lambda b: b`, so
malformed messages go out as they are) and HTTP (`http.client`, so headers such as a lying
Content-Length go out as written), classifies each response into an `Outcome`, and runs the
health checks. It talks to 127.0.0.1 / localhost only (`check_loopback`).
"""

from __future__ import annotations

import http.client
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from loadtest.fuzz_case import (
    BAD,
    COMPLETIONS,
    JSON_HEADERS,
    MB,
    REJECTED,
    TIMEOUT,
    Case,
    Outcome,
    classify_grpc,
    classify_http,
    openai_shaped,
)

SERVICE = "leanserve.v1.TextGeneration"


def check_loopback(host: str) -> None:
    """Refuse anything but the local machine.

    Raises:
        ValueError: `host` is not 127.0.0.1, ::1 or localhost.
    """
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        raise ValueError(f"{host!r}: the fuzzer only talks to 127.0.0.1 / localhost")


def _grpc_host(target: str) -> str:
    return target.rsplit(":", 1)[0]


class Sender:
    """Sends cases over gRPC (raw bytes) and HTTP, and runs health checks.

    Args:
        grpc_target: "127.0.0.1:PORT" (None: no gRPC).
        http_url: "http://127.0.0.1:PORT" (None: no HTTP).
        timeout_s: per-request deadline.
        max_response_bytes: a response longer than this is cut off (noted in `detail`).
    """

    def __init__(
        self,
        grpc_target: str | None,
        http_url: str | None,
        timeout_s: float = 30.0,
        max_response_bytes: int = 16 * MB,
    ) -> None:
        self.grpc_target = grpc_target
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.channel: grpc.Channel | None = None
        self.http: tuple[str, int] | None = None
        if grpc_target:
            check_loopback(_grpc_host(grpc_target))
            self.channel = grpc.insecure_channel(
                grpc_target,
                options=[
                    ("grpc.enable_retries", 0),  # see every response as the server gave it
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", 256 * MB),
                ],
            )
        if http_url:
            parsed = urllib.parse.urlsplit(http_url)
            check_loopback(parsed.hostname or "")
            self.http = (parsed.hostname or "127.0.0.1", parsed.port or 80)

    def close(self) -> None:
        """Close the gRPC channel."""
        if self.channel is not None:
            self.channel.close()

    def _raw(self, method: str, stream: bool) -> Any:
        assert self.channel is not None, "no gRPC target"
        path = f"/{SERVICE}/{method}"
        ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731 - the raw-bytes (de)serializer
        make = self.channel.unary_stream if stream else self.channel.unary_unary
        return make(path, request_serializer=ident, response_deserializer=ident)

    def send_grpc(
        self, payload: bytes, method: str, metadata: Sequence[tuple[str, str]] = ()
    ) -> tuple[str, str, int]:
        """(status code name, details, response bytes) of one raw call."""
        stream = method == "GenerateStream"
        call = self._raw(method, stream)
        size = 0
        meta = list(metadata) or None
        try:
            if not stream:
                return "OK", "", len(call(payload, timeout=self.timeout_s, metadata=meta))
            responses = call(payload, timeout=self.timeout_s, metadata=meta)
            for msg in responses:
                size += len(msg)
                if size > self.max_response_bytes:
                    responses.cancel()
                    return "OK", f"stream cut off at {size} response bytes", size
            return "OK", "", size
        except grpc.RpcError as e:
            code = e.code().name if e.code() is not None else "UNKNOWN"
            return code, (e.details() or "")[:500], size

    def send_http(self, case: Case) -> tuple[int | None, bytes, str]:
        """(status or None, body (capped), error text) of one HTTP request."""
        assert self.http is not None, "no HTTP URL"
        conn = http.client.HTTPConnection(*self.http, timeout=self.timeout_s)
        try:
            headers = dict(case.headers)
            length = headers.pop("Content-Length", None)
            conn.putrequest(case.method, case.path)
            for key, value in headers.items():
                conn.putheader(key, value)
            conn.putheader("Content-Length", length or str(len(case.payload)))
            conn.endheaders()
            if case.payload:
                conn.send(case.payload if length is None else case.payload[: int(length)])
            resp = conn.getresponse()
            body = resp.read(self.max_response_bytes)
            return resp.status, body, ""
        except TimeoutError as e:
            return None, b"", f"timeout: {e}"
        except (OSError, http.client.HTTPException) as e:
            return None, b"", f"{type(e).__name__}: {e}"
        finally:
            conn.close()

    def send(self, case: Case) -> Outcome:
        """Send one case and classify the response."""
        t0 = time.monotonic()
        size = 0
        if case.kind == "http":
            status, body, error = self.send_http(case)
            size = len(body)
            if status is None:
                verdict = TIMEOUT if error.startswith("timeout") else BAD
                code, detail = ("HTTP_TIMEOUT" if verdict == TIMEOUT else "HTTP_NO_RESPONSE"), error
            else:
                verdict, code = classify_http(status, body)
                detail = body[:500].decode("utf-8", "backslashreplace")
                if verdict == REJECTED and not openai_shaped(body):
                    detail = "[error body not OpenAI-shaped] " + detail
        else:
            code, detail, size = self.send_grpc(case.payload, case.method, case.metadata)
            verdict = classify_grpc(code)
        return Outcome(
            case.index, case.kind, case.label, verdict, code, detail, time.monotonic() - t0, size,
            case.describe() if verdict == BAD else "",
        )  # fmt: skip

    def healthy(self, pb2: Any | None) -> tuple[bool, str]:
        """(ok, why not): `/healthz` says ready and a normal request runs (each transport on)."""
        problems = []
        if self.http is not None:
            status, body, error = self.send_http(Case(0, "http", "health", b"", "GET", "/healthz"))
            if status != 200:
                problems.append(f"/healthz {status or error}: {body[:200]!r}")
            normal = b'{"prompt": "God said", "max_tokens": 2}'
            status, body, error = self.send_http(
                Case(0, "http", "normal", normal, "POST", COMPLETIONS, JSON_HEADERS)
            )
            if status != 200:
                problems.append(f"normal HTTP request {status or error}: {body[:200]!r}")
        if self.channel is not None and pb2 is not None:
            req = pb2.GenerateRequest(prompt="God said", sampling=pb2.SamplingParams(max_tokens=2))
            code, detail, _ = self.send_grpc(req.SerializeToString(), "Generate")
            if code != "OK":
                problems.append(f"normal gRPC request {code}: {detail[:200]}")
        return not problems, "; ".join(problems)

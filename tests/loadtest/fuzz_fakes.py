"""Fake gRPC and HTTP servers on 127.0.0.1 for the fuzzer's tests: they answer like a server that
refuses bad input, fail on "boom" / "explode", and a "kill" request makes the health check fail twice."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from loadtest import fuzz_transport


class FakeState:
    """Shared by the fake gRPC and HTTP servers: a `b"kill"` request makes health fail twice."""

    def __init__(self) -> None:
        self.dead_checks = 0
        self.lock = threading.Lock()

    def health_ok(self) -> bool:
        with self.lock:
            if self.dead_checks > 0:
                self.dead_checks -= 1
                return False
            return True


def grpc_server(state: FakeState) -> tuple[grpc.Server, str]:
    def generate(request: bytes, context: Any) -> bytes:
        if b"boom" in request:
            context.abort(grpc.StatusCode.INTERNAL, "server bug")
        if b"kill" in request:
            with state.lock:
                state.dead_checks = 2
            context.abort(grpc.StatusCode.UNAVAILABLE, "engine is dead")
        if b"bad" in request:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: bad")
        if not state.health_ok():
            context.abort(grpc.StatusCode.UNAVAILABLE, "engine is dead")
        return b"\x0a\x02ok"

    def stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(3):
            yield b"\x0a\x02ok"

    handler = grpc.method_handlers_generic_handler(
        fuzz_transport.SERVICE,
        {
            "Generate": grpc.unary_unary_rpc_method_handler(generate),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def http_server(state: FakeState) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/healthz":
                ok = state.health_ok()
                self._send(200 if ok else 503, b'{"ready": %s}' % (b"true" if ok else b"false"))
            elif self.path == "/stats":
                self._send(200, json.dumps({"rss_bytes": 123456789}).encode())
            else:
                self._send(404, b'{"detail": "Not Found"}')

        def do_DELETE(self) -> None:  # noqa: N802
            self._send(405, b'{"error": {"message": "method not allowed", "type": "invalid_request_error"}}')

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if b"explode" in body:
                self._send(500, b"Internal Server Error")
                return
            try:
                json.loads(body)
            except (ValueError, RecursionError):
                self._send(400, b'{"error": {"message": "body: not JSON", "type": "invalid_request_error"}}')
                return
            self._send(200, b'{"choices": [{"text": "ok"}]}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def fake_servers() -> Iterator[tuple[FakeState, str, str]]:
    """(shared state, gRPC target, HTTP URL) of a fake gRPC and a fake HTTP server; stopped after."""
    state = FakeState()
    grpc_srv, target = grpc_server(state)
    http_srv, url = http_server(state)
    try:
        yield state, target, url
    finally:
        grpc_srv.stop(0).wait(5)
        http_srv.shutdown()
        http_srv.server_close()

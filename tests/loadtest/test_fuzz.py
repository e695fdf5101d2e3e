"""loadtest.fuzz: generators, classifier and the run loop, against fake servers on 127.0.0.1 (no Ray)."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from loadtest import fuzz
from runtime.proto_build import load_stubs

pb2, _ = load_stubs()


# --- generators --------------------------------------------------------------------------------


def test_wire_helpers_build_what_protobuf_parses() -> None:
    sampling = fuzz.length_delimited(2, fuzz.tag(1, 0) + fuzz.varint(300))
    msg = pb2.GenerateRequest.FromString(fuzz.length_delimited(1, "é".encode()) + sampling)
    assert (msg.prompt, msg.sampling.max_tokens) == ("é", 300)
    assert fuzz.varint(0) == b"\x00" and fuzz.varint(2**64 - 1) == b"\xff" * 9 + b"\x01"


def test_cases_are_deterministic_per_seed_and_bounded() -> None:
    a, b = fuzz.generate_cases(pb2, 3, 300), fuzz.generate_cases(pb2, 3, 300)
    assert [(c.kind, c.label, c.payload) for c in a] == [(c.kind, c.label, c.payload) for c in b]
    assert [c.index for c in a] == list(range(300))
    assert [c.payload for c in fuzz.generate_cases(pb2, 4, 300)] != [c.payload for c in a]
    assert {c.kind for c in a} == {"grpc", "grpc_raw", "http"}
    assert max(len(c.payload) for c in a) <= 9 * fuzz.MB
    only_http = fuzz.generate_cases(None, 0, 50, grpc_on=False)
    assert {c.kind for c in only_http} == {"http"}
    with pytest.raises(ValueError):
        fuzz.generate_cases(pb2, 0, 10, grpc_on=False, http_on=False)


def test_grpc_cases_reach_every_field_with_float32_edges() -> None:
    maker = fuzz.GrpcCaseMaker(pb2)
    paths = {path for path, _ in maker.leaves}
    assert {"prompt", "request_id", "sampling.temperature", "sampling.top_p", "sampling.stop"} <= paths
    cases = [c for c in fuzz.generate_cases(pb2, 0, 2000) if c.kind == "grpc"]
    labels = " ".join(c.label for c in cases)
    assert all(f"{p}=" in labels for p in paths), sorted(p for p in paths if f"{p}=" not in labels)
    temps = set()
    for c in cases:
        msg = pb2.GenerateRequest.FromString(c.payload)  # well-formed: protobuf parses it
        if msg.sampling.HasField("temperature"):
            temps.add(struct.pack("<f", msg.sampling.temperature))
    wanted = [1e-45, 1e-40, math.inf, -math.inf, math.nan, -0.0, 0.0]
    assert all(struct.pack("<f", v) in temps for v in wanted)
    assert any(c.method == "GenerateStream" for c in cases) and any(c.metadata for c in cases)


def test_raw_cases_hold_what_protobuf_refuses() -> None:
    import random

    raw = dict((label, data) for data, label in fuzz.raw_grpc_payloads(pb2, random.Random(0)))
    for label in ("prompt=invalid UTF-8", "request_id=invalid UTF-8", "sampling.stop=[invalid UTF-8]"):
        with pytest.raises(DecodeError):
            pb2.GenerateRequest.FromString(raw[label])
    assert len(raw[f"prompt over 4 MB ({fuzz.OVERSIZE_BYTES} B)"]) > 4 * fuzz.MB
    assert pb2.GenerateRequest.FromString(raw["empty message"]).prompt == ""


def test_http_cases_cover_the_hostile_json_forms() -> None:
    cases = [c for c in fuzz.generate_cases(pb2, 0, 1500) if c.kind == "http"]
    bodies = [c.payload for c in cases]
    assert any(b'"\\ud800"' in body for body in bodies)  # a lone surrogate in the JSON text
    assert any(str(10**400).encode() in body for body in bodies)
    assert any(body.startswith(b"[" * 1000) for body in bodies)
    assert any(b"NaN" in body for body in bodies) and any(b"Infinity" in body for body in bodies)
    labels = " ".join(c.label for c in cases)
    for name in ("logprobs=", "n=", "echo=", "prompt=[", "an unknown field", "non-JSON body"):
        assert name in labels, name
    mutated = [c for c in cases if c.path == "/v1/completions" and c.label.count("=") >= 1]
    for c in mutated:
        json.loads(c.payload)  # Python's json reads every mutated body (NaN, 1e999, surrogates too)


def test_dumps_with_raw_inserts_verbatim_text() -> None:
    text = fuzz.dumps_with_raw({"a": fuzz.Raw("1e999"), "b": [fuzz.Raw('"\\ud800"'), 1]})
    assert text == '{"a": 1e999, "b": ["\\ud800", 1]}'
    assert fuzz.deep_json(3) == "[[[]]]" and fuzz.deep_json(2, "dict") == '{"a":{"a":1}}'


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        ("OK", fuzz.OK),
        ("INVALID_ARGUMENT", fuzz.REJECTED),
        ("RESOURCE_EXHAUSTED", fuzz.REJECTED),
        ("UNAUTHENTICATED", fuzz.REJECTED),
        ("UNAVAILABLE", fuzz.UNAVAILABLE),
        ("DEADLINE_EXCEEDED", fuzz.TIMEOUT),
        ("INTERNAL", fuzz.BAD),
        ("UNKNOWN", fuzz.BAD),
        ("DATA_LOSS", fuzz.BAD),
        ("UNIMPLEMENTED", fuzz.BAD),
    ],
)
def test_classify_grpc(code: str, verdict: str) -> None:
    assert fuzz.classify_grpc(code) == verdict


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, b'{"choices": []}', fuzz.OK),
        (200, b'data: {"choices": []}\n\ndata: [DONE]\n\n', fuzz.OK),
        (200, b'data: {"error": {"message": "x", "code": "internal"}}\n\n', fuzz.BAD),
        (200, b'data: {"error": {"message": "x", "code": "invalid_argument"}}\n\n', fuzz.REJECTED),
        (400, b"{}", fuzz.REJECTED),
        (413, b"", fuzz.REJECTED),
        (422, b"", fuzz.REJECTED),
        (503, b"", fuzz.UNAVAILABLE),
        (504, b"", fuzz.TIMEOUT),
        (500, b"Internal Server Error", fuzz.BAD),
        (502, b"", fuzz.BAD),
    ],
)
def test_classify_http(status: int, body: bytes, verdict: str) -> None:
    assert fuzz.classify_http(status, body)[0] == verdict


def test_openai_shape_and_loopback_guard() -> None:
    assert fuzz.openai_shaped(b'{"error": {"message": "m", "type": "t", "param": null, "code": "c"}}')
    assert not fuzz.openai_shaped(b'{"detail": "Not Found"}') and not fuzz.openai_shaped(b"oops")
    for host in ("10.0.0.1", "example.com", "0.0.0.0"):
        with pytest.raises(ValueError):
            fuzz.check_loopback(host)
    fuzz.check_loopback("127.0.0.1")


def test_process_helpers() -> None:
    rss = fuzz.read_rss_bytes(os.getpid())
    assert rss is not None and rss > 1 << 20
    assert fuzz.read_rss_bytes(2**22 + 12345) is None
    assert fuzz._is_descendant(os.getpid(), os.getppid())
    assert not fuzz._is_descendant(os.getppid(), os.getpid())
    with pytest.raises(RuntimeError):
        fuzz.replica_pids()  # no Ray in this process


# --- the run loop against fake servers ---------------------------------------------------------


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


def _grpc_server(state: FakeState) -> tuple[grpc.Server, str]:
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
        fuzz.SERVICE,
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


def _http_server(state: FakeState) -> tuple[ThreadingHTTPServer, str]:
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


@pytest.fixture
def fakes() -> Iterator[tuple[FakeState, str, str]]:
    state = FakeState()
    grpc_server, target = _grpc_server(state)
    http_server, url = _http_server(state)
    yield state, target, url
    grpc_server.stop(0).wait(5)
    http_server.shutdown()
    http_server.server_close()


def _case(index: int, kind: str, payload: bytes, label: str = "t") -> fuzz.Case:
    if kind == "http":
        return fuzz.Case(index, kind, label, payload, "POST", fuzz.COMPLETIONS, dict(fuzz.JSON_HEADERS))
    return fuzz.Case(index, kind, label, payload, "Generate")


def test_run_classifies_counts_deaths_and_recovers(fakes) -> None:
    _, target, url = fakes
    cases = [
        _case(0, "grpc", b"\x0a\x02hi"),
        _case(1, "grpc_raw", b"bad"),
        _case(2, "grpc", b"boom", "the INTERNAL one"),
        _case(3, "http", b'{"prompt": "x"}'),
        _case(4, "http", b"not json"),
        _case(5, "http", b'{"prompt": "explode"}', "the 500 one"),
        _case(6, "grpc", b"kill", "the killer"),
        _case(7, "grpc", b"\x0a\x02hi"),
        fuzz.Case(8, "grpc", "stream", b"\x0a\x02hi", "GenerateStream"),
    ]
    sender = fuzz.Sender(target, url, timeout_s=10)
    try:
        report = fuzz.run_fuzz(sender, pb2, cases, health_every=3, recovery_timeout_s=10)
    finally:
        sender.close()
    verdicts = [o.verdict for o in report.outcomes]
    assert verdicts == ["OK", "REJECTED", "BAD", "OK", "REJECTED", "BAD", "UNAVAILABLE", "OK", "OK"]
    assert [o.index for o in report.bad] == [2, 5]
    assert report.bad[0].input.startswith("grpc Generate [the INTERNAL one]")
    assert len(report.deaths) == 1 and report.deaths[0].after_index == 6
    assert report.deaths[0].recovered_after_s is not None
    assert any("the killer" in s for s in report.deaths[0].suspects)
    assert not report.ok and not report.stopped_early
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert data["verdicts"]["grpc"]["BAD"] == 1 and len(data["bad"]) == 2
    table = fuzz.summary_table(report)
    assert "engine deaths: 1" in table and "BAD #2 INTERNAL" in table


def test_run_stops_at_the_time_limit(fakes) -> None:
    _, target, url = fakes
    sender = fuzz.Sender(target, url, timeout_s=10)
    try:
        cases = [_case(i, "grpc", b"\x0a\x02hi") for i in range(50)]
        report = fuzz.run_fuzz(sender, pb2, cases, time_limit_s=0.0)
    finally:
        sender.close()
    assert len(report.outcomes) <= 1 and "time limit" in report.stopped_early


def test_soak_reads_rss_from_a_pid_or_stats(fakes) -> None:
    _, target, url = fakes
    sender = fuzz.Sender(target, url, timeout_s=10)
    try:
        soak = fuzz.run_soak(sender, pb2, 30, pids=[os.getpid()], warmup=5, samples=3)
        assert soak.requests == 30 and soak.verdicts == {"OK": 30}
        assert soak.rss_source.startswith("/proc/") and soak.growth_pct is not None
        assert "growth" in fuzz.soak_summary(soak)
        assert fuzz.run_soak(sender, pb2, 5).rss_before == 123456789  # /stats rss_bytes
    finally:
        sender.close()


def test_main_exit_codes(fakes, tmp_path, capsys) -> None:
    state, target, url = fakes
    assert fuzz.main([]) == 2
    assert fuzz.main(["--grpc", "10.1.2.3:9000"]) == 2
    out = tmp_path / "f.json"
    rc = fuzz.main(["--grpc", target, "--http", url, "--requests", "30", "--seed", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().out  # the fakes answer every hostile case without a 5xx
    assert json.loads(out.read_text())["sent"] == 30
    assert fuzz.main(["--http", url, "--soak", "10", "--pid", str(os.getpid()), "--quiet"]) == 0

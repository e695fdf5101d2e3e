"""loadtest.fuzz_case: the verdict of a gRPC code and of an HTTP response, the OpenAI error shape."""

from __future__ import annotations

import pytest

from loadtest import fuzz_case


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        ("OK", fuzz_case.OK),
        ("INVALID_ARGUMENT", fuzz_case.REJECTED),
        ("RESOURCE_EXHAUSTED", fuzz_case.REJECTED),
        ("UNAUTHENTICATED", fuzz_case.REJECTED),
        ("UNAVAILABLE", fuzz_case.UNAVAILABLE),
        ("DEADLINE_EXCEEDED", fuzz_case.TIMEOUT),
        ("INTERNAL", fuzz_case.BAD),
        ("UNKNOWN", fuzz_case.BAD),
        ("DATA_LOSS", fuzz_case.BAD),
        ("UNIMPLEMENTED", fuzz_case.BAD),
    ],
)
def test_classify_grpc(code: str, verdict: str) -> None:
    assert fuzz_case.classify_grpc(code) == verdict


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, b'{"choices": []}', fuzz_case.OK),
        (200, b'data: {"choices": []}\n\ndata: [DONE]\n\n', fuzz_case.OK),
        (200, b'data: {"error": {"message": "x", "code": "internal"}}\n\n', fuzz_case.BAD),
        (200, b'data: {"error": {"message": "x", "code": "invalid_argument"}}\n\n', fuzz_case.REJECTED),
        (400, b"{}", fuzz_case.REJECTED),
        (413, b"", fuzz_case.REJECTED),
        (422, b"", fuzz_case.REJECTED),
        (503, b"", fuzz_case.UNAVAILABLE),
        (504, b"", fuzz_case.TIMEOUT),
        (500, b"Internal Server Error", fuzz_case.BAD),
        (502, b"", fuzz_case.BAD),
    ],
)
def test_classify_http(status: int, body: bytes, verdict: str) -> None:
    assert fuzz_case.classify_http(status, body)[0] == verdict


def test_openai_shape() -> None:
    assert fuzz_case.openai_shaped(b'{"error": {"message": "m", "type": "t", "param": null, "code": "c"}}')
    assert not fuzz_case.openai_shaped(b'{"detail": "Not Found"}') and not fuzz_case.openai_shaped(b"oops")

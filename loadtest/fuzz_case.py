"""One fuzz request (`Case`), its classified response (`Outcome`), and the verdicts.

`classify_grpc` and `classify_http` turn a gRPC status code or an HTTP response into one of
`VERDICTS` (see loadtest/fuzz.py's docstring for what each means); `openai_shaped` checks an
HTTP error body's shape. The generators (loadtest/fuzz_grpc_cases.py, loadtest/fuzz_http_cases.py),
the sender (loadtest/fuzz_transport.py) and the reports all share these.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

OK, REJECTED, UNAVAILABLE, TIMEOUT, BAD = "OK", "REJECTED", "UNAVAILABLE", "TIMEOUT", "BAD"
VERDICTS = (OK, REJECTED, UNAVAILABLE, TIMEOUT, BAD)

# gRPC codes that mean "the server refused this input" (expected for hostile requests).
REJECT_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "OUT_OF_RANGE",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "CANCELLED",
        "ABORTED",
    }
)
BAD_CODES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"})
MB = 1 << 20
JSON_HEADERS = {"Content-Type": "application/json"}
COMPLETIONS = "/v1/completions"

# The huge strings of both generators (gRPC and HTTP): the "1 MB prompt / request_id" of the issue.
HUGE_TEXT_BYTES = MB


@dataclass
class Case:
    """One hostile request.

    Attributes:
        index: position in the run (for `--replay`).
        kind: "grpc" (a well-formed message), "grpc_raw" (malformed bytes) or "http".
        label: what is hostile about it, e.g. "sampling.temperature=1e-45".
        payload: the request body as bytes (serialized message or HTTP body).
        method: gRPC "Generate" / "GenerateStream", or the HTTP method.
        path: HTTP path.
        headers: HTTP headers.
        metadata: gRPC metadata.
    """

    index: int
    kind: str
    label: str
    payload: bytes
    method: str = "Generate"
    path: str = "/v1/completions"
    headers: dict[str, str] = field(default_factory=dict)
    metadata: list[tuple[str, str]] = field(default_factory=list)

    def describe(self, limit: int = 300) -> str:
        """The input, abbreviated for reports: label, size and the start of the payload."""
        head = self.payload[:limit]
        if self.kind == "http":
            shown = head.decode("utf-8", "backslashreplace")
        else:
            shown = head.hex()
        more = "..." if len(self.payload) > limit else ""
        target = self.method if self.kind != "http" else f"{self.method} {self.path}"
        meta = f" metadata={[(k, short(v)) for k, v in self.metadata]}" if self.metadata else ""
        return f"{self.kind} {target} [{self.label}]{meta} {len(self.payload)} B: {shown}{more}"


@dataclass
class Outcome:
    """The classified response to one case."""

    index: int
    kind: str
    label: str
    verdict: str
    code: str
    detail: str
    seconds: float
    response_bytes: int = 0
    input: str = ""


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


# --- classification --------------------------------------------------------------------------


def classify_grpc(code: str) -> str:
    """Verdict of a gRPC status code name ("OK", "INVALID_ARGUMENT", ...)."""
    if code == "OK":
        return OK
    if code == "UNAVAILABLE":
        return UNAVAILABLE
    if code == "DEADLINE_EXCEEDED":
        return TIMEOUT
    if code in REJECT_CODES:
        return REJECTED
    return BAD  # INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED and anything unexpected


def _stream_error_code(body: bytes) -> str | None:
    """The `error.code` of an in-band error chunk of an SSE body, if any."""
    for line in body.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:") or b'"error"' not in line:
            continue
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            error = json.loads(line[5:])["error"]
            return str(error.get("code") or error.get("type") or "unknown")
    return None


def classify_http(status: int, body: bytes = b"") -> tuple[str, str]:
    """(verdict, code) of an HTTP response; a 200 stream is searched for in-band errors."""
    if 200 <= status < 300:
        in_band = _stream_error_code(body) if b"data:" in body[:64] else None
        if in_band is None:
            return OK, str(status)
        # The server puts the gRPC code's name (lower case) in `error.code`: classify it the same way.
        return classify_grpc(in_band.upper()), f"200+error:{in_band}"
    if status == 503:
        return UNAVAILABLE, "503"
    if status in (408, 504):
        return TIMEOUT, str(status)
    if 400 <= status < 500:
        return REJECTED, str(status)
    return BAD, str(status)


def openai_shaped(body: bytes) -> bool:
    """Whether an error body is `{"error": {"message": ..., ...}}` (OpenAI's shape)."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, TypeError, KeyError):
        return False
    return isinstance(error, dict) and isinstance(error.get("message"), str)

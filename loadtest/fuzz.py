"""Bounded fuzzer and soak driver for a running leanserve server (127.0.0.1 only).

    python -m loadtest.fuzz --grpc 127.0.0.1:9000 --http http://127.0.0.1:8000 \\
        --requests 5000 --seed 0 --time-limit 900 --out runs/fuzz/fuzz.json
    python -m loadtest.fuzz --grpc 127.0.0.1:9000 --http http://127.0.0.1:8000 --soak 10000

Fuzz mode sends hostile requests, one at a time (so a failure is attributable):

* gRPC `GenerateRequest`s built from the message descriptor, so every field the
  proto has (today's and tomorrow's) gets edge values of its type: float32 edges
  (1e-45, denormals, nan, +-inf, -0.0, values that round to 0 or overflow in
  float32), integer edges up to the type's maximum, empty / 1 MB / non-ASCII
  strings, thousands of stop strings. They go out as bytes through a raw-bytes
  method (`request_serializer=lambda b: b`), which also carries what protobuf
  cannot build: invalid UTF-8 in string fields, truncated and garbage messages,
  wrong wire types, lengths past the end, unknown fields, deep group nesting,
  messages over 4 MB.
* HTTP `/v1/completions` bodies: wrong types for every field, nulls, lists,
  nested objects, integers like 10**400, lone surrogates (`"\\ud800"` in the
  JSON text), NaN / Infinity tokens, JSON nested 100,000 deep, non-JSON and
  huge bodies, unknown fields, OpenAI list and token-id prompts, `logprobs`,
  `n`, `echo`, penalties; plus other routes and methods.

Every response is classified (`classify_grpc`, `classify_http`):

* OK: the request ran;
* REJECTED: a client error (4xx; gRPC INVALID_ARGUMENT, OUT_OF_RANGE,
  FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...): expected;
* UNAVAILABLE: HTTP 503 / gRPC UNAVAILABLE, legitimate while a replica restarts
  (the health checks say whether the engine died);
* TIMEOUT: the client's deadline passed (DEADLINE_EXCEEDED, HTTP read timeout);
* BAD: HTTP 5xx other than 503, gRPC INTERNAL / UNKNOWN / DATA_LOSS /
  UNIMPLEMENTED, an error chunk with such a code inside a 200 stream, or a
  connection dropped without a response.

Every `--health-every` requests the fuzzer checks `/healthz` and sends one normal
request; when either fails, that is an engine death: it is counted, the cases
since the last good check are recorded as suspects, and the fuzzer waits (at
most `--recovery-timeout`) for the server to come back, recording how long it
took. The summary is printed as a table and written as JSON (`--out`), each
BAD case with its input (abbreviated) and the response. The exit status is 1
when there was any BAD response or death.

Soak mode (`--soak N`) sends N valid, mixed requests (unary, stream, HTTP,
various step counts, sampling settings, stop strings) and reports the replica's
resident memory before (after a warm-up) and after: from `--pid` (read
/proc/PID/status), else the `rss_bytes` field of `/stats` if the server has one,
else, when this process is the Ray driver of the cluster, the replica actors'
pids from Ray's state (GCS) API. Exit status 1 when a request failed or RSS grew
more than `--max-rss-growth` percent.

Cases come from a seeded `random.Random` (`--seed`): the same seed gives the same
cases, so a BAD case can be re-sent with `--replay INDEX`.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import random
import struct
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc

SERVICE = "leanserve.v1.TextGeneration"
REPLICA_CLASS = "ServeReplica:leanserve:LeanServer"  # Ray's actor class name of the replicas

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

# --- edge values -----------------------------------------------------------------------------

FLOAT32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
FLOAT_EDGES: tuple[float, ...] = (
    0.0,
    -0.0,
    1e-45,  # rounds to the smallest float32 denormal, 1.4e-45
    1.4e-45,
    1e-40,  # a float32 denormal
    1.1754942e-38,  # largest float32 denormal
    1.17549435e-38,  # smallest normal
    1e-300,  # a valid double that is 0 in float32
    1e-7,
    0.5,
    1.0,
    1.0000001,
    2.0,
    100.0,
    1e30,
    FLOAT32_MAX,
    1e39,  # overflows float32 to inf
    math.inf,
    -math.inf,
    math.nan,
    -1.0,
    -1e-45,
    -FLOAT32_MAX,
)
INT_EDGES: tuple[int, ...] = (
    0, 1, 2, 3, 4, 5, 7, 12, 16, 63, 64, 65, 100, 1000, 4096, 2**15, 2**16, 2**31 - 1, 2**31,
    2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**31), -(2**63),
)  # fmt: skip
TEXT_EDGES: tuple[str, ...] = (
    "",
    " ",
    "God said",
    "a",
    "\x00",
    "\x00" * 100,
    "\u2028\u2029",
    "\ufeff",
    "é" * 50,
    "🙂" * 200,
    "\r\n" * 500,
    "<|endoftext|>",
    "\U0010ffff",
    "%s%n{}{0}",
    "A" * 4096,
    "ab" * 50_000,  # 100 KB
)
METADATA_EDGES: dict[str, tuple[str, ...]] = {
    "x-leanserve-timeout-ms": ("nan", "-1", "0", "1e400", "inf", "", "abc", "1" * 1000, "0.000001", "1e-300"),
    "x-leanserve-client": ("", "a", "c" * 4000, "client with spaces", "~!@#$%^&*()"),
    "authorization": ("", "Bearer", "Bearer x", "Basic Zm9vOmJhcg=="),
}
QUALITY_EDGES = ("fast", "balanced", "best", "FAST", "fast ", "none", "", "x" * 1000)
HUGE_TEXT_BYTES = MB  # the "1 MB prompt / request_id" of the issue
OVERSIZE_BYTES = 4 * MB + 64 * 1024  # past gRPC's 4 MB default message limit


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
        meta = f" metadata={[(k, _short(v)) for k, v in self.metadata]}" if self.metadata else ""
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


# --- wire-format helpers (to build what protobuf refuses to build) ---------------------------


def varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int (up to 10 bytes)."""
    out = bytearray()
    n &= (1 << 70) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field_number: int, wire_type: int) -> bytes:
    """A field key: (number << 3) | wire type."""
    return varint((field_number << 3) | wire_type)


def length_delimited(field_number: int, data: bytes) -> bytes:
    """A wire-type-2 field (string, bytes, sub-message)."""
    return tag(field_number, 2) + varint(len(data)) + data


# --- gRPC message generation -----------------------------------------------------------------


def _field_type_names() -> dict[int, str]:
    from google.protobuf.descriptor import FieldDescriptor as F

    return {
        F.TYPE_FLOAT: "float", F.TYPE_DOUBLE: "float", F.TYPE_UINT32: "uint32", F.TYPE_FIXED32: "uint32",
        F.TYPE_UINT64: "uint64", F.TYPE_FIXED64: "uint64", F.TYPE_INT32: "int32", F.TYPE_SINT32: "int32",
        F.TYPE_SFIXED32: "int32", F.TYPE_INT64: "int64", F.TYPE_SINT64: "int64", F.TYPE_SFIXED64: "int64",
        F.TYPE_BOOL: "bool", F.TYPE_STRING: "string", F.TYPE_BYTES: "bytes", F.TYPE_ENUM: "enum",
        F.TYPE_MESSAGE: "message",
    }  # fmt: skip


_INT_RANGES = {
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


def scalar_edges(kind: str, name: str) -> list[Any]:
    """Edge values for one scalar field of protobuf type `kind` (in range for the type)."""
    if kind == "float":
        return list(FLOAT_EDGES)
    if kind in _INT_RANGES:
        lo, hi = _INT_RANGES[kind]
        return sorted({min(max(v, lo), hi) for v in INT_EDGES})
    if kind == "bool":
        return [False, True]
    if kind in ("string", "bytes"):
        pool = list(QUALITY_EDGES) if name == "quality" else list(TEXT_EDGES)
        return [v.encode() for v in pool] if kind == "bytes" else pool
    return []


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


def _is_repeated(fd: Any) -> bool:
    return bool(getattr(fd, "is_repeated", False)) or getattr(fd, "label", 0) == 3


def _is_map(fd: Any) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


class GrpcCaseMaker:
    """Builds hostile but well-formed `GenerateRequest`s from the message descriptor.

    Each case starts from a valid request (`"God said"`, 4 tokens) and overwrites
    one to three fields (sometimes every field) with edge values, so the field to
    blame is in the label.
    """

    def __init__(self, pb2: Any) -> None:
        self.pb2 = pb2
        self.types = _field_type_names()
        self.leaves = self._leaves(pb2.GenerateRequest.DESCRIPTOR, "")

    def _leaves(self, descriptor: Any, prefix: str) -> list[tuple[str, Any]]:
        """(dotted path, field descriptor) of every non-message field, recursively."""
        out: list[tuple[str, Any]] = []
        for fd in descriptor.fields:
            path = f"{prefix}{fd.name}"
            if self.types.get(fd.type) == "message" and not _is_repeated(fd):
                out.extend(self._leaves(fd.message_type, path + "."))
            else:
                out.append((path, fd))
        return out

    def base(self) -> Any:
        """A valid request."""
        return self.pb2.GenerateRequest(prompt="God said", sampling=self.pb2.SamplingParams(max_tokens=4))

    def value_for(self, rng: random.Random, path: str, fd: Any) -> tuple[Any, str]:
        """(value, label text) for one field; repeated fields get lists."""
        kind = self.types.get(fd.type, "")
        name = fd.name
        if kind == "enum":
            numbers = [v.number for v in fd.enum_type.values]
            value: Any = rng.choice([*numbers, max(numbers) + 1, 2**31 - 1, -1])
            return ([value] if _is_repeated(fd) else value), f"{path}={value}"
        if _is_map(fd):
            return self._map(rng, path, fd)
        if _is_repeated(fd):
            return self._repeated(rng, path, kind, name)
        if kind in ("string", "bytes") and rng.random() < 0.08:  # a 1 MB value, rarely
            text = "x" * HUGE_TEXT_BYTES if name != "prompt" else "God said " * (HUGE_TEXT_BYTES // 9)
            return (text.encode() if kind == "bytes" else text), f"{path}=<{HUGE_TEXT_BYTES} bytes>"
        edges = scalar_edges(kind, name)
        value = rng.choice(edges)
        return value, f"{path}={_short(value)}"

    def _repeated(self, rng: random.Random, path: str, kind: str, name: str) -> tuple[list[Any], str]:
        edges = scalar_edges(kind, name) or [0]
        shape = rng.choice(("empty", "one", "few", "many", "long"))
        if shape == "empty":
            values: list[Any] = []
        elif shape == "one":
            values = [rng.choice(edges)]
        elif shape == "few":
            values = [rng.choice(edges) for _ in range(rng.randint(2, 4))]
        elif shape == "many":  # thousands of short entries
            n = rng.choice((1000, 10_000))
            short = [v for v in edges if not isinstance(v, str | bytes) or len(v) <= 16] or edges
            values = [short[i % len(short)] for i in range(n)]
        else:  # one long entry
            values = ["s" * 100_000] if kind == "string" else [edges[-1]] * 100
        return values, f"{path}=[{shape}: {len(values)} items]"

    def _map(self, rng: random.Random, path: str, fd: Any) -> tuple[dict[Any, Any], str]:
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        keys = scalar_edges(self.types[key_fd.type], "key")
        values = scalar_edges(self.types[value_fd.type], "value")
        n = rng.choice((0, 1, 3, 300, 301, 5000))
        if n <= 3:  # a few edge keys
            entries = {rng.choice(keys): rng.choice(values) for _ in range(n)}
        else:  # many distinct keys
            as_key: Callable[[int], Any] = str if self.types[key_fd.type] == "string" else int
            entries = {as_key(i): rng.choice(values) for i in range(n)}
        return entries, f"{path}={{{len(entries)} entries}}"

    def assign(self, msg: Any, path: str, fd: Any, value: Any) -> None:
        """Set `path` on `msg` (creating sub-messages), replacing what was there."""
        *parents, _ = path.split(".")
        target = msg
        for part in parents:
            target = getattr(target, part)
        if _is_map(fd):
            target.ClearField(fd.name)
            getattr(target, fd.name).update(value)
        elif _is_repeated(fd):
            target.ClearField(fd.name)
            getattr(target, fd.name).extend(value)
        else:
            setattr(target, fd.name, value)

    def make(self, rng: random.Random) -> tuple[bytes, str]:
        """(serialized request, label)."""
        msg = self.base()
        n = len(self.leaves) if rng.random() < 0.1 else rng.randint(1, 3)
        labels = []
        for path, fd in rng.sample(self.leaves, min(n, len(self.leaves))):
            value, label = self.value_for(rng, path, fd)
            self.assign(msg, path, fd, value)
            labels.append(label)
        return msg.SerializeToString(), "; ".join(labels)


def raw_grpc_payloads(pb2: Any, rng: random.Random) -> list[tuple[bytes, str]]:
    """Malformed `GenerateRequest` bytes: what no protobuf library would serialize."""
    sampling_ok = pb2.SamplingParams(max_tokens=4).SerializeToString()
    sampling = length_delimited(2, sampling_ok)
    valid = length_delimited(1, b"God said") + sampling
    bad_utf8 = [b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80", b"God \x80said", b"\xf4\x90\x80\x80", b"\xe2\x82"]
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))
    nested_groups = tag(99, 3) * 20_000 + tag(99, 4) * 20_000  # start-group nested 20k deep
    out = [
        (length_delimited(1, rng.choice(bad_utf8)) + sampling, "prompt=invalid UTF-8"),
        (valid + length_delimited(4, rng.choice(bad_utf8)), "request_id=invalid UTF-8"),
        (valid + length_delimited(2, length_delimited(6, b"\xff")), "sampling.stop=[invalid UTF-8]"),
        (valid + length_delimited(3, length_delimited(2, b"fa\xffst")), "compute.quality=invalid UTF-8"),
        (junk, f"random bytes ({len(junk)})"),
        (valid[: rng.randint(1, len(valid) - 1)], "truncated message"),
        (tag(1, 2) + varint(2**31), "prompt length past the end (2 GiB)"),
        (tag(1, 2) + b"\xff" * 11, "overlong varint length"),
        (tag(1, 0) + varint(5) + sampling, "prompt as a varint (wrong wire type)"),
        (length_delimited(1, b"God said") + tag(2, 0) + varint(1), "sampling sent as a varint"),
        (length_delimited(1, b"God said") + length_delimited(2, b"\xff\xff\xff"), "sampling = garbage bytes"),
        (valid + tag(1000, 2) + varint(3) + b"abc" + tag(2**29 - 1, 0) + varint(1), "unknown fields"),
        (valid + nested_groups, "unknown group nested 20,000 deep"),
        (tag(0, 0) + varint(1) + valid, "field number 0"),
        (tag(1, 7) + valid, "wire type 7"),
        (b"", "empty message"),
        (length_delimited(1, b"God said " * (OVERSIZE_BYTES // 9)), f"prompt over 4 MB ({OVERSIZE_BYTES} B)"),
        (valid + length_delimited(4, b"r" * HUGE_TEXT_BYTES), "request_id of 1 MB"),
        (valid + length_delimited(2, length_delimited(6, b"a") * 50_000), "50,000 stop strings"),
        (valid * 200, "the same message concatenated 200 times (last field wins)"),
    ]
    return out


# --- HTTP body generation --------------------------------------------------------------------


class Raw:
    """A JSON fragment inserted verbatim (what `json.dumps` cannot produce)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({_short(self.text)})"


def dumps_with_raw(obj: Any) -> str:
    """`json.dumps`, with every `Raw` value written as its text."""
    raws: list[str] = []

    def default(o: Any) -> Any:
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        raise TypeError(type(o).__name__)

    text = json.dumps(obj, default=default)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), raw)
    return text


HTTP_FIELDS = (
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options",
    "logprobs", "echo", "stop", "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "user",
    "suffix", "seed", "steps", "quality", "latency_budget_ms", "experts_top_k", "expert_depth", "priority",
)  # fmt: skip


def json_edges(rng: random.Random) -> list[Any]:
    """Hostile JSON values of every type (some as raw text)."""
    return [
        None, True, False, 0, -1, 1, 2, 5, 20, 21, 1.5, -0.0, 1e-45, 1e-300, 1e308, 2**53 + 1, 2**63, 2**64,
        Raw(str(10**400)), Raw("-" + str(10**400)), Raw("1e999"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"),
        Raw("1e-400"), Raw("0.0000000000000000000000000000000000000000000001"),
        "", "x", "fast", "1", "\x00", Raw('"\\ud800"'), Raw('"a\\udfffb"'), Raw('"\\ud83d"'),
        "🙂" * 10, "y" * 100_000, [], [1, 2], ["a", "b"], [[1]], [None], {}, {"a": 1}, {"0": 1},
        {"1": 100}, {"1": "x"}, {"-1": 1}, {"9999999999": 1}, [rng.random() for _ in range(3)],
    ]  # fmt: skip


def prompt_edges() -> list[Any]:
    """Prompt values: OpenAI's string / list / token-id forms, and broken versions of them."""
    return [
        "God said", "", ["God said", "Let there be"], [""], [], [1, 2, 3], [[1, 2], [3]], [0], [10**9],
        [-1], [1.5], ["a", 1], [[]], [[-5]], [Raw(str(10**400))], Raw('"\\ud800"'),
        Raw('["ok", "\\udc00"]'), "God said " * (HUGE_TEXT_BYTES // 9), list(range(100)) * 100,
    ]  # fmt: skip


def deep_json(depth: int, kind: str = "list") -> str:
    """`[[[...]]]` or `{"a":{"a":...}}` nested `depth` deep, as text."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def http_bodies(rng: random.Random) -> list[tuple[bytes, str, dict[str, str], str, str]]:
    """Fixed hostile HTTP requests: (body, label, headers, method, path)."""
    js = {"Content-Type": "application/json"}
    base = b'{"prompt": "God said", "max_tokens": 4}'
    return [
        (b"", "empty body", js, "POST", "/v1/completions"),
        (b"not json", "non-JSON body", js, "POST", "/v1/completions"),
        (b"{", "truncated JSON", js, "POST", "/v1/completions"),
        (b"\xff\xfe\x00{", "invalid UTF-8 body", js, "POST", "/v1/completions"),
        (b"[]", "JSON list body", js, "POST", "/v1/completions"),
        (b'"prompt"', "JSON string body", js, "POST", "/v1/completions"),
        (b"123", "JSON number body", js, "POST", "/v1/completions"),
        (b"null", "JSON null body", js, "POST", "/v1/completions"),
        (b"\xef\xbb\xbf" + base, "UTF-8 BOM before JSON", js, "POST", "/v1/completions"),
        (base, "text/plain content type", {"Content-Type": "text/plain"}, "POST", "/v1/completions"),
        (deep_json(100_000).encode(), "list nested 100,000 deep (body)", js, "POST", "/v1/completions"),
        (('{"prompt": ' + deep_json(100_000) + "}").encode(), "prompt nested 100,000 deep", js, "POST",
         "/v1/completions"),
        (deep_json(100_000, "dict").encode(), "object nested 100,000 deep", js, "POST", "/v1/completions"),
        (b'{"prompt": "God said", "max_tokens": 4, "prompt": 5}', "duplicate key", js, "POST",
         "/v1/completions"),
        (json.dumps({"prompt": "x" * (8 * MB)}).encode(), "8 MB prompt", js, "POST", "/v1/completions"),
        (b" " * (2 * MB) + base, "2 MB of whitespace then JSON", js, "POST", "/v1/completions"),
        (base, "GET on /v1/completions", js, "GET", "/v1/completions"),
        (base, "unknown route", js, "POST", "/v1/nothing"),
        (b"", "GET /v1/models", {}, "GET", "/v1/models"),
        (b"", "GET /stats", {}, "GET", "/stats"),
        (b"", "DELETE /healthz", {}, "DELETE", "/healthz"),
        (base, "Content-Length lies (short)", {**js, "Content-Length": "5"}, "POST", "/v1/completions"),
    ]  # fmt: skip


def http_mutation(rng: random.Random) -> tuple[bytes, str]:
    """A valid completions body with one to three fields overwritten by hostile values."""
    body: dict[str, Any] = {"prompt": "God said", "max_tokens": 4}
    if rng.random() < 0.3:
        body["stream"] = True
    labels = []
    for name in rng.sample(HTTP_FIELDS, rng.randint(1, 3)):
        value = rng.choice(prompt_edges() if name == "prompt" else json_edges(rng))
        body[name] = value
        labels.append(f"{name}={_short(value)}")
    if rng.random() < 0.1:
        body[f"unknown_{rng.randint(0, 99)}"] = rng.choice(json_edges(rng))
        labels.append("an unknown field")
    return dumps_with_raw(body).encode("utf-8"), "; ".join(labels)


def generate_cases(
    pb2: Any | None, seed: int, n: int, grpc_on: bool = True, http_on: bool = True
) -> list[Case]:
    """`n` cases, deterministic for a seed: the fixed lists first, then random mutations.

    Raises:
        ValueError: neither transport is on, or `n` < 1.
    """
    if not (grpc_on or http_on) or n < 1:
        raise ValueError(f"need a transport and n >= 1 (grpc={grpc_on}, http={http_on}, n={n})")
    rng = random.Random(seed)
    fixed: list[Case] = []
    if grpc_on:
        assert pb2 is not None
        fixed += [Case(0, "grpc_raw", label, data, "Generate") for data, label in raw_grpc_payloads(pb2, rng)]
    if http_on:
        fixed += [Case(0, "http", lbl, b, m, p, h) for b, lbl, h, m, p in http_bodies(rng)]
    rng.shuffle(fixed)
    maker = GrpcCaseMaker(pb2) if grpc_on else None
    cases: list[Case] = []
    fixed_every = max(2, n // max(1, len(fixed)))  # spread the fixed cases over the run
    while len(cases) < n:
        i = len(cases)
        if fixed and i % fixed_every == 0:
            case = fixed.pop(0)
        elif maker is not None and (not http_on or rng.random() < 0.55):
            data, label = maker.make(rng)
            method = "GenerateStream" if rng.random() < 0.3 else "Generate"
            case = Case(0, "grpc", label, data, method)
            if rng.random() < 0.15:
                key = rng.choice(sorted(METADATA_EDGES))
                case.metadata = [(key, rng.choice(METADATA_EDGES[key]))]
        else:
            body, label = http_mutation(rng)
            case = Case(0, "http", label, body, "POST", COMPLETIONS, dict(JSON_HEADERS))
        case.index = i
        cases.append(case)
    return cases


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


# --- sending ---------------------------------------------------------------------------------


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


# --- the fuzz run ----------------------------------------------------------------------------


@dataclass
class Death:
    """One period in which the health check failed."""

    after_index: int
    reason: str
    suspects: list[str]
    recovered_after_s: float | None


@dataclass
class FuzzReport:
    """Everything a fuzz run found."""

    seed: int
    requested: int
    outcomes: list[Outcome]
    deaths: list[Death]
    health_checks: int
    wall_s: float
    stopped_early: str = ""

    @property
    def bad(self) -> list[Outcome]:
        """Outcomes with verdict BAD."""
        return [o for o in self.outcomes if o.verdict == BAD]

    @property
    def ok(self) -> bool:
        """No BAD response and no engine death."""
        return not self.bad and not self.deaths

    def counts(self) -> dict[str, Counter[str]]:
        """kind -> verdict -> count."""
        table: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            table.setdefault(o.kind, Counter())[o.verdict] += 1
        return table

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (BAD outcomes in full, the others as counts per code)."""
        codes: dict[str, Counter[str]] = {}
        for o in self.outcomes:
            codes.setdefault(o.kind, Counter())[o.code] += 1
        not_shaped = sum(o.detail.startswith("[error body not OpenAI-shaped]") for o in self.outcomes)
        return {
            "seed": self.seed,
            "requested": self.requested,
            "sent": len(self.outcomes),
            "wall_s": round(self.wall_s, 2),
            "stopped_early": self.stopped_early,
            "health_checks": self.health_checks,
            "verdicts": {k: dict(v) for k, v in self.counts().items()},
            "codes": {k: dict(v) for k, v in codes.items()},
            "http_4xx_not_openai_shaped": not_shaped,
            "deaths": [asdict(d) for d in self.deaths],
            "bad": [asdict(o) for o in self.bad],
            "slowest": [asdict(o) for o in sorted(self.outcomes, key=lambda o: -o.seconds)[:10]],
        }


def wait_healthy(sender: Sender, pb2: Any | None, timeout_s: float, interval_s: float = 1.0) -> float | None:
    """Seconds until the server is healthy again, or None after `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if sender.healthy(pb2)[0]:
            return time.monotonic() - t0
        time.sleep(interval_s)
    return None


def run_fuzz(
    sender: Sender,
    pb2: Any | None,
    cases: Sequence[Case],
    *,
    seed: int = 0,
    time_limit_s: float = 600.0,
    health_every: int = 25,
    recovery_timeout_s: float = 60.0,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> FuzzReport:
    """Send `cases` one by one, health-checking every `health_every`; bounded by `time_limit_s`.

    The run stops early (noted in the report) at the time limit, or when the
    server does not recover within `recovery_timeout_s` after a death.
    """
    t0 = time.monotonic()
    outcomes: list[Outcome] = []
    deaths: list[Death] = []
    checks = 0
    since_check: list[Case] = []
    stopped = ""

    def check(after: int) -> bool:
        nonlocal checks
        checks += 1
        ok, why = sender.healthy(pb2)
        if ok:
            return True
        recovered = wait_healthy(sender, pb2, recovery_timeout_s)
        deaths.append(Death(after, why, [c.describe(120) for c in since_check], recovered))
        return recovered is not None

    for case in cases:
        if time.monotonic() - t0 > time_limit_s:
            stopped = f"time limit {time_limit_s:.0f} s after {len(outcomes)} requests"
            break
        outcome = sender.send(case)
        outcomes.append(outcome)
        since_check.append(case)
        if on_outcome is not None:
            on_outcome(outcome)
        # Check at once after a symptom of a death, else every `health_every` requests.
        symptom = outcome.verdict in (BAD, UNAVAILABLE, TIMEOUT)
        if symptom or len(since_check) >= health_every:
            if not check(case.index):
                stopped = f"server did not recover within {recovery_timeout_s:.0f} s"
                break
            since_check = []
    else:
        if since_check and not check(cases[-1].index if cases else 0):
            stopped = f"server did not recover within {recovery_timeout_s:.0f} s"
    return FuzzReport(seed, len(cases), outcomes, deaths, checks, time.monotonic() - t0, stopped)


def summary_table(report: FuzzReport) -> str:
    """A plain-text table: kind x verdict counts, deaths, then each BAD case."""
    counts = report.counts()
    lines = [f"{'kind':<10}" + "".join(f"{v:>12}" for v in VERDICTS) + f"{'total':>8}"]
    for kind in sorted(counts):
        row = counts[kind]
        lines.append(f"{kind:<10}" + "".join(f"{row[v]:>12}" for v in VERDICTS) + f"{sum(row.values()):>8}")
    total = Counter[str]()
    for row in counts.values():
        total.update(row)
    lines.append(f"{'all':<10}" + "".join(f"{total[v]:>12}" for v in VERDICTS) + f"{sum(total.values()):>8}")
    lines.append(
        f"engine deaths: {len(report.deaths)}; health checks: {report.health_checks}; "
        f"wall {report.wall_s:.1f} s; seed {report.seed}"
        + (f"; stopped early: {report.stopped_early}" if report.stopped_early else "")
    )
    for d in report.deaths:
        rec = (
            "not recovered" if d.recovered_after_s is None else f"recovered after {d.recovered_after_s:.1f} s"
        )
        lines.append(f"  death after case {d.after_index}: {d.reason} ({rec}); suspects: {len(d.suspects)}")
    for o in report.bad:
        lines.append(f"  BAD #{o.index} {o.code}: {o.label} -> {o.detail[:160]!r}")
    return "\n".join(lines)


# --- soak ------------------------------------------------------------------------------------


def read_rss_bytes(pid: int) -> int | None:
    """VmRSS of a local process from /proc (None if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _is_descendant(pid: int, ancestor: int) -> bool:
    """Whether `ancestor` is `pid` or one of its parents (via /proc/PID/stat)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)" and the state
    return False


def replica_pids(class_name: str = REPLICA_CLASS) -> dict[str, int]:
    """actor id -> pid of the ALIVE replica actors of the Ray cluster this process drives.

    Reads Ray's GCS actor table (`ray._private.state.actors`), which works
    without a dashboard; `ray.util.state.list_actors` would ask the dashboard
    at its default address, which on a shared machine can belong to someone
    else's cluster. Only processes started under this process (the Ray driver
    that started the cluster) are returned, so a pid from the table can never
    be another user's process.

    Raises:
        RuntimeError: Ray is not initialised in this process.
    """
    import ray
    from ray._private import state

    if not ray.is_initialized():
        raise RuntimeError("replica_pids needs the Ray driver of the cluster (ray.init in this process)")
    me = os.getpid()
    out = {}
    for actor_id, info in state.actors().items():
        pid = int(info.get("Pid") or 0)
        alive = info.get("ActorClassName") == class_name and info.get("State") == "ALIVE"
        if alive and pid and _is_descendant(pid, me):
            out[actor_id] = pid
    return out


def soak_requests(pb2: Any, rng: random.Random, n: int, grpc_on: bool, http_on: bool) -> Iterator[Case]:
    """`n` valid, mixed requests (unary, stream, HTTP; steps, sampling, stops vary)."""
    prompts = ["God said", "In the beginning", "The earth was", "Darkness was on the surface of the deep"]
    for i in range(n):
        prompt = rng.choice(prompts)
        max_tokens = rng.choice((1, 4, 8, 16, 24))
        temperature = rng.choice((0.0, 0.7, 1.0))
        steps = rng.choice((None, 2, 3, 4))
        stop = rng.choice(([], ["."], ["the", "and"]))
        use_http = http_on and (not grpc_on or rng.random() < 0.4)
        if use_http:
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
            if steps is not None:
                body["steps"] = steps
            if stop:
                body["stop"] = stop
            if rng.random() < 0.4:
                body["stream"] = True
            yield Case(i, "http", "soak", json.dumps(body).encode(), "POST", COMPLETIONS, dict(JSON_HEADERS))
        else:
            sampling = pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop)
            if temperature:
                sampling.top_p = rng.choice((1.0, 0.9))
                sampling.seed = rng.randrange(2**32)
            msg = pb2.GenerateRequest(prompt=prompt, sampling=sampling)
            if steps is not None:
                msg.compute.steps = steps
            method = "GenerateStream" if rng.random() < 0.5 else "Generate"
            yield Case(i, "grpc", "soak", msg.SerializeToString(), method)


def stats_rss(sender: Sender) -> int | None:
    """The `rss_bytes` field of `/stats`, if the server reports one."""
    if sender.http is None:
        return None
    status, body, _ = sender.send_http(Case(0, "http", "stats", b"", "GET", "/stats"))
    if status != 200:
        return None
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        value = json.loads(body).get("rss_bytes")
        return int(value) if value is not None else None
    return None


def rss_probe(sender: Sender, pids: Sequence[int] | None) -> tuple[str, Callable[[], int | None]]:
    """(source, function returning the replica RSS in bytes; summed over `pids`)."""
    if pids:
        return f"/proc/{','.join(map(str, pids))}", lambda: _sum_rss(pids)
    if stats_rss(sender) is not None:
        return "/stats rss_bytes", lambda: stats_rss(sender)
    with contextlib.suppress(Exception):
        found = sorted(replica_pids().values())
        if found:
            return f"/proc/{','.join(map(str, found))} (Ray state API)", lambda: _sum_rss(found)
    return "unavailable", lambda: None


def _sum_rss(pids: Sequence[int]) -> int | None:
    values = [read_rss_bytes(p) for p in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


@dataclass
class SoakReport:
    """A soak run: request outcomes and the replica RSS over time."""

    requests: int
    verdicts: dict[str, int]
    rss_source: str
    rss_start: int | None
    rss_before: int | None  # after the warm-up
    rss_after: int | None
    samples: list[tuple[int, int | None]]
    wall_s: float
    failures: list[dict[str, Any]]

    @property
    def growth_pct(self) -> float | None:
        """RSS growth from after the warm-up to the end, percent."""
        if not self.rss_before or self.rss_after is None:
            return None
        return 100.0 * (self.rss_after - self.rss_before) / self.rss_before


def run_soak(
    sender: Sender,
    pb2: Any,
    n: int,
    *,
    seed: int = 0,
    time_limit_s: float = 3600.0,
    warmup: int | None = None,
    pids: Sequence[int] | None = None,
    samples: int = 10,
) -> SoakReport:
    """Send `n` valid mixed requests (bounded by `time_limit_s`) and track the replica's RSS."""
    rng = random.Random(seed)
    source, probe = rss_probe(sender, pids)
    warmup = min(200, max(1, n // 10)) if warmup is None else warmup
    start = probe()
    before: int | None = start
    series: list[tuple[int, int | None]] = [(0, start)]
    verdicts: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    every = max(1, n // max(1, samples))
    t0 = time.monotonic()
    sent = 0
    for case in soak_requests(pb2, rng, n, sender.channel is not None, sender.http is not None):
        if time.monotonic() - t0 > time_limit_s:
            break
        outcome = sender.send(case)
        sent += 1
        verdicts[outcome.verdict] += 1
        if outcome.verdict != OK and len(failures) < 50:
            failures.append(asdict(outcome) | {"input": case.describe()})
        if sent == warmup:
            before = probe()
            series.append((sent, before))
        elif sent % every == 0:
            series.append((sent, probe()))
    after = probe()
    series.append((sent, after))
    return SoakReport(
        sent, dict(verdicts), source, start, before, after, series, time.monotonic() - t0, failures
    )


def soak_summary(report: SoakReport) -> str:
    """Plain-text summary of a soak run."""

    def mb(v: int | None) -> str:
        return "n/a" if v is None else f"{v / MB:.1f} MB"

    growth = report.growth_pct
    return "\n".join(
        [
            f"soak: {report.requests} requests in {report.wall_s:.1f} s: {report.verdicts}",
            f"replica RSS ({report.rss_source}): start {mb(report.rss_start)}, after warm-up "
            f"{mb(report.rss_before)}, end {mb(report.rss_after)}, growth "
            + ("n/a" if growth is None else f"{growth:+.2f} %"),
            "samples: " + ", ".join(f"{i}:{mb(v)}" for i, v in report.samples),
        ]
    )


# --- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `python -m loadtest.fuzz` arguments."""
    p = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", metavar="HOST:PORT", help="gRPC endpoint (127.0.0.1 only)")
    p.add_argument("--http", metavar="URL", help="HTTP base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=500, help="fuzz cases to send (default 500)")
    p.add_argument("--seed", type=int, default=0, help="case generator seed (default 0)")
    p.add_argument("--time-limit", type=float, default=600.0, help="wall-clock bound, seconds (default 600)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds (default 30)")
    p.add_argument("--health-every", type=int, default=25, help="health check every K requests (default 25)")
    p.add_argument("--recovery-timeout", type=float, default=60.0, help="wait for recovery after a death, s")
    p.add_argument("--replay", type=int, action="append", help="send only case INDEX (repeatable)")
    p.add_argument("--soak", type=int, metavar="N", help="soak mode: N valid mixed requests")
    p.add_argument("--pid", type=int, action="append", help="soak: replica pid(s) whose RSS to read")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="soak: fail above this growth, percent")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no per-request progress")
    return p


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, default=str)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fuzzer or the soak; 0 when nothing BAD happened, 1 otherwise, 2 on bad arguments."""
    args = build_parser().parse_args(argv)
    if not args.grpc and not args.http:
        print("loadtest.fuzz: give --grpc and/or --http", file=sys.stderr)
        return 2
    try:
        sender = Sender(args.grpc, args.http, timeout_s=args.timeout)
    except ValueError as e:
        print(f"loadtest.fuzz: {e}", file=sys.stderr)
        return 2
    pb2 = None
    if args.grpc or args.soak:
        from runtime.proto_build import load_stubs  # the generated stubs only

        pb2, _ = load_stubs()
    try:
        if args.soak:
            soak = run_soak(
                sender, pb2, args.soak, seed=args.seed, time_limit_s=args.time_limit, pids=args.pid
            )
            print(soak_summary(soak))
            _write_json(args.out, asdict(soak) | {"growth_pct": soak.growth_pct})
            grew = soak.growth_pct is not None and soak.growth_pct > args.max_rss_growth
            return 1 if grew or soak.verdicts.get(OK, 0) != soak.requests else 0
        cases = generate_cases(pb2, args.seed, args.requests, bool(args.grpc), bool(args.http))
        if args.replay:
            cases = [cases[i] for i in args.replay if 0 <= i < len(cases)]

        def progress(o: Outcome) -> None:
            if not args.quiet and (o.verdict == BAD or o.index % 100 == 0):
                print(f"#{o.index} {o.kind} {o.verdict} {o.code} {o.label[:80]}", file=sys.stderr)

        report = run_fuzz(
            sender, pb2, cases, seed=args.seed, time_limit_s=args.time_limit, health_every=args.health_every,
            recovery_timeout_s=args.recovery_timeout, on_outcome=progress,
        )  # fmt: skip
        print(summary_table(report))
        _write_json(args.out, report.to_json())
        return 0 if report.ok else 1
    finally:
        sender.close()


if __name__ == "__main__":
    sys.exit(main())

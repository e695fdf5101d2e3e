"""Hostile gRPC `GenerateRequest`s: well-formed messages with edge values, and malformed bytes.

`GrpcCaseMaker` builds messages from the message descriptor, so every field the proto has
(today's and tomorrow's) gets edge values of its type (`scalar_edges`: float32 edges, integer
edges up to the type's maximum, empty / huge / non-ASCII strings, long repeated fields, big maps).
`raw_grpc_payloads` writes what protobuf cannot build with the wire-format helpers (`varint`,
`tag`, `length_delimited`): invalid UTF-8, truncated and garbage messages, wrong wire types,
lengths past the end, unknown fields, deep group nesting, messages over 4 MB.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from typing import Any

from loadtest.fuzz_case import HUGE_TEXT_BYTES, MB, short

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
OVERSIZE_BYTES = 4 * MB + 64 * 1024  # past gRPC's 4 MB default message limit


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


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "")


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
        if _is_repeated(fd) and kind == "message":
            return self._messages(rng, path, fd)
        if _is_repeated(fd):
            return self._repeated(rng, path, kind, name)
        if kind in ("string", "bytes") and rng.random() < 0.08:  # a 1 MB value, rarely
            text = "x" * HUGE_TEXT_BYTES if name != "prompt" else "God said " * (HUGE_TEXT_BYTES // 9)
            return (text.encode() if kind == "bytes" else text), f"{path}=<{HUGE_TEXT_BYTES} bytes>"
        edges = scalar_edges(kind, name)
        value = rng.choice(edges)
        return value, f"{path}={short(value)}"

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

    def _messages(self, rng: random.Random, path: str, fd: Any) -> tuple[list[dict[str, Any]], str]:
        """A repeated message field (a conversation): none, a few or thousands of entries,
        each with edge values in its scalar fields (roles outside the allowed set, huge text)."""
        fields = [f for f in fd.message_type.fields if self.types.get(f.type) in ("string", "bytes", "bool")]
        has_role = "role" in fd.message_type.fields_by_name
        n = rng.choice((0, 1, 3, 512, 513, 5000))

        def entry(i: int) -> dict[str, Any]:
            if n > 3:  # many well-formed entries: the count is the attack
                return {"role": "user", "content": f"m{i}"} if has_role else {}
            out: dict[str, Any] = {}
            for f in fields:
                if rng.random() < 0.7:
                    edges = scalar_edges(self.types[f.type], f.name)
                    if f.name == "role":  # valid roles too, so the other fields' checks are reached
                        edges = [*edges, *CHAT_ROLES]
                    out[f.name] = rng.choice(edges)
            return out

        values = [entry(i) for i in range(n)]
        return values, f"{path}=[{len(values)} messages]"

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
        elif _is_repeated(fd) and fd.message_type is not None:
            target.ClearField(fd.name)
            for entry in value:
                getattr(target, fd.name).add(**entry)
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

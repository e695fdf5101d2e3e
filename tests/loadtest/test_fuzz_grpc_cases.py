"""loadtest.fuzz_grpc_cases: wire helpers, edge values in every field of well-formed messages, raw bytes."""

from __future__ import annotations

import math
import random
import struct

import pytest
from google.protobuf.message import DecodeError

from loadtest import fuzz_case, fuzz_grpc_cases, fuzz_run
from runtime.proto_build import load_stubs

pb2, _ = load_stubs()


def test_wire_helpers_build_what_protobuf_parses() -> None:
    sampling = fuzz_grpc_cases.length_delimited(2, fuzz_grpc_cases.tag(1, 0) + fuzz_grpc_cases.varint(300))
    msg = pb2.GenerateRequest.FromString(fuzz_grpc_cases.length_delimited(1, "é".encode()) + sampling)
    assert (msg.prompt, msg.sampling.max_tokens) == ("é", 300)
    assert fuzz_grpc_cases.varint(0) == b"\x00" and fuzz_grpc_cases.varint(2**64 - 1) == b"\xff" * 9 + b"\x01"


def test_grpc_cases_reach_every_field_with_float32_edges() -> None:
    maker = fuzz_grpc_cases.GrpcCaseMaker(pb2)
    paths = {path for path, _ in maker.leaves}
    assert {"prompt", "request_id", "sampling.temperature", "sampling.top_p", "sampling.stop"} <= paths
    cases = [c for c in fuzz_run.generate_cases(pb2, 0, 2000) if c.kind == "grpc"]
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

    raw = dict((label, data) for data, label in fuzz_grpc_cases.raw_grpc_payloads(pb2, random.Random(0)))
    for label in ("prompt=invalid UTF-8", "request_id=invalid UTF-8", "sampling.stop=[invalid UTF-8]"):
        with pytest.raises(DecodeError):
            pb2.GenerateRequest.FromString(raw[label])
    assert len(raw[f"prompt over 4 MB ({fuzz_grpc_cases.OVERSIZE_BYTES} B)"]) > 4 * fuzz_case.MB
    assert pb2.GenerateRequest.FromString(raw["empty message"]).prompt == ""

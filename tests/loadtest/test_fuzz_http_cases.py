"""loadtest.fuzz_http_cases: the hostile JSON forms, and JSON text with verbatim fragments."""

from __future__ import annotations

import json

from loadtest import fuzz_http_cases, fuzz_run
from runtime.proto_build import load_stubs

pb2, _ = load_stubs()


def test_http_cases_cover_the_hostile_json_forms() -> None:
    cases = [c for c in fuzz_run.generate_cases(pb2, 0, 1500) if c.kind == "http"]
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
    text = fuzz_http_cases.dumps_with_raw(
        {"a": fuzz_http_cases.Raw("1e999"), "b": [fuzz_http_cases.Raw('"\\ud800"'), 1]}
    )
    assert text == '{"a": 1e999, "b": ["\\ud800", 1]}'
    assert (
        fuzz_http_cases.deep_json(3) == "[[[]]]" and fuzz_http_cases.deep_json(2, "dict") == '{"a":{"a":1}}'
    )


def test_every_field_the_server_accepts_gets_hostile_values():
    """A field added to the OpenAI routes (runtime/openai_common.py SHARED_FIELDS) is fuzzed too."""
    from loadtest.fuzz_http_cases import HTTP_FIELDS
    from runtime.openai_common import SHARED_FIELDS

    assert not set(SHARED_FIELDS) - set(HTTP_FIELDS)

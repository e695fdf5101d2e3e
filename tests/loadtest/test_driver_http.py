"""The HTTP transport's server-sent events: parsed incrementally, each stamped when the bytes
holding it reached the client (so the ITL is what a client reading the stream sees)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from loadtest.driver import HttpTransport, RequestResult, RequestSpec, SSEEvents


def _event(text: str) -> bytes:
    return f"data: {json.dumps({'choices': [{'text': text}], 'leanserve': {'steps': 3}})}\n\n".encode()


USAGE = b'data: {"choices": [{"text": ""}], "usage": {"completion_tokens": 5, "prompt_tokens": 2}}\n\n'


def test_sse_events_complete_across_chunks_and_several_per_chunk():
    sse = SSEEvents()
    assert sse.feed(b'data: {"a": 1}\n\ndata: {"b"') == ['{"a": 1}']
    assert sse.feed(b": 2}\r\n\r\n: a comment\n\nevent: x\ndata: [DONE]\n\n") == ['{"b": 2}', "[DONE]"]
    assert sse.feed(b"data: one\ndata: two\n") == []
    assert sse.feed(b"\n") == ["one\ntwo"]


def test_events_arriving_together_share_their_arrival_time():
    """Three events in one write, then (once the client has stamped them) two more: the client's
    clock is read once per arrival, not once per event."""

    async def scenario() -> RequestResult:
        stamped = asyncio.Event()

        async def completions(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(_event("a") + _event("b") + _event("c"))
            await asyncio.wait_for(stamped.wait(), 30)
            await resp.write(_event("d") + _event("e") + USAGE + b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        calls = [0]

        def now() -> float:  # a clock that counts its readings
            calls[0] += 1
            stamped.set()
            return float(calls[0])

        transport = HttpTransport(f"http://127.0.0.1:{port}", timeout_s=30)
        await transport.open()
        result = RequestResult(index=0, scheduled_s=0.0)
        try:
            await transport.run(RequestSpec("hi"), result, now)
        finally:
            await transport.close()
            await runner.cleanup()
        return result

    result = asyncio.run(scenario())
    assert result.code == "OK" and result.tokens == 5 and result.prompt_tokens == 2 and result.steps == 3
    first, second = result.token_times[0], result.token_times[3]
    assert result.token_times == [first, first, first, second, second] and second > first
    assert result.itls_s == [0.0, 0.0, second - first, 0.0]


def test_a_chunk_with_a_speculation_report_fills_the_drafted_and_accepted_counts():
    from loadtest.driver import _record_chunk

    result = RequestResult(index=0, scheduled_s=0.0)
    spec = {"ran": True, "draft_steps": 3, "drafted_tokens": 12, "accepted_tokens": 9}
    _record_chunk(result, {"choices": [{"text": "a"}], "leanserve": {"steps": 12}}, 1.0)
    assert (result.drafted_tokens, result.accepted_tokens) == (0, 0)
    _record_chunk(result, {"choices": [{"text": ""}], "leanserve": {"steps": 12, "speculation": spec}}, 2.0)
    assert (result.steps, result.drafted_tokens, result.accepted_tokens) == (12, 12, 9)

"""The output processor (runtime/output_processor.py), driven through a real engine on a tiny model:
every way a request leaves ends its own stream once, frees its KV, and leaves the others alone."""

from __future__ import annotations

import asyncio
import logging

import pytest

from runtime.request_state import RequestState
from runtime.types import RequestFailedError, RequestStats
from tests.helpers import collect, req, run_alone


def test_a_request_whose_text_handling_raises_fails_alone(make_engine, arun, monkeypatch):
    engine = make_engine()
    text_for = RequestState.text_for

    def flaky(self, token):
        if self.request.request_id == "bad" and self.seq.output_ids:
            raise UnicodeError("boom")
        return text_for(self, token)

    monkeypatch.setattr(RequestState, "text_for", flaky)
    good_alone = arun(run_alone(make_engine(), req("good", steps=3, max_tokens=6)))

    async def main():
        await engine.start()
        try:
            bad = engine.submit(req("bad", steps=3, max_tokens=6))
            good = engine.submit(req("good", steps=3, max_tokens=6))
            results = await asyncio.gather(collect(bad), collect(good), return_exceptions=True)
            return results, engine.stats()
        finally:
            await engine.stop()

    (bad, good), stats = arun(main())
    assert isinstance(bad, RequestFailedError) and "output processing failed (UnicodeError)" in str(bad)
    assert good[1] == good_alone[1]  # the other request's tokens are what it gets alone
    assert stats.kv_used_bytes == 0 and stats.num_running == 0
    assert engine._states == {}


def test_a_broken_stats_subscriber_is_logged_and_the_rest_still_see_every_stat(make_engine, arun, caplog):
    engine = make_engine()
    seen: list[object] = []

    def broken(stats):
        raise RuntimeError("subscriber bug")

    engine.stats_callbacks.append(broken)
    engine.stats_callbacks.append(seen.append)
    with caplog.at_level(logging.ERROR, logger="runtime.output_processor"):
        text, ids, last = arun(run_alone(engine, req("r", steps=3, max_tokens=4)))
    assert len(ids) == 4 and last.finish_reason == "length"
    finished = [s for s in seen if isinstance(s, RequestStats)]
    assert [s.request_id for s in finished] == ["r"]
    assert engine.outputs.finished == 1 and engine.outputs.tokens == 4
    assert any("stats callback" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("how", ["cancel", "fail_all"])
def test_cancel_and_stop_end_each_stream_once_and_free_the_kv(make_engine, arun, how):
    engine = make_engine()

    async def main():
        await engine.start()
        streams = [engine.submit(req(f"r{i}", steps=3, max_tokens=40)) for i in range(3)]
        firsts = [await s.__anext__() for s in streams]  # every request is running
        assert all(f.token_ids for f in firsts)
        if how == "cancel":
            for i in range(3):
                assert engine.cancel(f"r{i}") is True
            rest = []
            for s in streams:
                rest.append([o async for o in s])
            assert all(r[-1].finish_reason == "cancelled" for r in rest)
            assert engine.cancel("r0") is False  # already ended: nothing to cancel
        else:
            await engine.stop(drain=False)
            for s in streams:
                with pytest.raises(Exception, match="engine stopped"):
                    async for _ in s:
                        pass
        stats = engine.stats()
        await engine.stop()
        return stats

    stats = arun(main())
    assert stats.kv_used_bytes == 0 and stats.num_running == 0 and engine._states == {}
    assert engine.outputs.finished == 3

"""The model runner (runtime/runner.py): any mix of rows in one forward, for every executor.

One tiny shared-trunk MoE model (steps 2..6 over 3 blocks: rows of different
step counts use different blocks at the same step) runs, on every backend
(eager torch, compiled torch, ONNX Runtime), a batch that mixes

    a prompt (6 tokens at position 0),
    the second chunk of a chunked prompt (4 tokens at position 4, ending
        exactly at its reservation, so a padding write there would show),
    several tokens against an existing cache (3 tokens at position 5, with
        a lowered expert setting: what speculative verification sends),
    two decode rows with different step counts (1 token each),

and each row's last-token logits and its keys and values equal those of the
same row run alone in a fresh pool. Tolerance: 1e-5 for eager torch and ONNX
Runtime (float32, batched matmuls sum in another order: ~1e-7 in practice);
1e-4 for the compiled decode (fused kernels, as tests/runtime/test_aot_decode.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.checkpoint import WEIGHTS_FILE, save_model
from models.export import export_onnx
from models.kv_cache import KVCacheError
from models.model import LeanLM
from runtime.backends.torch_backend import TorchBackend
from runtime.runner import ModelRunner, Row
from runtime.settings import CompileSpec
from tests.helpers import perturbed_model, tiny_config

PAGE = 4
TOL = {"torch": 1e-5, "torch-aot": 1e-4, "onnx": 1e-5}


@pytest.fixture(scope="module")
def model() -> LeanLM:
    return perturbed_model(tiny_config(trunk="ode", block="sasp", ffn="moe"))


@pytest.fixture(scope="module")
def backends(model, tmp_path_factory) -> dict[str, object]:
    from runtime.backends.onnx_backend import OnnxBackend

    lo = model.config.step_range[0]
    out_dir = tmp_path_factory.mktemp("onnx-model")
    save_model(model, out_dir)
    export_onnx(model, out_dir, weights_file=Path(out_dir) / WEIGHTS_FILE)
    cache = tmp_path_factory.mktemp("aot-cache")
    return {
        "torch": TorchBackend(model),
        # A whole-decode graph for the lowest step count; the other decode row runs block by block.
        "torch-aot": TorchBackend(model, CompileSpec((lo,), cache)),
        "onnx": OnnxBackend.from_model_dir(out_dir),
    }


def _script(config) -> tuple[dict[str, tuple[int, int, int | None]], list[list[Row]], list[Row]]:
    """Reservations {id: (steps, tokens, experts)}, the history before the mixed batch, the batch."""
    lo, hi = config.step_range
    mid = (lo + hi) // 2
    g = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(0, config.vocab_size, (n,), generator=g).tolist()

    reserve = {
        "prompt": (hi, 10, None),
        "chunk": (lo, 8, None),  # two chunks of 4: the second ends at the reservation's last slot
        "draft": (mid, 12, 1),
        "dec-lo": (lo, 8, None),
        "dec-hi": (hi, 8, None),
    }

    def row(rid: str, tokens: list[int], start: int) -> Row:
        steps, _, experts = reserve[rid]
        return Row(rid, tokens, start, steps, experts)

    history = [
        [row("chunk", ids(4), 0)],
        [row("draft", ids(5), 0)],
        [row("dec-lo", ids(3), 0), row("dec-hi", ids(2), 0)],
    ]
    batch = [
        row("prompt", ids(6), 0),
        row("chunk", ids(4), 4),
        row("draft", ids(3), 5),
        row("dec-lo", ids(1), 3),
        row("dec-hi", ids(1), 2),
    ]
    return reserve, history, batch


def _runner(backend, reserve: dict[str, tuple[int, int, int | None]], only: str | None = None) -> ModelRunner:
    runner = ModelRunner(backend, kv_cache_bytes=2**20, page_size=PAGE)
    for rid, (steps, tokens, _) in reserve.items():
        if only is None or rid == only:
            runner.allocator.reserve(rid, steps, tokens)
    return runner


def _kv(runner: ModelRunner, rid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The row's keys and values, every step, in page order: (N, nh, S, hs) each."""
    pages = torch.tensor(runner.allocator.pages(rid))  # (N, P)
    return runner.storage.gather(pages)


@torch.no_grad()
@pytest.mark.parametrize("kind", list(TOL))
@pytest.mark.parametrize("one_forward", [True, False], ids=["one-forward", "packed"])
def test_mixed_rows_equal_each_row_alone(model, backends, kind, one_forward) -> None:
    backend = backends[kind]
    reserve, history, batch = _script(model.config)
    mixed = _runner(backend, reserve)
    for rows in history:
        backend.forward(mixed.describe(rows))
    if one_forward:  # every row in one right-padded forward
        fwd = mixed.describe(batch)
        assert fwd.tokens.shape == (5, 6) and len(set(fwd.steps)) == 3
        got = backend.forward(fwd).logits[:, -1]
    else:  # as the engine runs them: the decode rows together, the others packed
        plan = mixed.prepare(batch)
        assert [[r.request_id for r in rows] for _, rows in plan] == [
            ["dec-lo", "dec-hi"],
            ["draft", "chunk", "prompt"],
        ]
        by_id = {}
        for fwd, rows in plan:
            logits = backend.forward(fwd).logits[:, -1]
            by_id.update({r.request_id: logits[i] for i, r in enumerate(rows)})
        got = torch.stack([by_id[r.request_id] for r in batch])
    for b, row in enumerate(batch):
        alone = _runner(backend, reserve, only=row.request_id)
        for rows in history:
            mine = [r for r in rows if r.request_id == row.request_id]
            if mine:
                backend.forward(alone.describe(mine))
        ref = backend.forward(alone.describe([row])).logits[0, -1]
        diff = float((got[b] - ref).abs().max())
        assert diff <= TOL[kind], f"{kind}: row {row.request_id} differs by {diff:.2e}"
        for got_kv, ref_kv in zip(_kv(mixed, row.request_id), _kv(alone, row.request_id)):
            # Only the slots the row wrote (the rest of a reservation is never written).
            n = row.start + len(row.tokens)
            assert float((got_kv[:, :, :n] - ref_kv[:, :, :n]).abs().max()) <= TOL[kind]


@torch.no_grad()
def test_runner_pool_follows_the_model_dtype() -> None:
    """A bfloat16 model gets a bfloat16 pool: the same byte budget holds twice the pages,
    and prefill plus decode run through the runner."""
    config = tiny_config(trunk="ode", block="sasp", ffn="moe")
    model = perturbed_model(config)
    f32 = ModelRunner(TorchBackend(model), kv_cache_bytes=2**16, page_size=PAGE)
    bf16 = ModelRunner(
        TorchBackend(perturbed_model(config).to(torch.bfloat16)), kv_cache_bytes=2**16, page_size=PAGE
    )
    assert f32.storage.k.dtype == torch.float32 and bf16.storage.k.dtype == torch.bfloat16
    assert bf16.allocator.num_pages == 2 * f32.allocator.num_pages
    bf16.allocator.reserve("a", 3, 8)
    out = bf16.backend.forward(bf16.describe([Row("a", [1, 2, 3], 0, 3)]))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    out = bf16.backend.forward(bf16.describe([Row("a", [int(out.logits[0, -1].argmax())], 3, 3)]))
    assert torch.isfinite(out.logits.float()).all()
    assert bf16.storage.k[torch.tensor(bf16.allocator.pages("a")[0])].abs().sum() > 0  # written in bf16


def test_rows_are_checked_against_their_reservation(model) -> None:
    runner = ModelRunner(TorchBackend(model), kv_cache_bytes=2**16, page_size=PAGE)
    runner.allocator.reserve("a", 3, 4)
    with pytest.raises(KVCacheError, match="holds no reservation"):
        runner.describe([Row("b", [1], 0, 3)])
    with pytest.raises(KVCacheError, match="holds 3 steps, the row asks for 4"):
        runner.describe([Row("a", [1], 0, 4)])
    with pytest.raises(KVCacheError, match="overflow its reservation of 4 tokens"):
        runner.describe([Row("a", [1, 2, 3], 2, 3)])


def test_consecutive_decodes_reuse_the_cache_view_exactly(model, monkeypatch) -> None:
    """The decode view memo (`ModelRunner._cache_view`): each decode's slots and windows equal
    `CacheView.from_tables` of that decode, token after token, across page boundaries, a
    change of rows and a reservation change; the memo is only taken inside a page."""
    from models.kv_cache import block_tables
    from models.trunk import CacheView

    runner = ModelRunner(TorchBackend(model), kv_cache_bytes=2**16, page_size=PAGE)
    a = runner.allocator
    lo, hi = model.config.step_range
    a.reserve("x", hi, 20)
    a.reserve("y", lo, 20)
    built = 0
    real = CacheView.from_tables

    def counting(*args, **kwargs):
        nonlocal built
        built += 1
        return real(*args, **kwargs)

    def check(rows: list[Row]) -> None:
        view = runner.describe(rows).cache
        ids = [r.request_id for r in rows]
        last = max(r.start for r in rows)
        P = last // PAGE + 1
        tables = block_tables(a, ids)[:, :, :P]
        want = real(runner.storage, tables, torch.tensor([[r.start] for r in rows]))
        assert torch.equal(view.slots, want.slots) and torch.equal(view.windows, want.windows)

    monkeypatch.setattr(CacheView, "from_tables", classmethod(lambda cls, *args, **kw: counting(*args, **kw)))
    for pos in range(3, 13):  # pages 0..3 of x; y two tokens behind, crossing pages in between
        check([Row("x", [1], pos, hi), Row("y", [2], pos - 2, lo)])
    # one build per page started by either row (x: 4, 8, 12; y: 4, 8 at x's 6, 10) plus the
    # first: the other four decodes reused it
    assert built == 6
    check([Row("x", [1], 13, hi)])  # other rows: rebuilt
    a.reserve("z", lo, 4)  # the allocator changed (version): rebuilt even for the same rows
    check([Row("x", [1], 14, hi)])
    assert built == 8
    check([Row("x", [1], 15, hi)])
    assert built == 8

"""The prepared GPU check runs end to end (on CPU here, every section small), so the script a
device session runs is a tested one; the report's numbers are only checked for being there and
sane, never for speed."""

from __future__ import annotations

import json

from runtime import gpu_check


def test_gpu_check_runs_every_section_on_cpu_and_writes_json_and_markdown(tmp_path):
    argv = [
        "--out", str(tmp_path), "--device", "cpu", "--quick", "--shape", "ode-tiny",
        "--prompt-tokens", "8", "--new-tokens", "6",
        "--train-iterations", "2", "--train-batch", "2", "--train-seq", "32",
    ]  # fmt: skip
    assert gpu_check.main(argv) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["decode"]["rows"]
    assert {(r["dtype"], r["batch"], r["steps"]) for r in rows} == {
        (d, b, n) for d in ("float32", "bfloat16") for b in (1, 2) for n in (3, 12)
    }
    assert all(r["itl_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert set(report["decode"]["ratios"]["quarter_vs_max"]) == {
        f"{d} batch {b}" for d in ("float32", "bfloat16") for b in (1, 2)
    }
    assert report["peer"]["float32"]["itl_ms_batch1"] > 0
    assert report["train"]["tokens"] > 0 and 0 < report["train"]["mfu"] < 1
    assert report["cuda_graphs"]["built"] is False
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| bfloat16 | 2 | 12 |" in md and "failed" not in md


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(gpu_check, "measure_peer", broken)
    argv = [
        "--out", str(tmp_path), "--device", "cpu", "--quick", "--shape", "ode-tiny", "--dtypes", "float32",
        "--prompt-tokens", "4", "--new-tokens", "4", "--train-iterations", "0",
    ]  # fmt: skip
    assert gpu_check.main(argv) == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["peer"]["error"] == "RuntimeError: no such kernel"
    assert len(report["decode"]["rows"]) == 4
    assert "**peer failed**: `RuntimeError: no such kernel`" in (tmp_path / "gpu_check.md").read_text()


def test_train_flops_count_the_shared_block_once_per_step():
    from models.config import ModelConfig

    config = ModelConfig(**gpu_check.SHAPES["ode-tiny"])
    lo, hi = config.step_range
    flops = gpu_check.train_flops_per_token(config)
    head = 6.0 * config.vocab_size * config.d_model
    assert flops > head
    deeper = ModelConfig(**{**gpu_check.SHAPES["ode-tiny"], "max_steps": 2 * hi - lo})
    # the block term scales with the mean step count: (lo + (2 hi - lo)) / (lo + hi)
    ratio = (gpu_check.train_flops_per_token(deeper) - head) / (flops - head)
    assert abs(ratio - 2 * hi / (lo + hi)) < 1e-9

"""Data-parallel training (torchrun + DDP, gloo on CPU), resumption across world sizes, bf16.

The two-process runs are real `torchrun` jobs on 127.0.0.1 with a free port, bounded by a timeout.
Tolerances: the same global batch is cut into the same micro-batches in one process and in two,
so the losses differ only by the order of floating-point sums (gloo's all-reduce vs local
accumulation): rel 1e-4 over a few iterations of a tiny model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.distributed import micro_batches, shard
from models.train import TrainConfig, train
from tests.models.test_train import TEXT, _config, _tcfg

REPO = Path(__file__).resolve().parents[2]
RUNNER = """
import json, sys
from models.config import ModelConfig
from models.train import TrainConfig, train
spec = json.loads(sys.argv[1])
summary = train(ModelConfig.from_dict(spec["model"]), TrainConfig(**spec["train"]), spec["out"],
                text=spec["text"], progress=False, keep_state=True, stop_after=spec["stop_after"])
if "rank" not in summary:
    json.dump(summary["losses"], open(spec["losses"], "w"))
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, corpus, out, tcfg: TrainConfig, nproc: int = 2, stop_after=None) -> list[float]:
    """`train` in `nproc` torchrun processes (gloo, CPU, one thread each); rank 0's losses."""
    losses = tmp_path / f"losses-{out.name}-{nproc}.json"
    config = _config().to_dict()
    config.pop("extra", None)
    spec = {"model": config, "train": {**tcfg.__dict__, "extra": {}}, "out": str(out), "text": str(corpus),
            "stop_after": stop_after, "losses": str(losses)}  # fmt: skip
    script = tmp_path / "run_train.py"
    script.write_text(RUNNER, encoding="utf-8")
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", port, str(script), json.dumps(spec)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(losses.read_text())


def test_shards_and_micro_batches_cover_the_global_batch():
    for rows in (4, 7, 16):
        for world in (1, 2, 3):
            shares = [shard(rows, world, r) for r in range(world)]
            assert [i for s in shares for i in range(s.start, s.stop)] == list(range(rows))
            for s in shares:
                micro = micro_batches(s, 2)
                assert [i for m in micro for i in range(m.start, m.stop)] == list(range(s.start, s.stop))
                assert all(m.stop - m.start <= 2 for m in micro)


def test_two_processes_match_one_with_the_same_effective_batch(tmp_path, corpus):
    tcfg = _tcfg(iterations=6, batch_size=8, micro_batch_size=4, checkpoint_interval=6)
    two = _torchrun(tmp_path, corpus, tmp_path / "two", tcfg)
    one = train(_config(), tcfg, tmp_path / "one", text=corpus, progress=False)["losses"]
    assert len(two) == 6
    assert two == pytest.approx(one, rel=1e-4)
    # Without accumulation in one process (one 8-row pass) only the MoE balancing loss,
    # nonlinear in the batch, differs: the same curve within 1 %.
    whole = train(_config(), _tcfg(iterations=6, batch_size=8), tmp_path / "w", text=corpus, progress=False)
    assert two == pytest.approx(whole["losses"], rel=1e-2)


def test_a_state_saved_by_two_processes_resumes_in_one(tmp_path, corpus):
    tcfg = _tcfg(iterations=8, batch_size=8, micro_batch_size=4, checkpoint_interval=4)
    full = train(_config(), tcfg, tmp_path / "full", text=corpus, progress=False)["losses"]
    part = _torchrun(tmp_path, corpus, tmp_path / "m", tcfg, stop_after=4)
    assert len(part) == 4 and (tmp_path / "m.train-state" / "state.json").is_file()
    resumed = train(_config(), tcfg, tmp_path / "m", text=corpus, progress=False)["losses"]
    assert len(resumed) == 8
    assert resumed == pytest.approx(full, rel=1e-4)


def test_bfloat16_steps_lower_the_loss_and_keep_float32_master_weights(tmp_path, corpus):
    from models.checkpoint import load_model

    summary = train(
        _config(), _tcfg(iterations=12, dtype="bfloat16"),
        tmp_path / "b", text=corpus, progress=False, keep_state=True,
    )  # fmt: skip
    losses = summary["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2
    model = load_model(tmp_path / "b")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "b.train-state" / "state.safetensors"))
    assert {v.dtype for k, v in state.items() if k.endswith("exp_avg")} == {torch.float32}
    assert model.config.extra["training"]["train_config"]["dtype"] == "bfloat16"


def test_a_missing_cuda_is_named():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(_config(), _tcfg(device="cuda"), "/nonexistent/m", progress=False)

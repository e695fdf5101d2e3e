"""Data-parallel plumbing for `leanserve train`: one process, or many under torchrun.

`leanserve train` never launches processes itself. Under `torchrun` (which sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) `Dist.init` joins the process
group (gloo on CPU, nccl on CUDA); without those variables, or with `WORLD_SIZE=1`, it is a
single process and every collective here is a no-op.

How a global batch is split (models/train.py uses this):

* every rank draws the same global batch of `batch_size` rows (the sampler's generator is
  seeded alike and advanced alike on every rank, so the batch depends on the iteration only,
  never on the world size);
* rank r keeps rows `shard(batch_size)[r]` (contiguous, sizes differing by at most one);
* it runs them in micro-batches of at most `micro_batch_size` rows, each loss weighted by
  `rows / batch_size * world_size`, so DDP's gradient mean over ranks is the gradient of the
  mean loss over the whole global batch, whatever the world size and accumulation count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """ "cpu", "cuda" (this rank's GPU under torchrun: cuda:LOCAL_RANK), "cuda:K" or "auto".

    Raises:
        ValueError: CUDA asked for but not available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


@dataclass
class Dist:
    """This process's place in the job: rank, world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialised: bool = False  # this object joined the process group (and leaves it in `close`)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: collectives communicate."""
        return self.world_size > 1

    @classmethod
    def init(cls, device: str = "cpu") -> Dist:
        """Read torchrun's environment, pick the device and join the process group if there is one."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        if world <= 1:
            return cls(0, 1, 0, dev)
        joined = False
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
            joined = True
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, dev, joined)

    def close(self) -> None:
        """Leave the process group this object joined."""
        if self.initialised and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
        self.initialised = False

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.active:
            torch_dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks (one collective)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def all_gather(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, in rank order."""
        if not self.active:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch_dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def broadcast_text(self, text: str | None) -> str | None:
        """Rank 0's string (or None) on every rank."""
        if not self.active:
            return text
        box = [text]
        torch_dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def shard(rows: int, world_size: int, rank: int) -> slice:
    """Rank `rank`'s contiguous share of `rows` global rows (shares differ by at most one row)."""
    base, extra = divmod(rows, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def micro_batches(share: slice, micro_batch_size: int | None) -> list[slice]:
    """`share` cut into consecutive micro-batches of at most `micro_batch_size` rows (None: one)."""
    size = share.stop - share.start
    step = size if micro_batch_size is None else min(micro_batch_size, size)
    return [slice(s, min(s + step, share.stop)) for s in range(share.start, share.stop, max(step, 1))]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for bfloat16 (weights stay float32); nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's `no_sync` for the micro-batches before the last one (gradients accumulate locally)."""
    if skip_sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield

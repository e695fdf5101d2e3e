"""Exit gates in the trunk loop (models with one: Ouro, models/ouro.py).

Two modes, both driven by `Forward.exit_threshold` (runtime/runner.py builds it from the
request's `exit_threshold` and `exit_mode`):

* the reference's threshold exit (`exit_states`): every loop runs; each token's output is
  the state of the first loop whose cumulative exit probability reaches its row's
  threshold, else its row's last loop;
* the experimental compute-saving exit (`EarlyExit`, `Forward.exit_early`): a generated
  token stops looping at its exit loop and the loops it skips get that loop's keys and values.

`models.trunk.run_trunk` / `run_forward` call these; nothing else assembles a forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers import BlockOut
from models.trunk import Executor, Forward, StepRecord, select_last


def exit_states(
    executor: Executor, fwd: Forward, x: Tensor, record: StepRecord, exits: dict[int, int] | None = None
) -> Tensor:
    """The state each token exits with, under `fwd.exit_threshold` (the reference's threshold
    exit: every loop ran; a token reads the first loop whose cumulative exit probability
    reaches its row's threshold, else its row's last loop).

    Args:
        executor: runs a model with an exit gate (`executor.exit_gate(states)` -> logits).
        x: (B, T', d) the final states (T' = 1 with `fwd.last_only`).
        record: `run_trunk`'s record of the forward.
        exits: rows that stopped looping early (`fwd.exit_early`) -> their exit
            loop, as `run_trunk` decided it (their later loops never ran).

    Returns:
        (B, T', d) the chosen states.
    """
    gate = getattr(executor, "exit_gate", None)
    if gate is None:
        raise ValueError("exit_threshold: this model has no exit gate")
    assert fwd.exit_threshold is not None
    B, T, d = x.shape
    N = max(fwd.steps)
    states = x[:, None].expand(B, N, T, d).clone()  # (B, N, T', d); a row's unrun loops stay unread
    last = fwd.last_index
    for i, rows, out in _by_step(record, fwd):
        if fwd.last_only:
            out = select_last(out, None if last is None else (last if rows is None else last[rows]))
        if rows is None:
            states[:, i] = out
        else:
            states[rows, i] = out
    logits = gate(states).squeeze(-1).transpose(1, 2)  # (B, T', N)
    steps = torch.tensor(fwd.steps, device=x.device)  # (B,)
    chosen = torch.empty(B, T, dtype=torch.long, device=x.device)
    for n in sorted(set(fwd.steps)):  # each row's distribution is over its own loops
        rows_n = (steps == n).nonzero().squeeze(1)
        pdf = exit_distribution(logits[rows_n, :, :n])  # (R, T', n)
        reached = pdf.cumsum(-1) >= fwd.exit_threshold[rows_n].to(pdf.dtype)[:, None, None]
        first = reached.to(torch.int64).argmax(-1)
        chosen[rows_n] = torch.where(reached.any(-1), first, torch.full_like(first, n - 1))
    for b, loop in (exits or {}).items():
        chosen[b] = loop
    return states.gather(1, chosen[:, None, :, None].expand(B, 1, T, d)).squeeze(1)


def _by_step(record: StepRecord, fwd: Forward) -> StepRecord:
    """`run_trunk`'s record, one (i, rows, states) per step that ran: a step that ran in
    several groups (rows of different step counts applying different blocks) merged into
    one; a step no row ran (every row exited early) left out."""
    per_step: list[list[tuple[Tensor | None, Tensor]]] = [[] for _ in range(max(fwd.steps))]
    for i, rows, out in record:
        per_step[i].append((rows, out))
    merged: StepRecord = []
    for i, parts in enumerate(per_step):
        if len(parts) == 1:
            merged.append((i, *parts[0]))
        elif parts:
            rows = torch.cat([r for r, _ in parts if r is not None])
            merged.append((i, rows, torch.cat([o for _, o in parts])))
    return merged


def exit_distribution(gate_logits: Tensor) -> Tensor:
    """The exit gate's distribution over loops.

    Args:
        gate_logits: (..., N) the gate's output after each loop.

    Returns:
        (..., N) p_i = sigmoid(g_i) prod_{j<i} (1 - sigmoid(g_j)); the last loop
        gets the probability left (so each row sums to 1).
    """
    lam = torch.sigmoid(gate_logits)
    survive = torch.cumprod(1.0 - lam, dim=-1)  # (..., N) prob. of not exiting through loop i
    before = torch.cat([torch.ones_like(survive[..., :1]), survive[..., :-1]], dim=-1)
    p = lam * before
    return torch.cat([p[..., :-1], before[..., -1:]], dim=-1)


class EarlyExit:
    """The compute-saving exit mode of `run_trunk` (experimental, `Forward.exit_early`).

    After each loop, a flagged row's exit gate gives lambda_i = sigmoid(g_i); its
    cumulative exit probability is sum_{j<=i} lambda_j prod_{l<j} (1 - lambda_l), the
    reference's (`exit_distribution`'s cumsum, accumulated in the same order). The first
    loop where it reaches the row's threshold, before the row's last loop, is its exit:
    the token's output is that loop's state (as in the reference mode, whose choice for a
    token depends only on its own loops so far), the row runs no later loop, and the loops
    it skips get that loop's keys and values in their cache slots (later tokens read the
    exit state's KV there: the CDB / Mixture-of-Recursions "copy" policy). Only the
    decode's one-token rows are flagged (runtime/runner.py): a prompt runs every loop.
    """

    def __init__(self, executor: Executor, fwd: Forward, writes: list[tuple[Tensor, Tensor, Tensor]]) -> None:
        gate = getattr(executor, "exit_gate", None)
        if gate is None or fwd.exit_threshold is None:
            raise ValueError("exit_early needs an exit_threshold and a model with an exit gate")
        assert fwd.exit_early is not None
        self.gate, self.fwd, self.writes = gate, fwd, writes
        B = len(fwd.steps)
        self.all_rows = torch.arange(B, device=fwd.tokens.device)
        self.flagged = fwd.exit_early
        self.before = torch.ones(B, device=fwd.tokens.device)  # prod (1 - lambda) over the loops so far
        self.cdf = torch.zeros(B, device=fwd.tokens.device)
        self.steps = torch.tensor(fwd.steps, device=fwd.tokens.device)
        self.active = torch.ones(B, dtype=torch.bool, device=fwd.tokens.device)
        self.exited: dict[int, int] = {}

    def running(self, rows: Tensor | None) -> Tensor | None:
        """The rows of a schedule group that have not exited (None = all of them)."""
        idx = self.all_rows if rows is None else rows
        idx = idx[self.active[idx]]
        return None if idx.numel() == len(self.fwd.steps) else idx

    def after_step(self, i: int, rows: Tensor | None, out: BlockOut) -> None:
        idx = self.all_rows if rows is None else rows
        flagged = self.flagged[idx]
        if not bool(flagged.any()):
            return
        lam = torch.sigmoid(self.gate(out.x[:, -1]).squeeze(-1).float())  # (R,)
        pdf = lam * self.before[idx]
        cdf = self.cdf[idx] + pdf
        self.cdf[idx] = cdf
        self.before[idx] = self.before[idx] * (1.0 - lam)
        thr = self.fwd.exit_threshold[idx].float()  # type: ignore[index]
        leave = flagged & (cdf >= thr) & (self.steps[idx] > i + 1)
        cache = self.fwd.cache
        for p in leave.nonzero().flatten().tolist():
            b = int(idx[p])
            self.exited[b] = i
            self.active[b] = False
            if cache is not None:  # its skipped loops' slots get this loop's keys and values
                for j in range(i + 1, self.fwd.steps[b]):
                    self.writes.append((cache.slots[j, b : b + 1], out.k[p : p + 1], out.v[p : p + 1]))

"""The one forward: a batch description, the trunk's step schedule, and the executor interface.

    Forward (what to run)  ->  run_forward(executor, config, fwd)
        embed -> run_trunk (the step schedule) -> last positions -> head

Every way of running a LeanLM goes through `run_forward`: training and
scoring (`LeanLM.forward`), the serving runner (runtime/runner.py) over the
eager, compiled and ONNX Runtime backends, the ONNX export's parity check,
and, traced, the compiled whole-decode graphs (runtime/backends/aot_decode.py
exports this very function). They differ only by *executor*
(models/executors.py): the object that embeds, applies block `k` for one
Euler step, and applies the head.

The batch description (`Forward`). Dense rows, `tokens` (B, T) with
`positions` (B, T); per row a step count (host ints: the schedule is
computed without touching the device, and a traced graph sees constants), an
expert setting, and the cache view (`CacheView`): for every step `i` the flat
slots the rows' new keys and values go to, (N_max, B, T), and the pages each
row's step-`i` attention reads, (N_max, B, P). Any mix of rows works: a whole
prompt (T new tokens at position 0), a chunk of a long prompt or several
draft tokens against an existing cache (T new tokens at position p > 0), one
decode token; rows shorter than T are right-padded, their padding written to
the storage's scratch slot and never read.

The step schedule. The trunk integrates `dx/dt = f_k(x)` with forward Euler:
a row with `N` steps runs step `i` with block `k = floor(i * n_blocks / N)`
and `h = T / N`. Step `i` runs only the rows whose `N` exceeds `i`, grouped by
the block they use (partial sharing), each with its own `h`; nothing is padded
to the longest row. When every row shares `N` (the common decode batch) there
is no row selection at all.

The executor interface (`Executor`). `block(k, x, h, view, setting)` gets a
`StepView`: the rows' positions, the slots to write, the pages to read and
the storage, with the masks each attention form needs built once per forward
(`window_mask`: key j visible iff j <= the query's position, over a window
that already holds the new keys; `past_mask`: over [dense past, new keys]).
An executor either writes the new keys and values itself (`stores_kv`) or
returns them, and the loop writes every step's in one scatter after the last
step (valid because step i reads only its own pages).

Shape legend:
    B | rows           T | new tokens per row     d | model width
    V | vocabulary     N | steps per row          R | rows active in a step
    P | pages in a row's window                    S | P * page_size
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from models.config import ModelConfig
from models.kv_cache import KVBatch, KVCacheError, KVStorage
from models.layers import BlockOut, attention_mask, window_mask


@dataclass
class ModelOutput:
    """Result of one forward call.

    Attributes:
        logits: (B, T, V), or (B, 1, V) with `last_only=True`; already scaled
            by the output multiplier 1/m_N (training and inference alike).
        aux_loss: scalar load-balancing loss summed over steps (MoE, training),
            else None.
        expert_counts: (n_expert_slots,) tokens routed to each expert or tree
            node, summed over steps and blocks; None for a dense FFN.
        loops_run: with `Forward.exit_threshold`, the loops computed for each
            row's last token, B host ints (its steps, or its exit loop + 1 when
            it stopped early); None otherwise.
    """

    logits: Tensor
    aux_loss: Tensor | None = None
    expert_counts: Tensor | None = None
    loops_run: list[int] | None = None


# ----------------------------------------------------------------------------
# The batch description
# ----------------------------------------------------------------------------
@dataclass
class CacheView:
    """Where one forward's rows read and write the paged cache, for every step.

    Attributes:
        storage: the page tensors.
        slots: (N_max, B, T) flat slot of each new token at each step (a
            row's steps beyond its own N are never read).
        windows: (N_max, B, P) pages each row's step-i attention reads: its
            past and the pages of its new tokens (-1 = none; masked).
    """

    storage: KVStorage
    slots: Tensor
    windows: Tensor

    @classmethod
    def from_tables(
        cls, storage: KVStorage, tables: Tensor, positions: Tensor, pad: Tensor | None = None
    ) -> CacheView:
        """Slots and windows from block tables (B, N, P) covering every row's newest position.

        Args:
            storage: the page tensors.
            tables: (B, N_max, P) page ids; P pages cover the furthest new token.
            positions: (B, T) positions of the new tokens.
            pad: (B, T) bool, True for right-padding tokens (their slot
                becomes the scratch slot), or None.
        """
        B, N, _ = tables.shape
        T = positions.shape[1]
        page = storage.page_size
        pages = tables.gather(2, (positions // page)[:, None, :].expand(B, N, T))  # (B, N, T)
        slots = (pages * page + (positions % page)[:, None, :]).transpose(0, 1)  # (N, B, T)
        if pad is not None:
            slots = slots.masked_fill(pad[None], storage.scratch_slot)
        # Contiguous: compiled executors read their inputs with dense strides.
        return cls(storage, slots.contiguous(), tables.transpose(0, 1).contiguous())


@dataclass
class Forward:
    """One forward's batch description (see the module docstring).

    Attributes:
        tokens: (B, T) int64 new token ids, right-padded.
        positions: (B, T) int64 absolute positions; positions[b, 0] is the
            number of tokens row b has cached.
        steps: per row step count (host ints).
        experts: (B,) int64 expert setting per row, or None (the trained maximum).
        cache: where the rows' keys and values live, or None (no cache:
            the T tokens are the whole sequence).
        last_index: (B,) int64 index of each row's last real token (padded
            rows), or None (T - 1).
        last_only: logits of each row's last token only, (B, 1, V).
        traced: built inside a graph being exported (rows symbolic, every row
            running `steps[0]` steps): nothing is cached across calls.
        exit_threshold: (B,) float per-row threshold of an exit gate's
            cumulative probability (models with an exit gate, models/ouro.py):
            each token's output is the state of the first of its row's loops
            whose cumulative exit probability reaches it, else the last loop's;
            a value above 1 is never reached (the ordinary output). None = no
            row uses it.
        exit_early: (B,) bool, rows of one new token whose token stops looping
            at its exit loop (the experimental compute-saving exit mode; the
            loops it skips get the exit loop's keys and values); needs
            `exit_threshold`. None = every row runs all its loops.
    """

    tokens: Tensor
    positions: Tensor
    steps: tuple[int, ...]
    experts: Tensor | None = None
    cache: CacheView | None = None
    last_index: Tensor | None = None
    last_only: bool = False
    traced: bool = False
    exit_threshold: Tensor | None = None
    exit_early: Tensor | None = None
    _memo: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def select(self, rows: list[int]) -> Forward:
        """The description of rows `rows` alone (in that order)."""
        idx = torch.tensor(rows, device=self.tokens.device)
        steps = tuple(self.steps[r] for r in rows)
        cache = None
        if self.cache is not None:
            n = max(steps)
            c = self.cache
            cache = CacheView(c.storage, c.slots[:n, idx], c.windows[:n, idx])
        return Forward(
            self.tokens[idx],
            self.positions[idx],
            steps,
            None if self.experts is None else self.experts[idx],
            cache,
            None if self.last_index is None else self.last_index[idx],
            self.last_only,
            exit_threshold=None if self.exit_threshold is None else self.exit_threshold[idx],
            exit_early=None if self.exit_early is None else self.exit_early[idx],
        )

    def mask(self, kind: str) -> Tensor:
        """The whole batch's mask of one kind, built once per forward.

        "window": (B, 1, T, S) over a window holding the new keys (needs a cache);
        "past": (B, 1, T, S + T) over [dense past of S slots, new keys].
        """
        m = self._memo.get(kind)
        if m is None:
            S = 0 if self.cache is None else self.cache.windows.shape[2] * self.cache.storage.page_size
            if kind == "window":
                m = window_mask(self.positions, S)
            else:
                past = (
                    self.positions[:, 0]
                    if self.cache is not None
                    else self.positions.new_zeros(len(self.steps))
                )
                m = attention_mask(past, S, self.positions.shape[1])
            self._memo[kind] = m
        return m


class StepView:
    """What one block application sees: its rows' positions, slots, pages and masks.

    Attributes:
        storage: the page tensors, or None without a cache.
        positions: (R, T); slots: (R, T) or None; window: (R, P) or None.
    """

    __slots__ = ("_fwd", "_rows", "positions", "slots", "storage", "window")

    def __init__(self, fwd: Forward, i: int, rows: Tensor | None) -> None:
        self._fwd, self._rows = fwd, rows
        c = fwd.cache
        self.positions = fwd.positions if rows is None else fwd.positions[rows]
        self.storage = None if c is None else c.storage
        self.slots = None if c is None else (c.slots[i] if rows is None else c.slots[i, rows])
        self.window = None if c is None else (c.windows[i] if rows is None else c.windows[i, rows])

    def window_mask(self) -> Tensor:
        """(R, 1, T, S) bool: window key j visible iff j <= the query's position."""
        m = self._fwd.mask("window")
        return m if self._rows is None else m[self._rows]

    def past_mask(self) -> Tensor:
        """(R, 1, T, S + T) bool over [the window's S slots as a dense past, the new keys]."""
        m = self._fwd.mask("past")
        return m if self._rows is None else m[self._rows]


class Executor(Protocol):
    """How embed, one block step and the head run (eager torch, compiled, ONNX Runtime).

    Attributes:
        stores_kv: `block` writes the new keys and values into the storage
            itself; otherwise it returns them and the loop writes them.
    """

    stores_kv: bool

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """tokens, positions (B, T) -> x (B, T, d)."""
        ...

    def block(self, k: int, x: Tensor, h: Tensor, view: StepView, setting: Tensor | None) -> BlockOut:
        """One Euler step of block `k`: x (R, T, d), h (R, 1, 1), setting (R,) or None."""
        ...

    def head(self, x: Tensor) -> Tensor:
        """x (B, T, d) after the trunk -> logits (B, T, V): final norm, head, 1/m_N."""
        ...


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def run_forward(executor: Executor, config: ModelConfig, fwd: Forward) -> ModelOutput:
    """embed -> trunk -> (last positions) -> head, for any executor.

    Returns:
        ModelOutput: logits (B, T, V), or (B, 1, V) with `fwd.last_only`; the
        aux loss averaged over the longest row's steps; summed expert counts.
    """
    x = executor.embed(fwd.tokens, fwd.positions)  # (B, T, d)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    record: StepRecord | None = None if fwd.exit_threshold is None else []
    exits: dict[int, int] = {}
    x, aux, counts = run_trunk(executor, config, x, fwd, pending, record, exits)
    if fwd.last_only:
        x = select_last(x, fwd.last_index)  # (B, 1, d)
    loops_run = None
    if record is not None:
        from models.exits import exit_states

        x = exit_states(executor, fwd, x, record, exits)
        loops_run = [exits[b] + 1 if b in exits else n for b, n in enumerate(fwd.steps)]
    if aux is not None:
        aux = aux / max(fwd.steps)
    logits = executor.head(x)
    # The pool is written last: in a compiled graph, a write followed by more
    # work made AOTInductor copy the whole pool (~25 ms for 64 MiB) instead
    # of writing the input in place.
    _write_pending(fwd, pending)
    return ModelOutput(logits, aux, counts, loops_run)


def _write_pending(fwd: Forward, pending: list[tuple[Tensor, Tensor, Tensor]]) -> None:
    """Write every step's new keys and values (executors that return them) in one scatter."""
    if not pending:
        return
    storage = fwd.cache.storage  # type: ignore[union-attr]  # slots imply a cache
    if len(pending) == 1:
        storage.scatter(*pending[0])
    else:
        storage.scatter(*(torch.cat(parts) for parts in zip(*pending)))


StepRecord = list[tuple[int, "Tensor | None", Tensor]]
"""`run_trunk`'s record: per block application (step i, its rows or None for all, their output states)."""


def run_trunk(
    executor: Executor,
    config: ModelConfig,
    x: Tensor,
    fwd: Forward,
    pending: list[tuple[Tensor, Tensor, Tensor]] | None = None,
    record: StepRecord | None = None,
    exits: dict[int, int] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Integrate the trunk: the step schedule over `executor.block`, paged KV in and out.

    Args:
        x: (B, T, d) embedded tokens.
        pending: where to leave the (slots, k, v) an executor returns instead
            of storing (the caller writes them); None = written here, after
            the last step (valid: step i reads only its own pages).
        record: if given, gets (step i, rows or None, the rows' output states
            (R, T, d)) for every block application (`exit_states`).
        exits: with `fwd.exit_early`, gets row -> exit loop of each row whose
            token stopped looping before its last loop (`models.exits.EarlyExit`).

    Returns:
        x (B, T, d) after the trunk, the summed aux loss and expert counts.
    """
    schedule, h_all = _schedule(config, fwd, x)
    experts = fwd.experts
    writes: list[tuple[Tensor, Tensor, Tensor]] = [] if pending is None else pending
    aux_total: Tensor | None = None
    counts_total: Tensor | None = None
    early = None
    if fwd.exit_early is not None:
        from models.exits import EarlyExit

        early = EarlyExit(executor, fwd, writes)
    for i, groups in enumerate(schedule):
        for k, rows in groups:
            if early is not None and early.exited:
                rows = early.running(rows)
                if rows is not None and rows.numel() == 0:
                    continue
            view = StepView(fwd, i, rows)
            xr = x if rows is None else x[rows]
            hr = h_all if rows is None else h_all[rows]
            sr = experts if (experts is None or rows is None) else experts[rows]
            out = executor.block(k, xr, hr, view, sr)
            if view.slots is not None and not executor.stores_kv:
                writes.append((view.slots, out.k, out.v))
            x = out.x if rows is None else x.index_copy(0, rows, out.x)
            if record is not None:
                record.append((i, rows, out.x))
            if early is not None:
                early.after_step(i, rows, out)
            if out.aux_loss is not None:
                aux_total = out.aux_loss if aux_total is None else aux_total + out.aux_loss
            if out.counts is not None:
                counts_total = out.counts if counts_total is None else counts_total + out.counts
    if pending is None:
        _write_pending(fwd, writes)
    if early is not None and exits is not None:
        exits.update(early.exited)
    return x, aux_total, counts_total


Schedule = list[list[tuple[int, "Tensor | None"]]]
"""Per step i: (block k, rows running it or None for all rows)."""


def _schedule(config: ModelConfig, fwd: Forward, x: Tensor) -> tuple[Schedule, Tensor]:
    """The step schedule and the (B, 1, 1) Euler step per row, from host step counts.

    Cached per (step counts, dtype, device) in eager mode: a decode loop repeats
    its batch's step counts every iteration. Traced (`fwd.traced`), the step
    sizes are graph computations over the symbolic batch size.
    """
    steps = fwd.steps
    if fwd.traced:
        n = steps[0]
        if min(steps) != n or max(steps) != n:
            raise ValueError("a traced forward runs one step count for every row")
        h = config.horizon / torch.full((x.shape[0], 1, 1), n, dtype=x.dtype, device=x.device)
        return _uniform_schedule(config.n_blocks, n), h
    return _cached_schedule(config.n_blocks, config.horizon, steps, x.dtype, x.device)


def _uniform_schedule(n_blocks: int, n: int) -> Schedule:
    return [[((i * n_blocks) // n, None)] for i in range(n)]


@functools.lru_cache(maxsize=1024)
def _cached_schedule(
    n_blocks: int, horizon: float, steps: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[Schedule, Tensor]:
    B, n_iter = len(steps), max(steps)
    # Constants shared by every call with these step counts: made outside
    # inference mode (usable under autograd too) and never written to.
    with torch.inference_mode(False), torch.no_grad():
        # h = horizon / N, computed the same way for every batch (bit-identical per row).
        h = horizon / torch.tensor(steps, device=device).to(dtype).view(B, 1, 1)
        if min(steps) == n_iter:
            return _uniform_schedule(n_blocks, n_iter), h
        schedule: Schedule = []
        for i in range(n_iter):
            groups: dict[int, list[int]] = {}
            for b, n in enumerate(steps):
                if n > i:
                    groups.setdefault((i * n_blocks) // n, []).append(b)
            schedule.append(
                [
                    (k, None if len(r) == B else torch.tensor(r, device=device))
                    for k, r in sorted(groups.items())
                ]
            )
        return schedule, h


def select_last(x: Tensor, last_index: Tensor | None) -> Tensor:
    """(B, T, d) -> (B, 1, d): position `last_index[b]` of each row, or the last one."""
    if last_index is None:
        return x[:, -1:]
    B, T, d = x.shape
    return x.gather(1, last_index.view(B, 1, 1).expand(B, 1, d))


# ----------------------------------------------------------------------------
# Describing a forward from the model's public arguments (checked)
# ----------------------------------------------------------------------------
def _bounds(t: Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, in one reduction."""
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def describe(
    config: ModelConfig,
    tokens: Tensor,
    positions: Tensor | None = None,
    steps: Tensor | int | list[int] | None = None,
    kv: KVBatch | None = None,
    experts: Tensor | None = None,
    last_only: bool = False,
    last_index: Tensor | None = None,
) -> Forward:
    """A checked `Forward` from `LeanLM.forward`'s arguments (shapes there).

    Raises:
        ValueError: an argument outside the model's range (named).
        KVCacheError: a cache row mismatch, a changed step count or an overflow.
    """
    B, T = tokens.shape
    if positions is None:
        positions = torch.arange(T, device=tokens.device).expand(B, T)
    if steps is None:
        steps = int(config.default_steps)
    if isinstance(steps, int):
        step_list = (steps,) * B
    elif isinstance(steps, Tensor):
        step_list = tuple(steps.tolist())
    else:
        step_list = tuple(int(n) for n in steps)
    if len(step_list) != B:
        raise ValueError(f"steps: must give one step count per row ({B}), got {len(step_list)}")
    check_inputs(config, tokens, positions, step_list, experts)
    if last_index is not None and (
        last_index.shape != (B,) or int(last_index.min()) < 0 or int(last_index.max()) >= T
    ):
        raise ValueError(f"last_index: must be (B,) = ({B},) indices in [0, {T - 1}]")
    cache = None
    if kv is not None:
        check_cache(kv, positions, step_list)
        page = kv.storage.page_size
        P = -(-(int(positions[:, -1].max()) + 1) // page)  # pages covering the furthest new token
        cache = CacheView.from_tables(kv.storage, kv.block_tables[:, :, :P], positions)
    return Forward(tokens, positions, step_list, experts, cache, last_index, last_only)


def check_inputs(
    config: ModelConfig, tokens: Tensor, positions: Tensor, steps: tuple[int, ...], setting: Tensor | None
) -> None:
    """Raise ValueError naming the argument that is out of the model's range."""
    c = config
    lo, hi = c.step_range
    if steps and (min(steps) < lo or max(steps) > hi):
        bad = min(steps) if min(steps) < lo else max(steps)
        raise ValueError(f"steps={bad}: must lie in [{lo}, {hi}] for this model")
    if positions.numel():
        p_min, p_max = _bounds(positions)
        if p_min < 0 or p_max >= c.context_length:
            raise ValueError(
                f"positions up to {p_max}: must lie in [0, {c.context_length - 1}] "
                f"(context_length={c.context_length})"
            )
    t_min, t_max = _bounds(tokens)
    if t_min < 0 or t_max >= c.vocab_size:
        raise ValueError(f"tokens: ids must lie in [0, {c.vocab_size - 1}]")
    if setting is not None:
        e = c.expert_setting
        if e is None:
            raise ValueError("experts: this model has a dense FFN and takes no expert setting")
        e_min, e_max = _bounds(setting)
        if e_min < e.lo or e_max > e.hi:
            raise ValueError(f"{e.name}: must lie in [{e.lo}, {e.hi}] for this model")


def check_cache(kv: KVBatch, positions: Tensor, steps: tuple[int, ...]) -> None:
    """Raise KVCacheError on a row mismatch, a changed step count or an overflow."""
    if kv.block_tables.shape[0] != positions.shape[0]:
        raise KVCacheError(f"cache has {kv.block_tables.shape[0]} rows, the batch has {positions.shape[0]}")
    cached = kv.cached_steps.tolist()
    if cached != list(steps):
        b = next(b for b, (n, m) in enumerate(zip(cached, steps)) if n != m)
        raise KVCacheError(
            f"row {b}: its cache was built with {cached[b]} steps, "
            f"this call asks for {steps[b]}; a sequence keeps its step count"
        )
    # Every new position must fall inside the row's reserved pages.
    page_size = kv.storage.page_size
    capacity = kv.capacity
    if capacity is None:
        capacity = ((kv.block_tables[:, 0, :] >= 0).sum(1) * page_size).tolist()
    width = kv.block_tables.shape[2] * page_size  # tokens the table can address
    for b, (last, cap) in enumerate(zip(positions[:, -1].tolist(), capacity)):
        if last >= min(cap, width):
            raise KVCacheError(
                f"row {b}: position {last} overflows its reservation of {min(cap, width)} tokens"
            )


def generate_sequence(
    model: torch.nn.Module,
    config: ModelConfig,
    prompt: list[int],
    max_new_tokens: int,
    steps: int | None = None,
    experts: int | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
) -> list[int]:
    """Single-sequence generation with a paged cache in the model's dtype, for any model
    called with `LeanLM.forward`'s arguments (`LeanLM.generate`, `OuroLM.generate`): the
    reference path for tests, evaluation and `leanserve generate` without a server.

    Args:
        prompt: token ids (at least one).
        steps: step count (loops for Ouro); default `config.default_steps`.
        experts: expert setting for every token (None: the trained maximum).
        temperature: 0 = greedy, else sampled with a CPU generator seeded by `seed`.

    Returns:
        The `max_new_tokens` new token ids.
    """
    from models.kv_cache import PagedKVCache

    if not prompt:
        raise ValueError("prompt: must contain at least one token")
    total = len(prompt) + max_new_tokens
    if total > config.context_length:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = {total}: "
            f"must be <= context_length={config.context_length}"
        )
    n = int(steps if steps is not None else config.default_steps)  # type: ignore[arg-type]
    weight = next(model.parameters())
    device = weight.device
    pages = n * (-(-total // 16))
    cache = PagedKVCache(config, num_pages=pages, page_size=16, dtype=weight.dtype, device=device)
    cache.reserve(0, n, total)
    kv = cache.batch([0])
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    setting = None if experts is None else torch.tensor([experts], device=device)
    ids = torch.tensor([prompt], device=device)
    pos = torch.arange(len(prompt), device=device)[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, pos, n, kv=kv, experts=setting, last_only=True).logits[0, -1]
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        ids = torch.tensor([[nxt]], device=device)
        pos = pos[:, -1:] + 1
    return out

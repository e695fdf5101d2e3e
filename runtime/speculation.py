"""Self-speculative decoding across step counts: draft with few Euler steps, verify with many.

A weight-shared ODE trunk carries its own draft model: the same weights
integrated with fewer steps (`draft_steps`, h = T / N_draft). One round of a
speculating request, inside one engine iteration (`ModelRunner.execute`):

    draft forward 1   the committed tokens the draft has not cached yet (usually
                      1, 2 after a fully accepted round, the whole prompt in the
                      first round), at draft_steps, against the draft's own KV
                      -> draft token d1
    draft forward j   d_{j-1} alone at draft_steps -> d_j          (j = 2..k)
    verification      [last token, d1..dk] (k + 1 tokens) at the request's steps
                      against the request's own KV -> target logits at k + 1
                      positions -> accepted prefix d1..dm, then one more token

Every draft forward batches the round's rows of all speculating requests (the
first one also carries the iteration's ordinary decode rows and prefills:
`runtime.runner.pack_rows`), and the verification forwards are ordinary
multi-token rows against an existing cache, so speculating and ordinary rows
share iterations. The runner builds every forward's description on the event
loop (`plan`: positions, slots and pages are known before the drafts are) and
the worker writes each drafted token into the forwards that feed it.

Exactness. Greedy rows accept the longest prefix of drafts equal to the
target's argmax (after logit bias and penalties, over the same history a
one-token-at-a-time decode would see) and add the target's token at the first
mismatch (or a bonus token from the last position when all k are accepted):
the output is the non-speculative output token for token, up to the ~1e-6
float differences between one k+1-token forward and k+1 one-token forwards
(which flip an argmax only on a near-tie). Sampled rows use the standard
rejection rule (Leviathan et al. 2023; Chen et al. 2023): accept d with
probability min(1, p(d) / q(d)), else draw from the normalised max(0, p - q),
where p and q are the target's and the draft's distributions after bias,
penalties, temperature, top-k and top-p; every draw uses the request's own
generator, so a seeded request is reproducible alone or batched, and its
tokens follow the target distribution exactly (tests/runtime/test_speculation.py
checks this statistically).

KV. A speculating sequence reserves its draft's entries next to its own, at
admission (`Sequence.draft_key`, draft_steps x tokens; runtime/scheduler.py).
Rejected positions are rolled back by moving the length pointers only (the
sequence's `num_cached`, the draft's `SpecState.cached`): entries past them
are overwritten by the next round. Finishing or cancelling releases both.

Policy. `resolve` turns the request's fields and the server's default
(`EngineConfig.draft_steps`, `draft_tokens`) into a `SpecState` at
submission; `AutoSpeculation` ("auto") decides each round whether and how far
a request drafts (see its docstring for what it does under load).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from runtime.sampling import NonFiniteLogitsError, _logprob, filter_logits, is_greedy
from runtime.types import MAX_DRAFT_TOKENS, ComputeParams, InvalidRequestError, SpecReport, TokenLogprob

if TYPE_CHECKING:
    from models.config import ModelConfig
    from models.trunk import Forward
    from runtime.runner import ModelRunner, Plan, Row
    from runtime.settings import EngineConfig


# ----------------------------------------------------------------------------
# What a round needs and produces
# ----------------------------------------------------------------------------
@dataclass
class DraftRound:
    """One speculating row's round (set on `runtime.runner.Row.draft` by the engine).

    Attributes:
        key: the allocator id of the draft's KV reservation.
        steps: the draft's Euler steps.
        tokens: k, the tokens to draft this round (>= 1).
        catchup: committed tokens the draft has not cached, ending with the
            row's fed token (the draft's first forward feeds them).
        start: position of `catchup[0]` (tokens the draft has cached).
    """

    key: Hashable
    steps: int
    tokens: int
    catchup: list[int]
    start: int


@dataclass
class SpecOutcome:
    """One round's result for one request.

    Attributes:
        tokens: the committed tokens (accepted drafts, then the target's own), 1..k+1.
        logprobs: one per token when the request asked for them, else None.
        drafted: k.
        accepted: drafts kept (len(tokens) - 1).
    """

    tokens: list[int]
    logprobs: list[TokenLogprob] | None
    drafted: int
    accepted: int


@dataclass(eq=False)
class _Round:
    """Worker-side state of one row's round: the drafts so far and where each goes."""

    row: Row
    k: int
    drafts: list[int] = field(default_factory=list)
    q: list[Tensor] = field(default_factory=list)  # (V,) draft distributions (sampled rows)
    # For draft j (index j - 1): the (tokens tensor, row, column) entries that feed it.
    targets: list[list[tuple[Tensor, int, int]]] = field(default_factory=list)
    error: BaseException | None = None

    def draft(self, logits: Tensor) -> None:
        """Draw the next draft token from the draft's (V,) last-position logits and place it."""
        if self.error is not None:
            return
        row, p = self.row, self.row.sampling
        x = logits.detach().float().cpu()
        if not bool(torch.isfinite(x).all()):
            self.error = NonFiniteLogitsError("the draft produced non-finite logits for this request")
            return
        if row.adjust is not None:
            x = row.adjust.apply(x, row.generated + self.drafts)
        if is_greedy(p):
            token = int(x.argmax())
        else:
            q = torch.softmax(filter_logits(x, p.temperature, p.top_k, p.top_p), dim=-1)
            token = int(torch.multinomial(q, 1, generator=row.generator))
            self.q.append(q)
        self.drafts.append(token)
        for tokens, b, col in self.targets[len(self.drafts) - 1]:
            tokens[b, col] = token

    def verify(self, logits: Tensor) -> SpecOutcome:
        """Accept a prefix of the drafts from the target's (k + 1, V) logits (module docstring)."""
        if self.error is not None:
            raise self.error
        row, p = self.row, self.row.sampling
        x_all = logits.detach().float().cpu()
        greedy = is_greedy(p)
        out: list[int] = []
        logprobs: list[TokenLogprob] | None = None if p.logprobs is None else []
        for j in range(self.k + 1):
            x = x_all[j]
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteLogitsError("the model produced non-finite logits for this request")
            if row.adjust is not None:
                x = row.adjust.apply(x, row.generated + self.drafts[:j])
            token, accepted = self._choose(x, j, greedy)
            out.append(token)
            if logprobs is not None:
                logprobs.append(_logprob(x, token, p.logprobs or 0))
            if not accepted:
                break
        return SpecOutcome(out, logprobs, self.k, len(out) - 1)

    def _choose(self, x: Tensor, j: int, greedy: bool) -> tuple[int, bool]:
        """The token at round position j from adjusted target logits (V,); True if it is draft j+1."""
        p = self.row.sampling
        if greedy:
            t = int(x.argmax())
            return t, j < self.k and self.drafts[j] == t
        target = torch.softmax(filter_logits(x, p.temperature, p.top_k, p.top_p), dim=-1)
        gen = self.row.generator
        if j == self.k:  # every draft accepted: the bonus token from the last position
            return int(torch.multinomial(target, 1, generator=gen)), False
        return accept_or_resample(target, self.q[j], self.drafts[j], gen)


def accept_or_resample(
    p: Tensor, q: Tensor, draft: int, generator: torch.Generator | None
) -> tuple[int, bool]:
    """The speculative rejection rule for one drafted token.

    Args:
        p: (V,) target probabilities.
        q: (V,) draft probabilities the token was drawn from (q[draft] > 0).
        draft: the drafted token.
        generator: the request's generator.

    Returns:
        (draft, True) with probability min(1, p[draft] / q[draft]); otherwise
        (a token drawn from max(0, p - q) normalised, False). The returned
        token is distributed exactly as p.
    """
    u = float(torch.rand((), generator=generator))
    if u * float(q[draft]) < float(p[draft]):
        return draft, True
    residual = torch.clamp(p - q, min=0.0)
    total = float(residual.sum())
    if not total > 0.0:  # p == q up to rounding: the residual is empty, p itself is exact
        residual, total = p, float(p.sum())
    return int(torch.multinomial(residual / total, 1, generator=generator)), False


# ----------------------------------------------------------------------------
# The plan of an iteration with speculating rows (built on the event loop)
# ----------------------------------------------------------------------------
@dataclass
class SpecPlan:
    """The speculative part of an iteration (`runtime.runner.Plan.spec`).

    Attributes:
        first: id(row) -> round, for the draft rows of the plan's own forwards
            (the first draft forward shares them with the ordinary rows).
        stages: draft forwards 2..k_max, each with its rounds in row order.
        verify: the verification forwards (all positions' logits), rounds in row order.
        rounds: every round, in the order of the rows given to `plan`.
    """

    first: dict[int, _Round]
    stages: list[tuple[Forward, list[_Round]]]
    verify: list[tuple[Forward, list[_Round]]]
    rounds: list[_Round]

    def run(
        self, runner: ModelRunner
    ) -> tuple[dict[str, SpecOutcome], dict[str, BaseException], Tensor | None]:
        """Worker thread: draft forwards 2..k, then the verifications (after the plan's forwards).

        Returns:
            outcomes and errors by request id, and the summed expert counts (or None).
        """
        counts: Tensor | None = None
        for fwd, rounds in self.stages:
            out = runner.backend.forward(fwd)
            logits = out.logits[:, -1, :].detach().float().cpu()
            for b, rnd in enumerate(rounds):
                rnd.draft(logits[b])
            counts = _add(counts, out.expert_counts)
        outcomes: dict[str, SpecOutcome] = {}
        errors: dict[str, BaseException] = {}
        for fwd, rounds in self.verify:
            out = runner.backend.forward(fwd)
            logits = out.logits.detach().float().cpu()  # (B, T, V)
            for b, rnd in enumerate(rounds):
                rid = rnd.row.request_id
                try:
                    outcomes[rid] = rnd.verify(logits[b, : rnd.k + 1])
                except NonFiniteLogitsError as e:
                    errors[rid] = e
            counts = _add(counts, out.expert_counts)
        return outcomes, errors, counts


def _add(total: Tensor | None, counts: Tensor | None) -> Tensor | None:
    if counts is None:
        return total
    c = counts.detach().to("cpu", torch.long)
    return c if total is None else total + c


def plan(runner: ModelRunner, rows: list[Row], max_padding: float) -> Plan:
    """An iteration's forwards when some rows speculate (`row.draft` set); host work only.

    The plan's own forwards (`Plan` items) are the ordinary rows packed with
    every round's first draft forward; `Plan.spec` holds the later draft
    forwards and the verifications.
    """
    from runtime.runner import Plan, Row, pack_rows

    ordinary = [r for r in rows if r.draft is None]
    rounds: list[_Round] = []
    first: dict[int, _Round] = {}
    firsts: list[Row] = []
    for r in rows:
        d = r.draft
        if d is None:
            continue
        rnd = _Round(r, d.tokens, targets=[[] for _ in range(d.tokens)])
        rounds.append(rnd)
        row = Row(d.key, list(d.catchup), d.start, d.steps, r.experts)  # type: ignore[arg-type]
        first[id(row)] = rnd
        firsts.append(row)
    out = Plan((runner.describe(g), g) for g in pack_rows(ordinary + firsts, max_padding))
    stages: list[tuple[Forward, list[_Round]]] = []
    for j in range(1, max(rnd.k for rnd in rounds)):
        live = [rnd for rnd in rounds if rnd.k > j]
        fwd = runner.describe(
            [
                Row(rnd.row.draft.key, [0], rnd.row.start + j, rnd.row.draft.steps, rnd.row.experts)  # type: ignore[union-attr,arg-type]
                for rnd in live
            ]
        )
        for b, rnd in enumerate(live):
            rnd.targets[j - 1].append((fwd.tokens, b, 0))
        stages.append((fwd, live))
    by_row: dict[int, _Round] = {}
    checks: list[Row] = []
    for rnd in rounds:
        r = rnd.row
        row = Row(r.request_id, [r.tokens[-1]] + [0] * rnd.k, r.start, r.steps, r.experts)
        by_row[id(row)] = rnd
        checks.append(row)
    verify: list[tuple[Forward, list[_Round]]] = []
    for group in pack_rows(checks, max_padding):
        fwd = runner.describe(group, all_logits=True)
        members = [by_row[id(row)] for row in group]
        for b, rnd in enumerate(members):
            for j in range(1, rnd.k + 1):
                rnd.targets[j - 1].append((fwd.tokens, b, j))
        verify.append((fwd, members))
    out.spec = SpecPlan(first, stages, verify, rounds)
    return out


# ----------------------------------------------------------------------------
# Per-request state and the server's policy
# ----------------------------------------------------------------------------
@dataclass
class SpecState:
    """A request's speculation as the engine tracks it (`RequestState.spec`).

    Attributes:
        key: the allocator id of the draft's reservation (`Sequence.draft_key`).
        report: the settings and counters reported back (`SpecReport`).
        cached: tokens whose draft keys and values are cached (the draft's length pointer).
        active: whether it drafts at all any more ("auto" may stop it for good).
        acceptance: running estimate of the per-draft acceptance rate ("auto").
        skipped: rounds "auto" decoded without drafting since the last draft.
    """

    key: Hashable
    report: SpecReport
    cached: int = 0
    active: bool = True
    acceptance: float = 0.8
    skipped: int = 0

    @property
    def draft_steps(self) -> int:
        return self.report.draft_steps

    def round(self, catchup: list[int], k: int) -> DraftRound:
        """This iteration's round: draft `k` tokens.

        Args:
            catchup: the committed ids at positions `cached` .. the fed token's, inclusive.
        """
        return DraftRound(self.key, self.draft_steps, k, catchup, self.cached)

    def record(self, start: int, outcome: SpecOutcome) -> None:
        """Move the draft's length pointer past what the round kept and count the round.

        The draft cached positions up to start + k - 1 (its last draft is never
        fed); the ones up to start + accepted hold committed tokens.
        """
        self.cached = start + min(outcome.accepted, outcome.drafted - 1) + 1
        r = self.report
        r.rounds += 1
        r.drafted_tokens += outcome.drafted
        r.accepted_tokens += outcome.accepted


def validate(c: ComputeParams, config: ModelConfig) -> None:
    """The speculation fields' ranges (called by `runtime.validation.validate_request`).

    Raises:
        InvalidRequestError: naming `draft_steps` or `draft_tokens`.
    """
    from runtime.validation import is_int

    lo, hi = config.step_range
    top = (c.steps if is_int(c.steps) else hi) - 1
    d = c.draft_steps
    if d is not None and (not is_int(d) or (d != 0 and not lo <= d <= top)):
        what = "the request's steps" if is_int(c.steps) else "the model's max_steps"
        allowed = (
            f"must be 0 (off) or an integer in [{lo}, {top}] (min_steps to {what} - 1)"
            if top >= lo
            else f"must be 0 (off): {what} ({top + 1}) leaves no smaller step count to draft with"
        )
        raise InvalidRequestError("draft_steps", d, allowed)
    k = c.draft_tokens
    if k is not None and (not is_int(k) or not 1 <= k <= MAX_DRAFT_TOKENS):
        raise InvalidRequestError("draft_tokens", k, f"must be an integer in [1, {MAX_DRAFT_TOKENS}]")


AUTO_MIN_RATIO = 3
""""auto" drafts only for requests whose steps are at least this multiple of the draft's."""


def resolve(
    c: ComputeParams,
    steps: int,
    config: ModelConfig,
    settings: EngineConfig,
    request_id: str,
    auto_pays: bool = True,
) -> SpecState | None:
    """The request's speculation at its chosen steps, or None (validated fields; module docstring).

    An explicit `draft_steps` at or above steps the policy chose (no explicit
    `steps`: a quality tier, a latency budget, the SLO controller) turns
    speculation off for the request rather than failing it by load.

    Args:
        auto_pays: whether "auto" may speculate on this backend at all. The
            compiled decode (backend "torch-aot") runs one-token rows as
            AOT-compiled graphs but verification forwards (k + 1 tokens per
            row) eagerly: on ode-tiny a compiled N=12 token took ~1 ms and a
            round ~4-7 ms, so speculation measured 0.2-0.5x there and "auto"
            stays off until verification forwards are compiled too.
    """
    lo, _ = config.step_range
    k = c.draft_tokens if c.draft_tokens is not None else settings.draft_tokens
    if c.draft_steps is not None:
        d, mode = c.draft_steps, "explicit"
    elif settings.draft_steps == "auto":
        d, mode = (auto_draft_steps(config, steps) if auto_pays else 0), "auto"
    else:
        d, mode = int(settings.draft_steps or 0), "default"
        d = min(d, steps - 1) if d else 0
    if not d or d < lo or d >= steps:
        return None
    return SpecState((request_id, "draft"), SpecReport(d, k, mode=mode))


def auto_draft_steps(config: ModelConfig, steps: int) -> int:
    """ "auto"'s draft step count for a request at `steps`: the model's minimum, when it is at
    most 1/`AUTO_MIN_RATIO` of steps (else 0: a draft that costs more than a third of the
    target cannot pay for its misses); bench engine --speculation measures the choice."""
    lo, _ = config.step_range
    return lo if lo * AUTO_MIN_RATIO <= steps else 0


class AutoSpeculation:
    """The "auto" policy: how many tokens a request drafts this round (0 = an ordinary decode).

    Per request it keeps an exponential average `a` of the per-draft acceptance
    rate (`SpecState.acceptance`, updated after every round; it starts at
    `prior`). Costs are in units of one plain decode forward of the request:

        draft forward      c = (o + draft_steps) / (o + steps)   (o: a forward's fixed
                           cost, embedding, head and Python, in steps)
        verification       1 + v k   (v: one more token per row, which grows with the batch)
        the iteration      e         (scheduling, sampling, streaming; paid once per round)

    A round of k drafts yields (1 - a^(k+1)) / (1 - a) tokens for k c + 1 + v k + e,
    against 1 + e per token without drafting; the policy takes the k in
    [1, draft_tokens] with the best ratio and no draft at all when even that is
    below 1 + `margin`. v = `v_one` + `v_slope` (batch - 1), at most 1: at
    batch 1 a forward is dominated by fixed costs and extra tokens are nearly
    free; as the batch fills, every verification token costs about a decode
    row, so drafting stops paying and stops. A request that stopped drafting
    probes one round every `retry_every` iterations, so a text that became
    predictable wins it back, unless even a perfect draft would not pay at the
    current batch (then nobody drafts: at batch 16 one probing row would add
    its draft and verification forwards to everyone's iteration). The defaults
    are ode-tiny's on one CPU core (eager torch: o ~ 1.7 steps, v ~ 0.05-0.3
    at batch 1, where the MoE routes the k + 1 tokens to more experts, and
    ~1 at batch 16, where a fixed 2x3 draft measured 0.88-0.98x; e ~ 0.3).

    Under load the SLO controller acts first: it lowers the default step
    count of new requests (runtime/slo.py) from the measured inter-token
    latency; speculation then follows those steps (a lower target leaves a
    draft cheaper than 1/3 of it less often, `auto_draft_steps`) and the
    batch-size term above turns drafting off as the batch fills. Speculation
    never changes a request's steps, and the controller sees per-token
    latencies (a round's gap is divided among its tokens), so the two do not
    feed back on each other.
    """

    def __init__(
        self,
        overhead_steps: float = 1.7,
        v_one: float = 0.1,
        v_slope: float = 0.06,
        iteration: float = 0.3,
        margin: float = 0.05,
        retry_every: int = 16,
    ) -> None:
        self.overhead_steps, self.v_one, self.v_slope = overhead_steps, v_one, v_slope
        self.iteration, self.margin, self.retry_every = iteration, margin, retry_every

    def verify_cost(self, batch: int) -> float:
        """v: one more verification token per row, in decode forwards, at this batch size."""
        return min(1.0, self.v_one + self.v_slope * max(batch - 1, 0))

    def gain(self, a: float, k: int, draft_steps: int, steps: int, batch: int) -> float:
        """Tokens per cost of a k-draft round relative to plain decoding (> 1: drafting pays)."""
        o, e = self.overhead_steps, self.iteration
        c = (o + draft_steps) / (o + steps)
        a = min(max(a, 0.0), 0.999)
        return (1 - a ** (k + 1)) / (1 - a) * (1 + e) / (k * c + 1 + self.verify_cost(batch) * k + e)

    def tokens(self, spec: SpecState, steps: int, batch: int, limit: int) -> int:
        """Tokens to draft this round (0 = decode one token as usual), at most `limit`."""
        top = min(limit, spec.report.draft_tokens)
        if self.gain(1.0, top, spec.draft_steps, steps, batch) <= 1.0 + self.margin:
            return 0  # not even a perfect draft would pay at this batch: no probing either
        best_k, best = 0, 1.0 + self.margin
        for k in range(1, min(limit, spec.report.draft_tokens) + 1):
            g = self.gain(spec.acceptance, k, spec.draft_steps, steps, batch)
            if g > best:
                best_k, best = k, g
        if best_k == 0:
            spec.skipped += 1
            if spec.skipped < self.retry_every:
                return 0
            best_k = 1  # probe: keep the estimate from going stale
        spec.skipped = 0
        return min(best_k, limit)

    @staticmethod
    def observe(spec: SpecState, outcome: SpecOutcome, weight: float = 0.3) -> None:
        """Fold one round's acceptance into the request's estimate."""
        rate = outcome.accepted / max(outcome.drafted, 1)
        spec.acceptance = (1 - weight) * spec.acceptance + weight * rate


class EngineSpeculation:
    """The engine's side of speculation: a request's setting at submission (with the KV
    check), how many tokens each decode row drafts this iteration, and the accounting of
    a finished round (the request's report, "auto"'s acceptance estimate, the
    iteration's drafted/accepted counts). Committing the round's tokens stays with the
    engine, which owns the scheduler and the text."""

    def __init__(self, config: ModelConfig, settings: EngineConfig, runner: ModelRunner) -> None:
        self.config, self.settings, self.runner = config, settings, runner
        self.auto = AutoSpeculation()

    def admit(
        self,
        c: ComputeParams,
        steps: int,
        prompt_tokens: int,
        max_tokens: int,
        request_id: str,
        min_steps: int = 0,
    ) -> SpecState | None:
        """The request's `SpecState` (None: no speculation), after checking its KV fits.

        Args:
            min_steps: the memory dial's floor for this request (0 = none): without
                speculation it only has to fit the pool at that many steps (admission
                lowers its steps to what fits, runtime/scheduler.py).

        Raises:
            InvalidRequestError: the request (with its explicit draft) can never fit the pool.
        """
        auto_pays = getattr(self.runner.backend, "name", "") != "torch-aot"  # see `resolve`
        spec = resolve(c, steps, self.config, self.settings, request_id, auto_pays)
        if spec is not None and spec.report.mode != "explicit":
            try:  # the server's own default never makes a request not fit
                self.runner.check_fits(steps, prompt_tokens, max_tokens, spec.draft_steps)
            except InvalidRequestError:
                spec = None
        if spec is None:
            self.runner.check_fits(min_steps or steps, prompt_tokens, max_tokens)
        else:
            self.runner.check_fits(steps, prompt_tokens, max_tokens, spec.draft_steps)
        return spec

    def draft_tokens(self, spec: SpecState | None, steps: int, remaining: int, batch: int) -> int:
        """Tokens a decode row drafts this iteration (0 = one ordinary token); `remaining`
        = tokens the request may still produce (a round commits up to k + 1)."""
        if spec is None or not spec.active:
            return 0
        limit = remaining - 1
        if limit < 1:
            return 0
        if spec.report.mode == "auto":
            return self.auto.tokens(spec, steps, batch, limit)
        return min(spec.report.draft_tokens, limit)

    def account(
        self,
        spec: SpecState,
        start: int,
        outcome: SpecOutcome,
        counts: dict[tuple[int, str], tuple[int, int]],
    ) -> None:
        """Record a finished round in the request's report, "auto"'s estimate and `counts`
        (drafted, accepted per (draft_steps, mode), for `IterationStats.speculation`)."""
        spec.record(start, outcome)
        if spec.report.mode == "auto":
            self.auto.observe(spec, outcome)
        key = (spec.draft_steps, spec.report.mode)
        d, a = counts.get(key, (0, 0))
        counts[key] = (d + outcome.drafted, a + outcome.accepted)

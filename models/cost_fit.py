"""Wall-clock calibration of the cost model: measured decode iterations -> `CostModel`.

`fit_cost_model` fits `seconds = a * bytes + b * flops + c` (a, b >= 0) to
`CostSample`s, reporting the bytes-only, FLOPs-only and combined R^2 ("Time
Matters": bytes should predict better); `design_grid` picks the small,
well-spread grid of decode iterations `leanserve eval` times for it. The
fitted model is evaluated in models/cost.py, which re-exports these names.
Pure Python and numpy; never imports runtime, ray or grpc.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.config import ModelConfig
from models.cost import CostModel, decode_cost


@dataclass
class CostSample:
    """One measured decode iteration.

    Attributes:
        steps: trunk steps every row ran.
        batch: rows in the iteration.
        context: tokens cached per row before the iteration.
        experts: top-k / truncation depth used (None = the config's maximum).
        seconds: measured wall-clock time of the iteration.
    """

    steps: int
    batch: int
    context: int
    experts: int | None
    seconds: float


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        # Constant targets: a perfect fit explains everything, anything else nothing.
        return 1.0 if ss_res <= 1e-30 else 0.0
    return 1.0 - ss_res / ss_tot


def _fit_nonneg(features: dict[str, np.ndarray], y: np.ndarray) -> tuple[dict[str, float], float, float]:
    """Least squares y = sum(w_f * x_f) + c with every w_f >= 0.

    Scipy-free active-set shortcut: fit all features, drop the most negative
    coefficient's feature, refit, until none is negative. Columns are scaled
    to unit maximum first because bytes and FLOPs are ~1e6-1e10 while
    seconds are ~1e-3.

    Returns:
        (coefficients by feature name, dropped ones 0.0; intercept; R^2).
    """
    active = list(features)
    while True:
        scales = [float(np.max(np.abs(features[n]))) or 1.0 for n in active]
        cols = [features[n] / s for n, s in zip(active, scales, strict=True)]
        design = np.column_stack([*cols, np.ones_like(y)])
        sol, *_ = np.linalg.lstsq(design, y, rcond=None)
        coefs = {n: float(w / s) for n, w, s in zip(active, sol[:-1], scales, strict=True)}
        negative = [n for n in active if coefs[n] < 0]
        if not negative:
            break
        active.remove(min(negative, key=coefs.__getitem__))
    full = {n: coefs.get(n, 0.0) for n in features}
    intercept = float(sol[-1])
    pred = intercept + sum(full[n] * features[n] for n in features)
    return full, intercept, _r2(y, pred)


def fit_cost_model(config: ModelConfig, samples: Sequence[CostSample], dtype_bytes: int = 4) -> CostModel:
    """Fit seconds = a * bytes + b * flops + c to measured decode iterations.

    Also fits bytes-only and FLOPs-only models and reports each R^2, so one
    can check the "Time Matters" claim (memory traffic predicts time better
    than FLOPs) on this hardware. Coefficients are constrained >= 0 by
    dropping a feature whose unconstrained coefficient comes out negative.

    Args:
        config: the configuration the samples were measured on.
        samples: measured decode iterations (at least 3).
        dtype_bytes: element size used to compute bytes.

    Returns:
        The fitted `CostModel` (uses the two-feature fit).

    Raises:
        ValueError: fewer than 3 samples, or a sample outside the config.
    """
    if len(samples) < 3:
        raise ValueError(
            f"fit_cost_model needs at least 3 samples (2 coefficients + intercept), got {len(samples)}"
        )
    costs = [decode_cost(config, s.steps, s.batch, s.context, s.experts, dtype_bytes) for s in samples]
    x_bytes = np.array([c.bytes for c in costs], dtype=np.float64)
    x_flops = np.array([c.flops for c in costs], dtype=np.float64)
    y = np.array([s.seconds for s in samples], dtype=np.float64)
    both, c, r2_both = _fit_nonneg({"bytes": x_bytes, "flops": x_flops}, y)
    _, _, r2_bytes = _fit_nonneg({"bytes": x_bytes}, y)
    _, _, r2_flops = _fit_nonneg({"flops": x_flops}, y)
    return CostModel(
        a_bytes=both["bytes"],
        b_flops=both["flops"],
        c=c,
        r2_bytes=r2_bytes,
        r2_flops=r2_flops,
        r2_both=r2_both,
        n_samples=len(samples),
        config_name=config.name,
        dtype_bytes=dtype_bytes,
    )


# ----------------------------------------------------------------------------
# Calibration grid
# ----------------------------------------------------------------------------
def _spread(low: int, high: int, count: int) -> list[int]:
    """Up to `count` distinct integers evenly spread over [low, high], ends included."""
    return sorted({round(v) for v in np.linspace(low, high, count)})


def design_grid(
    config: ModelConfig,
    batches: Sequence[int] = (1, 4, 16),
    contexts: Sequence[int] = (16, 64, 192),
    max_points: int = 40,
) -> list[tuple[int, int, int, int | None]]:
    """A small, well-spread grid of decode iterations to time for calibration.

    Candidates are the product of steps (min, max and two between), expert
    settings (MoE: 1..top_k ends and middle; tree: depth 0, middle, D;
    dense: None), batches and contexts (those < context_length). Batch moves
    FLOPs much more than bytes (weights are shared) and context moves KV
    bytes, so the grid separates the two features. When the product exceeds
    `max_points`, the corners are kept and the rest is filled greedily by
    maximin distance in normalised level coordinates (deterministic).

    Args:
        config: the model configuration.
        batches: batch sizes to include.
        contexts: context lengths to include (clipped to < context_length).
        max_points: cap on the number of points.

    Returns:
        `(steps, batch, context, experts)` tuples.
    """
    low, high = config.step_range
    steps = _spread(low, high, 4)
    if config.ffn == "moe":
        experts: list[int | None] = list(_spread(1, config.experts_top_k, 3))
    elif config.ffn == "tree":
        experts = list(_spread(0, config.tree_depth, 3))
    else:
        experts = [None]
    ctxs = sorted({c for c in contexts if 0 <= c < config.context_length}) or [config.context_length - 1]
    bats = sorted({b for b in batches if b >= 1}) or [1]
    axes: list[list[Any]] = [steps, bats, ctxs, experts]

    # Levels normalised to [0, 1] per axis, so every axis weighs the same.
    def coords(idx: tuple[int, ...]) -> np.ndarray:
        return np.array([i / max(len(a) - 1, 1) for i, a in zip(idx, axes, strict=True)])

    candidates = list(np.ndindex(*(len(a) for a in axes)))
    if len(candidates) <= max_points:
        chosen = candidates
    else:
        is_corner = [all(i in (0, len(a) - 1) for i, a in zip(idx, axes, strict=True)) for idx in candidates]
        chosen = [c for c, corner in zip(candidates, is_corner, strict=True) if corner][:max_points]
        points = np.stack([coords(c) for c in candidates])
        taken = np.array([c in chosen for c in candidates])
        dist = np.min(np.linalg.norm(points[:, None, :] - points[taken][None, :, :], axis=-1), axis=1)

        def take(allowed: np.ndarray) -> None:
            nonlocal dist
            best = int(np.argmax(np.where(allowed & ~taken, dist, -1.0)))  # first maximum: deterministic
            chosen.append(candidates[best])
            taken[best] = True
            dist = np.minimum(dist, np.linalg.norm(points - points[best], axis=-1))

        # Cover every level of every axis (e.g. the middle step counts) before filling,
        # so each setting the runtime may pick is measured at least once.
        levels = np.array(candidates)
        for axis, values in enumerate(axes):
            for level in range(len(values)):
                if len(chosen) < max_points and not np.any(taken & (levels[:, axis] == level)):
                    take(levels[:, axis] == level)
        while len(chosen) < max_points:
            take(np.ones(len(candidates), dtype=bool))
        chosen = sorted(chosen)
    return [tuple(a[i] for i, a in zip(idx, axes, strict=True)) for idx in chosen]  # type: ignore[misc]


__all__ = ["CostSample", "design_grid", "fit_cost_model"]

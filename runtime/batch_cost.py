"""The calibrated cost model evaluated for what the engine actually runs: mixed-step batches.

`CostModel.predict_decode_seconds` prices one decode iteration whose rows all
run the same step count. The engine's rows do not: rows of different step
counts share every matmul (iteration `i` of the trunk runs the rows whose
count exceeds `i`), so an iteration costs the edge (embedding, head,
intercept) for all its rows plus, per step `k`, the cost of that step for the
rows still running it. `BatchCost` tabulates the uniform predictions once per
context length and prices any mix from them; the SLO controller
(runtime/slo.py) and the latency predictor (runtime/predictor.py) both price
batches through it, so they agree on what an iteration costs.
"""

from __future__ import annotations

from models.config import ModelConfig
from models.cost import CostModel

_MAX_TABLES = 64  # contexts cached at once (each table is steps x batch floats)


class BatchCost:
    """Predicted model seconds of decode iterations and prefills under a calibrated `CostModel`.

    Args:
        cost_model: the calibrated (or nominal) cost model.
        config: the model's configuration (shapes, step range, context length).
        max_batch: the largest batch priced exactly; larger batches extrapolate linearly.
    """

    def __init__(self, cost_model: CostModel, config: ModelConfig, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be >= 1")
        self.cost_model = cost_model
        self.config = config
        self.max_batch = int(max_batch)
        self._tables: dict[int, list[list[float]]] = {}
        self._base: list[list[list[float]]] = []

    def table(self, context: float) -> list[list[float]]:
        """Predicted seconds of a uniform decode iteration, [steps][batch - 1], at a context
        (affine in the context, so two calibrated tables are interpolated)."""
        key = int(min(max(context, 0.0), self.config.context_length - 1))
        table = self._tables.get(key)
        if table is None:
            if not self._base:
                self._base = [
                    [
                        [
                            self.cost_model.predict_decode_seconds(self.config, n, b, c)
                            for b in range(1, self.max_batch + 2)
                        ]
                        for n in range(self.config.step_range[1] + 1)
                    ]
                    for c in (0, self.config.context_length - 1)
                ]
            lo, hi = self._base
            w = key / max(self.config.context_length - 1, 1)
            table = [
                [x + w * (y - x) for x, y in zip(r0, r1, strict=True)] for r0, r1 in zip(lo, hi, strict=True)
            ]
            if len(self._tables) > _MAX_TABLES:
                self._tables.clear()
            self._tables[key] = table
        return table

    def model_seconds(self, rows: float, shares: dict[int, float], context: float) -> float:
        """Predicted model time of one decode iteration of `rows` rows, `shares[n]` of them at n steps.

        `shares` sums to 1 (fractions of the rows); `rows` may be fractional (an expected
        batch). Rows of different step counts share every matmul, see the module docstring.
        """
        if rows <= 0 or not shares:
            return 0.0
        t = self.table(context)
        top = self.config.step_range[1]

        def at(n: int, b: float) -> float:  # t[n] at a real batch size b >= 1, linear between integers
            i = min(int(b), self.max_batch)
            return t[n][i - 1] + (b - i) * (t[n][i] - t[n][i - 1])

        total = at(0, rows)
        remaining = 1.0
        for k in range(min(max(shares), top)):
            remaining -= shares.get(k, 0.0)
            b = rows * remaining
            if b <= 1e-9:
                break
            total += at(k + 1, b) - at(k, b) if b >= 1 else b * (t[k + 1][0] - t[k][0])
        return total

    def prefill_seconds(self, steps: float, prompt_tokens: float) -> float:
        """Predicted model time of one request's prefill forward (`steps` rounded, prompt clamped)."""
        n = min(max(round(steps), 0), self.config.step_range[1])
        p = max(1, min(round(prompt_tokens), self.config.context_length - 1))
        return self.cost_model.predict_remaining_seconds(self.config, n, 0, p, 1)

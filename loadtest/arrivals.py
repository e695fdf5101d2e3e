"""Arrival schedules and prompt sets: deterministic for a given seed.

An open-loop schedule is a list of send offsets in seconds from the start of
a run. Each request is sent at its offset whether or not earlier ones have
finished, and its latency is measured from that offset (see `driver`), so a
slow server shows up as latency instead of as a lower send rate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

SYNTHETIC_TEXT = (
    "the light was good and the waters were gathered into one place while the earth brought "
    "forth grass and the evening and the morning were the first day of a long journey home"
)


def poisson_schedule(rate: float, max_requests: int, duration_s: float, seed: int = 0) -> list[float]:
    """Send offsets of a Poisson process, bounded by count and by duration.

    Args:
        rate: mean arrivals per second (> 0).
        max_requests: most offsets returned (>= 1).
        duration_s: no offset is later than this (> 0).
        seed: seeds a private generator, so the schedule never depends on global state.

    Returns:
        Increasing offsets in seconds, at most `max_requests` long, all `<= duration_s`.

    Raises:
        ValueError: a bound or the rate is not positive (the message names it).
    """
    if not rate > 0:
        raise ValueError(f"rate={rate} must be > 0 requests/s")
    if max_requests < 1:
        raise ValueError(f"max_requests={max_requests} must be >= 1")
    if not duration_s > 0:
        raise ValueError(f"duration_s={duration_s} must be > 0")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while len(out) < max_requests:
        # Exponential gaps with mean 1/rate make a Poisson process of that rate.
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        out.append(t)
    return out


def ks_statistic_exponential(samples: Sequence[float], rate: float) -> float:
    """Kolmogorov-Smirnov D of `samples` against the Exponential(rate) CDF.

    D = max over sorted samples x_i (i = 1..n) of max(i/n - F(x_i), F(x_i) - (i-1)/n),
    with F(x) = 1 - exp(-rate x). Written out so the tests need no scipy.
    """
    xs = sorted(samples)
    n = len(xs)
    if n == 0:
        raise ValueError("need at least one sample")
    d = 0.0
    for i, x in enumerate(xs, start=1):
        f = 1.0 - math.exp(-rate * x)
        d = max(d, i / n - f, f - (i - 1) / n)
    return d


def ks_critical_value(n: int, alpha: float = 0.01) -> float:
    """Asymptotic KS critical value c(alpha) / sqrt(n) (c = sqrt(-ln(alpha/2) / 2))."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


@dataclass(frozen=True)
class LengthSpec:
    """Prompt length distribution, in words (about one token each for the demo tokenizers).

    Attributes:
        kind: "fixed" (always `mean`), "uniform" (integers in [low, high]) or
            "lognormal" (median `mean`, shape `sigma`, clipped to [low, high]).
        mean: fixed length, or the lognormal median.
        low: smallest length.
        high: largest length.
        sigma: lognormal shape.
    """

    kind: str = "fixed"
    mean: int = 16
    low: int = 4
    high: int = 48
    sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"prompt length kind={self.kind!r}; use fixed, uniform or lognormal")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"prompt lengths need 1 <= low ({self.low}) <= high ({self.high})")
        if self.mean < 1:
            raise ValueError(f"prompt length mean={self.mean} must be >= 1")

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        """Parse `fixed:16`, `uniform:4:48` or `lognormal:16:4:48[:0.5]`."""
        parts = text.split(":")
        try:
            if parts[0] == "fixed" and len(parts) == 2:
                n = int(parts[1])
                return cls("fixed", n, min(n, 4), max(n, 48))
            if parts[0] == "uniform" and len(parts) == 3:
                lo, hi = int(parts[1]), int(parts[2])
                return cls("uniform", (lo + hi) // 2, lo, hi)
            if parts[0] == "lognormal" and len(parts) in (4, 5):
                sigma = float(parts[4]) if len(parts) == 5 else 0.5
                return cls("lognormal", int(parts[1]), int(parts[2]), int(parts[3]), sigma)
        except ValueError as e:
            raise ValueError(f"bad prompt length spec {text!r}: {e}") from e
        raise ValueError(
            f"bad prompt length spec {text!r}; use fixed:N, uniform:LO:HI or lognormal:MED:LO:HI"
        )

    def sample(self, rng: random.Random) -> int:
        """One length."""
        if self.kind == "fixed":
            return self.mean
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        return min(self.high, max(self.low, round(rng.lognormvariate(math.log(self.mean), self.sigma))))


def build_prompts(count: int, lengths: LengthSpec, source: str = "synthetic", seed: int = 0) -> list[str]:
    """`count` prompts whose word counts follow `lengths`; deterministic for a seed.

    Args:
        count: prompts to build.
        lengths: the length distribution.
        source: "synthetic" (a fixed word list, no I/O) or "bible" (windows of
            the World English Bible from `models.data.load_corpus()`).
        seed: seeds the lengths and window positions.
    """
    rng = random.Random(seed)
    if source == "synthetic":
        words = SYNTHETIC_TEXT.split()
    elif source == "bible":
        from models.data import load_corpus  # lazy: reads ~4 MB only when asked for

        words = load_corpus().split()
    else:
        raise ValueError(f"prompt source={source!r}; use synthetic or bible")
    prompts = []
    for _ in range(count):
        n = lengths.sample(rng)
        start = rng.randrange(len(words))
        # Wrap around so a window near the end still has n words.
        prompts.append(" ".join(words[(start + i) % len(words)] for i in range(n)))
    return prompts

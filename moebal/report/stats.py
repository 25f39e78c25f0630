"""Paired comparisons of two methods over the seeds they share.

Every method of a comparison trains with the same seeds (the same initial weights and data
order), so seed s of method A and seed s of method B form a pair, and the seed-to-seed noise
they have in common cancels in their difference. For n pairs with differences
``d_s = a_s - b_s``:

- mean difference ``d̄ = Σ d_s / n`` and its sample standard deviation ``s_d`` (ddof 1);
- the 95% confidence interval ``d̄ ± t_{0.975, n-1} · s_d / √n`` (Student t);
- the minimum detectable effect at 80% power, the smallest true mean difference that a
  two-sided paired t test at level 0.05 finds four times out of five::

      MDE = (t_{1-α/2, n-1} + t_{power, n-1}) · s_d / √n,   α = 0.05, power = 0.8

  (the usual approximation to the noncentral-t power equation; it is below the exact value
  by 14% at n = 2, 5% at n = 3, under 1% from n = 5 on).

With fewer than two pairs the standard deviation, the interval and the MDE are unknown
(NaN): one seed cannot tell a method's effect from its seed's luck.

Pure functions on numbers; the report's claims (:mod:`moebal.report.claims`) read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
POWER = 0.8


@dataclass(frozen=True)
class Paired:
    """The paired difference ``a - b`` over the seeds both have a value for.

    ``sd``, ``ci_low``, ``ci_high`` and ``mde`` are NaN with fewer than two pairs.
    ``mean_a`` and ``mean_b`` are the means of each side over the same pairs.
    """

    seeds: tuple[int, ...]
    mean_diff: float
    sd: float
    ci_low: float
    ci_high: float
    mde: float
    mean_a: float
    mean_b: float
    confidence: float = CONFIDENCE
    power: float = POWER

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def known(self) -> bool:
        """True when the seed noise is known (two pairs or more)."""
        return self.n >= 2 and math.isfinite(self.ci_low)

    @property
    def spans_zero(self) -> bool:
        """True when the interval holds 0 (or is unknown): the sign is not established."""
        return not self.known or self.ci_low <= 0.0 <= self.ci_high

    @property
    def sign(self) -> int:
        """-1: a < b beyond the interval; +1: a > b beyond it; 0: not established."""
        if self.spans_zero:
            return 0
        return -1 if self.ci_high < 0.0 else 1


def t_interval(diffs: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Student-t confidence interval of the mean of ``diffs``: ``(low, high)``.

    ``d̄ ± t_{(1+confidence)/2, n-1} · s_d / √n``; ``(nan, nan)`` for fewer than two values.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, d.size - 1)) * sd / math.sqrt(d.size)
    return mean - half, mean + half


def minimum_detectable_effect(sd: float, n: int, confidence: float = CONFIDENCE,
                              power: float = POWER) -> float:
    """The smallest mean difference a paired t test over ``n`` pairs detects with ``power``.

    ``(t_{(1+confidence)/2, n-1} + t_{power, n-1}) · sd / √n`` for the standard deviation
    ``sd`` of the differences; NaN when ``n < 2`` or ``sd`` is not finite.
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    df = n - 1
    t_sum = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, df) + scipy_stats.t.ppf(power, df))
    return t_sum * sd / math.sqrt(n)


def _finite(x: Optional[float]) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def paired_difference(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]],
                      confidence: float = CONFIDENCE, power: float = POWER) -> Paired:
    """The paired difference ``a - b`` over the seeds (keys) where both values are finite.

    ``a`` and ``b`` map seed -> value (None or NaN: not measured, the seed is left out).
    Returns a :class:`Paired`; with no shared seed its means are NaN and ``n`` is 0.
    """
    seeds = tuple(sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s])))
    xa = np.asarray([a[s] for s in seeds], dtype=float)
    xb = np.asarray([b[s] for s in seeds], dtype=float)
    if not seeds:
        nan = float("nan")
        return Paired((), nan, nan, nan, nan, nan, nan, nan, confidence, power)
    d = xa - xb
    sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    low, high = t_interval(d, confidence)
    return Paired(seeds, float(d.mean()), sd, low, high,
                  minimum_detectable_effect(sd, d.size, confidence, power),
                  float(xa.mean()), float(xb.mean()), confidence, power)


def scaled_difference(a: Mapping[int, Optional[float]], b: Mapping[int, Optional[float]],
                      factor: float, confidence: float = CONFIDENCE,
                      power: float = POWER) -> Paired:
    """The paired difference ``a - factor · b``: tests a claim "a ≤ factor · b".

    E.g. factor 0.5 asks whether a is at most half of b, factor 0.87 whether a takes at
    least 13% less than b. Returns a :class:`Paired` whose ``mean_b`` is the mean of b
    (unscaled) over the pairs.
    """
    if not _finite(factor) or factor <= 0:
        raise ValueError(f"factor must be a positive number, got {factor!r}")
    scaled = {s: (v * factor if _finite(v) else None) for s, v in b.items()}
    p = paired_difference(a, scaled, confidence, power)
    return Paired(p.seeds, p.mean_diff, p.sd, p.ci_low, p.ci_high, p.mde, p.mean_a,
                  p.mean_b / factor if p.seeds else p.mean_b, confidence, power)


def format_paired(p: Paired, digits: int = 3, unit: str = "") -> str:
    """``"-0.12 (95% CI -0.3 to 0.05, n=3, sd 0.07, MDE 0.2)"``; one pair: no interval."""
    def f(x: float) -> str:
        if not math.isfinite(x):
            return "n/a"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"

    if p.n == 0:
        return "no shared seed"
    if not p.known:
        return f"{f(p.mean_diff)}{unit} (n={p.n}: seed noise unknown)"
    return (f"{f(p.mean_diff)}{unit} ({round(p.confidence * 100)}% CI {f(p.ci_low)} to "
            f"{f(p.ci_high)}, n={p.n}, sd {f(p.sd)}, MDE {f(p.mde)}{unit})")

"""The planner's search: the largest integer k (a sequence length in steps, or a batch size)
whose compiled peak fits a budget, in as few compiles as possible.

It is a bracketing (binary) search on compiled peaks: every k tried is compiled, `lo` is the
largest that fits so far and `hi` the smallest that does not. Only the choice of the next k is
guided: a program's peak is close to a polynomial of degree at most two in the sequence length
(activations grow linearly, attention scores quadratically where a kernel materialises them)
and linear in the batch, so the next k is where the parabola through the three nearest peaks
(the line through two, while there are only two) reaches the budget. A guess that lands on the
same side of the boundary three times in a row is replaced by the midpoint, so the search is
never slower than a plain binary search by more than a constant factor, whatever the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# Upward steps before a failing point is known grow at most this much at once.
MAX_GROWTH = 8


def largest_fit(
    peak: Callable[[int], int],
    budget: int,
    kmax: int,
    start: int,
    known: dict[int, int] | None = None,
) -> tuple[int, dict[int, int]]:
    """The largest k in [1, kmax] with `peak(k) <= budget` (0 if none), assuming the peak grows
    with k.

    Args:
      peak: compiles at k and returns the planned peak (bytes).
      budget: bytes.
      kmax: the largest k to consider.
      start: the first k to compile (clamped into the open bracket).
      known: peaks already compiled, `{k: peak}`.

    Returns:
      The k found and every peak known on the way, `{k: peak}`.
    """
    points = dict(known or {})
    lo = max((k for k, p in points.items() if p <= budget), default=0)
    hi = min((k for k, p in points.items() if p > budget), default=kmax + 1)
    k, last_side, streak = min(max(start, lo + 1), hi - 1), None, 0
    while hi - lo > 1:
        points[k] = peak(k)
        side = points[k] <= budget
        lo, hi = (k, hi) if side else (lo, k)
        streak = streak + 1 if side == last_side else 1
        last_side = side
        k = _next(points, budget, lo, hi, kmax, bisect=streak >= 3)
    return lo, points


def _next(points: dict[int, int], budget: int, lo: int, hi: int, kmax: int, bisect: bool) -> int:
    """The next k to compile, strictly inside (lo, hi)."""
    if lo and hi <= kmax:
        guess = (lo + hi) // 2 if bisect else _crossing(points, budget, lo, hi)
    elif lo:  # nothing fails yet: extrapolate up from the largest points
        guess = min(_crossing(points, budget, lo, None) or 2 * lo, MAX_GROWTH * lo)
    else:  # nothing fits yet: extrapolate down from the smallest points
        guess = max(_crossing(points, budget, None, hi) or hi // 2, hi // MAX_GROWTH)
    return min(max(guess, lo + 1), hi - 1)


def _crossing(points: dict[int, int], budget: int, lo: int | None, hi: int | None) -> int:
    """Where the curve through the (up to three) known points nearest the bracket reaches the
    budget, inside the bracket (its open ends unbounded); 0 when it does not."""
    if lo is not None and hi is not None:
        centre = (lo + hi) / 2
    else:
        centre = lo if lo is not None else hi
    near = sorted(sorted(points, key=lambda k: abs(k - centre))[:3])
    if len(near) < 2:
        return 0
    ks = np.array(near, np.float64)
    ps = np.array([points[k] for k in near], np.float64) - budget
    roots = np.roots(np.polyfit(ks, ps, len(near) - 1))
    low = lo if lo is not None else 0
    high = hi if hi is not None else math.inf
    inside = [r.real for r in roots if abs(r.imag) < 1e-9 and low <= r.real <= high]
    return math.floor(min(inside)) if inside else 0

"""A line search meeting the strong Wolfe conditions, for conjugate gradients.

Nocedal & Wright, "Numerical Optimization", 2nd ed., algorithms 3.5 (bracket)
and 3.6 (zoom). We do not reuse ``torch.optim.lbfgs._strong_wolfe``: it
interpolates with loss values, and as CG closes in on a minimum the loss
differences it divides by lose most of their digits to cancellation, so its
steps stop being exact and CG loses the conjugacy it needs (on a 50-dimensional
quadratic it took 55-70 iterations instead of at most 50). Here trial steps
come from the secant on directional derivatives, which is exact on a quadratic
and involves no loss differences.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class Point(NamedTuple):
    """One evaluation along the search line: step ``t``, loss, gradient and slope ``g . d``."""

    t: float
    loss: float
    grad: torch.Tensor
    slope: float


Evaluate = Callable[[float], Point]


def strong_wolfe(
    evaluate: Evaluate,
    start: Point,
    t: float,
    *,
    c1: float = 1e-4,
    c2: float = 0.1,
    tolerance_change: float = 1e-9,
    direction_norm: float = 1.0,
    max_evals: int = 25,
    refine: bool = False,
) -> tuple[Point, int]:
    """Search ``t > 0`` with sufficient decrease and ``|slope(t)| <= c2 * |slope(0)|``.

    Args:
        evaluate: loss, gradient and slope at step ``t`` along the search direction.
        start: the point at ``t = 0``; its slope must be negative.
        t: first trial step.
        c1: sufficient-decrease constant.
        c2: curvature constant (``c1 < c2 < 1``).
        tolerance_change: stop once the bracket moves the parameters by less than this.
        direction_norm: largest entry of the search direction, to scale ``tolerance_change``.
        max_evals: most calls of ``evaluate``.
        refine: when the first acceptable step comes straight from a trial (not from
            the zoom, whose steps are already exact on quadratics), take one more
            secant step and keep it if it is better and still acceptable.

    Returns:
        The accepted point (the best one found if the budget ran out) and the number of evaluations.

    Example:
        >>> def evaluate(t):  # f(x) = (x - 3)^2 from x = 0 along d = 1
        ...     return Point(t, (t - 3.0) ** 2, torch.tensor([2 * (t - 3.0)]), 2 * (t - 3.0))
        >>> point, evals = strong_wolfe(evaluate, evaluate(0.0), 1.0)
        >>> point.t
        3.0
    """
    assert start.slope < 0, "the search direction must be a descent direction"

    def sufficient(p: Point) -> bool:
        return p.loss <= start.loss + c1 * p.t * start.slope

    def flat(p: Point) -> bool:
        return abs(p.slope) <= -c2 * start.slope

    previous, evals = start, 0
    # Bracket: grow the step until the interval between two points holds an acceptable one.
    while evals < max_evals:
        point = evaluate(t)
        evals += 1
        if not sufficient(point) or (evals > 1 and point.loss >= previous.loss):
            low, high = previous, point
            break
        if flat(point):
            if not refine:
                return point, evals
            # One more secant step: exact if the loss is quadratic along the line, and
            # CG's conjugacy (finite termination on quadratics) needs exact steps.
            guess = _secant(previous, point)
            if not 0 < guess < float("inf") or guess == point.t:
                return point, evals
            better = evaluate(guess)
            evals += 1
            if sufficient(better) and flat(better) and better.loss <= point.loss:
                return better, evals
            return point, evals
        if point.slope >= 0:
            low, high = point, previous
            break
        # Extrapolate to where the slope would reach zero; without positive curvature, go far.
        guess = _secant(previous, point)
        guess = guess if guess > t else 10.0 * t
        t = min(max(guess, t + 0.01 * (t - previous.t)), 10.0 * t)
        previous = point
    else:
        return previous, evals
    # Zoom: shrink [low, high], keeping low the best point that meets sufficient decrease.
    while evals < max_evals and abs(high.t - low.t) * direction_norm >= tolerance_change:
        point = evaluate(_interpolate(low, high))
        evals += 1
        if not sufficient(point) or point.loss >= low.loss:
            high = point
            continue
        if flat(point):
            return point, evals
        if point.slope * (high.t - low.t) >= 0:
            high = low
        low = point
    return low, evals


def _secant(a: Point, b: Point) -> float:
    """Zero of the line through the slopes at ``a`` and ``b``; ``inf`` if it does not exist."""
    curvature = b.slope - a.slope
    if curvature == 0:
        return float("inf")
    return b.t - b.slope * (b.t - a.t) / curvature


def _interpolate(low: Point, high: Point) -> float:
    """A trial step strictly inside the bracket, exact when the loss is quadratic."""
    width = high.t - low.t
    if low.slope * high.slope < 0:
        t = _secant(low, high)
    else:
        # The slopes agree in sign (high failed on loss): minimize the quadratic
        # through low's loss and slope and high's loss instead.
        excess = high.loss - low.loss - low.slope * width
        t = low.t - low.slope * width * width / (2 * excess) if excess > 0 else low.t + width / 2
    # Keep clear of the ends so the bracket always shrinks.
    margin = 0.01 * abs(width)
    lower, upper = min(low.t, high.t) + margin, max(low.t, high.t) - margin
    return min(max(t, lower), upper)

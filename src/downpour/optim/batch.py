"""Batch methods written against vector ops: L-BFGS, accelerated gradient descent, conjugate gradients.

These are Sandblaster's methods (Dean et al., "Large Scale Distributed Deep
Networks", NIPS 2012): the method runs on a coordinator that never holds a
full-length vector. It names vectors (``"x"`` the parameters, ``"g"`` the
batch gradient at ``"x"``, and its own, such as the search direction
``"d"``) and sends a :class:`Space` vector ops (:mod:`downpour.server.vectors`);
only scalars come back. A :class:`Space` on parameter-server shards is
:class:`downpour.strategies.sandblaster.ShardSpace`; :class:`LocalSpace` keeps
the vectors in this process (the same methods, for one machine and for tests).

- :func:`lbfgs`: L-BFGS (Nocedal & Wright, "Numerical Optimization", 2nd ed.,
  algorithm 7.4, the two-loop recursion, and 7.5), memory ``m``, a line search
  meeting the strong Wolfe conditions (:func:`downpour.optim.line_search.strong_wolfe`).
- :func:`agd`: Nesterov's accelerated gradient descent (FISTA's form, Beck &
  Teboulle 2009) with backtracking on the step and the gradient restart of
  O'Donoghue & Candès, "Adaptive Restart for Accelerated Gradient Schemes", 2015.
- :func:`cg`: nonlinear conjugate gradients, Fletcher–Reeves or
  Hestenes–Stiefel, with Powell's restarts (N&W section 5.2).

Every method stops when ``||g|| <= gtol``, when an iteration lowers the
objective by less than ``ftol`` relative (scipy's L-BFGS-B test), or after
``max_iterations``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from downpour.errors import check_range, choose
from downpour.optim.line_search import Point, strong_wolfe
from downpour.server.vectors import Op, axpy, check_ops, copy, dot, run_ops, scale

METHODS = ("lbfgs", "agd", "cg")
BETAS = ("fr", "hs")
_NO_GRAD = torch.empty(0)  # the line search needs only losses and slopes


class Space(Protocol):
    """Where a batch method's vectors live."""

    def ops(self, *ops: Op) -> list[float]:
        """Run vector ops in order; the dot products they asked for."""
        ...

    def evaluate(self, *ops: Op) -> tuple[float, list[float]]:
        """The objective at ``"x"``, with its gradient left in ``"g"``; then ``ops``' dot products."""
        ...


@dataclass
class Result:
    """How a batch method ended: the objective at ``"x"``, iterations, gradient evaluations."""

    objective: float
    iterations: int = 0
    evaluations: int = 0
    converged: bool = False
    # Why it stopped: the gradient's norm or the objective's change met its tolerance, the
    # callback asked, or the iteration cap was reached without either.
    reason: str = "reached max_iterations without meeting gtol or ftol"
    history: list[float] = field(default_factory=list)  # the objective after each iteration


#: Called after every iteration; a true answer stops the method (a target reached, say).
Callback = Callable[[Result], bool | None]


@dataclass(frozen=True, kw_only=True)
class Stopping:
    """When a batch method stops (see the module docstring)."""

    max_iterations: int = 100
    gtol: float = 1e-5
    ftol: float = 2.2e-9

    def __post_init__(self) -> None:
        check_range("max_iterations", self.max_iterations, 1)
        check_range("gtol", self.gtol, 0.0)
        check_range("ftol", self.ftol, 0.0)

    def flat(self, before: float, after: float) -> bool:
        # A rise is no convergence (accelerated gradient descent is not monotone).
        return 0.0 <= before - after <= self.ftol * max(abs(before), abs(after), 1.0)


class LocalSpace:
    """A :class:`Space` in this process: named float32 vectors and an objective function.

    Args:
        x: the starting point (copied).
        objective: ``f(x) -> (value, gradient)``.

    Example:
        >>> space = LocalSpace(torch.tensor([3.0]), lambda x: (float(x @ x), 2 * x))
        >>> lbfgs(space).objective < 1e-10
        True
    """

    def __init__(self, x: torch.Tensor, objective: Callable[[torch.Tensor], tuple[float, torch.Tensor]]) -> None:
        self.vectors = {"x": x.detach().reshape(-1).to(torch.float32).clone()}
        self.vectors["g"] = torch.zeros_like(self.vectors["x"])
        self.objective = objective
        self.evaluations = 0

    def ops(self, *ops: Op) -> list[float]:
        check_ops(ops, set(self.vectors))
        return run_ops(ops, self.vectors, self.vectors["x"].numel(), self.vectors.__getitem__)

    def evaluate(self, *ops: Op) -> tuple[float, list[float]]:
        value, grad = self.objective(self.vectors["x"])
        self.vectors["g"].copy_(grad.reshape(-1))
        self.evaluations += 1
        return float(value), self.ops(*ops)


def _line(space: Space, t: float) -> Point:
    """Evaluate at ``x0 + t d``: the loss and the slope ``g . d`` there."""
    space.ops(copy("x", "x0"), axpy("x", t, "d"))
    loss, (slope,) = space.evaluate(dot("g", "d"))
    return Point(t, loss, _NO_GRAD, slope)


def _search(space: Space, start: Point, t: float, *, c2: float, refine: bool) -> tuple[Point, int]:
    """A strong Wolfe search from ``x0`` along ``d``; leaves ``x`` and ``g`` at the accepted point."""
    last = [start.t]

    def evaluate(step: float) -> Point:
        last[0] = step
        return _line(space, step)

    point, evals = strong_wolfe(evaluate, start, t, c2=c2, refine=refine)
    if point.t != last[0]:  # the search settled on an earlier trial: go back to it
        point, evals = _line(space, point.t), evals + 1
    return point, evals


def _descent(result: Result, before: float, f: float, gg: float, stop: Stopping,
             callback: Callback | None) -> bool:
    """Record an iteration that took the objective from ``before`` to ``f`` (``gg = g.g`` at the new point).

    True when the method should stop: converged, or the callback says so.
    """
    result.objective = f
    result.history.append(f)
    if math.sqrt(max(gg, 0.0)) <= stop.gtol:
        result.converged, result.reason = True, f"gradient norm {math.sqrt(max(gg, 0.0)):.3g} <= gtol {stop.gtol:g}"
    elif stop.flat(before, f):
        result.converged, result.reason = True, f"objective change {before - f:.3g} within ftol {stop.ftol:g}"
    asked = callback is not None and bool(callback(result))
    if asked and not result.converged:
        result.reason = "stopped by its callback"
    return result.converged or asked


def lbfgs(space: Space, *, memory: int = 10, stop: Stopping = Stopping(), callback: Callback | None = None) -> Result:
    """Minimize with L-BFGS from ``"x"``; ends with ``"x"`` at the result.

    Every iteration costs ``2 * memory + 2`` vector-op calls and usually one
    gradient pass (more when the line search needs them).
    """
    check_range("memory", memory, 1)
    f, (gg,) = space.evaluate(dot("g", "g"))
    result = Result(objective=f, evaluations=1)
    pairs: list[tuple[int, float, float]] = []  # (slot, rho, y.y / y.s), oldest first
    slot = 0
    if math.sqrt(gg) <= stop.gtol:
        result.converged, result.reason = True, "gradient norm within gtol at the start"
        return result
    while result.iterations < stop.max_iterations:
        # The direction d = -H g by the two-loop recursion, run on the vectors where they lie.
        pending: list[Op] = [copy("q", "g")]
        alphas: dict[int, float] = {}
        for s, rho, _ in reversed(pairs):
            (sq,) = space.ops(*pending, dot(f"s{s}", "q"))
            alphas[s] = rho * sq
            pending = [axpy("q", -alphas[s], f"y{s}")]
        if pairs:
            pending.append(scale("q", 1.0 / pairs[-1][2]))  # H0 = (s.y / y.y) I
        for s, rho, _ in pairs:
            (yq,) = space.ops(*pending, dot(f"y{s}", "q"))
            pending = [axpy("q", alphas[s] - rho * yq, f"s{s}")]
        (slope,) = space.ops(*pending, copy("d", "q"), scale("d", -1.0), copy("x0", "x"), copy("g0", "g"),
                             dot("g", "d"))
        if slope >= 0:  # curvature pairs gone bad: forget them, go downhill
            pairs.clear()
            (slope,) = space.ops(copy("d", "g"), scale("d", -1.0), dot("g", "d"))
        # The first step of a fresh memory is scaled to the gradient, later ones are 1 (N&W 7.2).
        t = 1.0 if pairs else min(1.0, 1.0 / math.sqrt(gg))
        point, evals = _search(space, Point(0.0, f, _NO_GRAD, slope), t, c2=0.9, refine=False)
        result.evaluations += evals
        result.iterations += 1
        # The new pair: s = x - x0 = t d, y = g - g0.
        s, y = f"s{slot}", f"y{slot}"
        ys, yy, gg = space.ops(copy(s, "d"), scale(s, point.t), copy(y, "g"), axpy(y, -1.0, "g0"),
                               dot(y, s), dot(y, y), dot("g", "g"))
        if ys > 1e-10 * yy:  # keep only pairs with positive curvature (H stays positive definite)
            pairs.append((slot, 1.0 / ys, yy / ys))
            pairs = pairs[-memory:]
            slot = (slot + 1) % (memory + 1)
        done = _descent(result, f, point.loss, gg, stop, callback)
        f = point.loss
        if done:
            break
    return result


def agd(space: Space, *, step: float | None = None, stop: Stopping = Stopping(),
        callback: Callback | None = None) -> Result:
    """Minimize with Nesterov's accelerated gradient descent, with restart; ends with ``"x"`` at the result.

    The step ``t`` starts at ``step`` (default ``1 / ||g||``), grows by 10%
    every iteration and halves until the gradient step from the extrapolated
    point ``y`` decreases the objective by ``t / 2 ||g(y)||^2``. When the
    momentum points uphill (``g(y) . (x_new - x) > 0``), it restarts.
    Usually two gradient passes per iteration: at the trial point and at the
    next extrapolated point.
    """
    if step is not None:
        check_range("step", step, 0.0, low_open=True)
    f_y, (gg,) = space.evaluate(dot("g", "g"))
    result = Result(objective=f_y, evaluations=1)
    space.ops(copy("xk", "x"), copy("yk", "x"))
    t = step if step is not None else 1.0 / max(math.sqrt(gg), 1e-12)
    theta = 1.0
    if math.sqrt(gg) <= stop.gtol:
        result.converged, result.reason = True, "gradient norm within gtol at the start"
        return result
    while result.iterations < stop.max_iterations:
        space.ops(copy("gy", "g"))
        t *= 1.1
        while True:
            space.ops(copy("x", "yk"), axpy("x", -t, "gy"))
            f_x, (g_x, g_xk, gg_x) = space.evaluate(dot("gy", "x"), dot("gy", "xk"), dot("g", "g"))
            result.evaluations += 1
            if f_x <= f_y - 0.5 * t * gg or t < 1e-20:
                break
            t *= 0.5
        result.iterations += 1
        if g_x - g_xk > 0:  # the momentum took us uphill: restart from the new point
            theta, beta = 1.0, 0.0
        else:
            following = (1.0 + math.sqrt(1.0 + 4.0 * theta * theta)) / 2.0
            theta, beta = following, (theta - 1.0) / following
        if _descent(result, result.objective, f_x, gg_x, stop, callback):
            space.ops(copy("xk", "x"))
            break
        if beta == 0.0:  # y = x: its gradient is already in g
            space.ops(copy("yk", "x"), copy("xk", "x"))
            f_y, gg = f_x, gg_x
            continue
        space.ops(copy("yk", "x"), scale("yk", 1.0 + beta), axpy("yk", -beta, "xk"), copy("xk", "x"),
                  copy("x", "yk"))
        f_y, (gg,) = space.evaluate(dot("g", "g"))
        result.evaluations += 1
    return result


def cg_beta(kind: str, gg: float, gg_old: float, g_g0: float, d_g: float, d_g0: float) -> float:
    """Fletcher–Reeves' or Hestenes–Stiefel's beta from dot products, clipped at 0 (Powell).

    ``gg = g.g``, ``gg_old = g0.g0``, ``g_g0 = g.g0``, ``d_g = d.g``, ``d_g0 = d.g0``
    (``g0`` the previous gradient, ``d`` the previous direction).

    Example:
        >>> cg_beta("fr", 1.0, 4.0, 0.0, 0.0, -4.0)
        0.25
    """
    if kind == "fr":
        value = gg / gg_old if gg_old > 0 else 0.0
    elif kind == "hs":
        denominator = d_g - d_g0
        value = (gg - g_g0) / denominator if denominator != 0 else 0.0
    else:
        choose("beta", kind, BETAS)
    return max(value, 0.0)


def cg(space: Space, *, beta: str = "fr", stop: Stopping = Stopping(), callback: Callback | None = None) -> Result:
    """Minimize with nonlinear conjugate gradients; ends with ``"x"`` at the result.

    ``d = -g + beta d_prev``, restarted from steepest descent when beta turns
    negative, when successive gradients are far from orthogonal
    (``|g.g0| >= 0.2 g.g``, Powell) or when ``d`` is not a descent direction.
    The line search meets the strong Wolfe conditions with ``c2 = 0.1`` and
    refines its step, as conjugacy needs nearly exact steps.
    """
    choose("beta", beta, BETAS)
    f, (gg,) = space.evaluate(dot("g", "g"))
    result = Result(objective=f, evaluations=1)
    if math.sqrt(gg) <= stop.gtol:
        result.converged, result.reason = True, "gradient norm within gtol at the start"
        return result
    (slope,) = space.ops(copy("d", "g"), scale("d", -1.0), dot("g", "d"))
    t = min(1.0, 1.0 / math.sqrt(gg))
    while result.iterations < stop.max_iterations:
        space.ops(copy("x0", "x"), copy("g0", "g"))
        point, evals = _search(space, Point(0.0, f, _NO_GRAD, slope), t, c2=0.1, refine=True)
        result.evaluations += evals
        result.iterations += 1
        gg_old = gg
        gg, g_g0, d_g, d_g0 = space.ops(dot("g", "g"), dot("g", "g0"), dot("d", "g"), dot("d", "g0"))
        done = _descent(result, f, point.loss, gg, stop, callback)
        f = point.loss
        if done:
            break
        b = 0.0 if abs(g_g0) >= 0.2 * gg else cg_beta(beta, gg, gg_old, g_g0, d_g, d_g0)
        previous = slope
        (slope,) = space.ops(scale("d", b), axpy("d", -1.0, "g"), dot("g", "d"))
        if slope >= 0:
            (slope,) = space.ops(copy("d", "g"), scale("d", -1.0), dot("g", "d"))
        # The next first trial: the step that would change the objective as much as the last (N&W 3.60).
        t = point.t * previous / slope
    return result


def minimize(method: str, space: Space, *, memory: int = 10, beta: str = "fr", step: float | None = None,
             stop: Stopping = Stopping(), callback: Callback | None = None) -> Result:
    """Run batch method ``method`` (``"lbfgs"``, ``"agd"`` or ``"cg"``) on ``space``."""
    choose("method", method, METHODS)
    if method == "lbfgs":
        return lbfgs(space, memory=memory, stop=stop, callback=callback)
    if method == "agd":
        return agd(space, step=step, stop=stop, callback=callback)
    return cg(space, beta=beta, stop=stop, callback=callback)

"""Nonlinear conjugate gradients as a ``torch.optim.Optimizer``.

Fletcher & Reeves, "Function minimization by conjugate gradients", The
Computer Journal 7(2), 1964; Hestenes & Stiefel, "Methods of conjugate
gradients for solving linear systems", J. Res. NBS 49(6), 1952. The line
search and the restart rules follow Nocedal & Wright, "Numerical
Optimization", 2nd ed., sections 3.5 and 5.2.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

from downpour.errors import check_range, choose
from downpour.optim.line_search import Point, strong_wolfe

BETAS = ("fr", "hs")
LINE_SEARCHES = ("strong_wolfe", None)


def conjugate_direction(
    grad: torch.Tensor, prev_grad: torch.Tensor, prev_direction: torch.Tensor, beta: str
) -> torch.Tensor:
    """Return ``-grad + max(beta, 0) * prev_direction``, or ``-grad`` if that is not a descent direction.

    Args:
        grad: gradient at the current point.
        prev_grad: gradient at the previous point.
        prev_direction: the previous search direction.
        beta: "fr" (Fletcher–Reeves, ``g.g / g_prev.g_prev``) or "hs"
            (Hestenes–Stiefel, ``g.y / d_prev.y`` with ``y = g - g_prev``).

    Example:
        >>> g, g_prev, d_prev = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.0, -2.0])
        >>> conjugate_direction(g, g_prev, d_prev, "fr").tolist()
        [-1.0, -0.5]
    """
    if beta == "fr":
        value = grad.dot(grad) / prev_grad.dot(prev_grad)
    elif beta == "hs":
        change = grad - prev_grad
        denominator = prev_direction.dot(change)
        value = grad.dot(change) / denominator if denominator != 0 else grad.new_zeros(())
    else:
        choose("beta", beta, BETAS)
    # Clipping at 0 restarts from steepest descent when the formula turns negative
    # (Powell's rule); it keeps HS from cycling and is a no-op for FR.
    direction = grad.neg().add_(prev_direction, alpha=max(float(value), 0.0))
    # An inexact line search can leave a non-descent direction; steepest descent always is one.
    return direction if grad.dot(direction) < 0 else grad.neg()


class ConjugateGradient(Optimizer):
    """Nonlinear conjugate gradients with Fletcher–Reeves or Hestenes–Stiefel ``beta``.

    Each iteration moves along ``d = -g + beta * d_prev``. ``beta`` is clipped
    at 0, which restarts from steepest descent whenever the formula turns
    negative (Powell's rule); a direction that is not a descent direction also
    restarts, and so does every ``restart_every``-th iteration. Like
    :class:`torch.optim.LBFGS`, :meth:`step` takes a closure that zeroes the
    gradients, re-evaluates the loss, calls ``backward`` and returns the loss;
    one call runs up to ``max_iter`` iterations, and the search direction
    carries over from one call to the next. All parameters form one group.

    Args:
        params: parameters to optimize.
        lr: scale of the first trial step of the line search (as in LBFGS);
            the fixed step length when ``line_search`` is None.
        beta: "fr" (Fletcher–Reeves) or "hs" (Hestenes–Stiefel).
        max_iter: iterations per :meth:`step`.
        max_eval: closure evaluations per :meth:`step`; default ``3 * max_iter``, as the
            line search usually evaluates twice per iteration.
        tolerance_grad: stop when the largest gradient entry is at most this.
        tolerance_change: stop when the step or the change of the loss is below this.
        restart_every: restart from steepest descent every this many iterations
            (None: only on Powell's rule).
        line_search: "strong_wolfe" or None (fixed step ``lr``).
        c1: sufficient-decrease constant of the Wolfe conditions.
        c2: curvature constant; below 0.5 so Fletcher–Reeves directions stay
            descent directions (Nocedal & Wright, lemma 5.6).

    Example:
        >>> x = torch.zeros(2, requires_grad=True)
        >>> opt = ConjugateGradient([x], beta="hs")
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (x - torch.tensor([1.0, -2.0])).pow(2).sum()
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> x.detach().round().tolist()
        [1.0, -2.0]
    """

    # Training loops give a closure to optimizers that re-evaluate the loss (see strategies.base.sgd_step).
    requires_closure = True

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1.0,
        beta: str = "fr",
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        restart_every: int | None = None,
        line_search: str | None = "strong_wolfe",
        c1: float = 1e-4,
        c2: float = 0.1,
    ) -> None:
        check_range("lr", lr, 0.0, low_open=True)
        choose("beta", beta, BETAS)
        check_range("max_iter", max_iter, 1)
        max_eval = 3 * max_iter if max_eval is None else max_eval
        check_range("max_eval", max_eval, 1)
        check_range("tolerance_grad", tolerance_grad, 0.0)
        check_range("tolerance_change", tolerance_change, 0.0)
        if restart_every is not None:
            check_range("restart_every", restart_every, 1)
        if line_search not in LINE_SEARCHES:
            raise ValueError(
                f"unknown line_search {line_search!r}; choose one of: strong_wolfe, None"
            )
        check_range("c1", c1, 0.0, 1.0, low_open=True)
        check_range("c2", c2, c1, 1.0, low_open=True)
        defaults = {
            "lr": lr, "beta": beta, "max_iter": max_iter, "max_eval": max_eval,
            "tolerance_grad": tolerance_grad, "tolerance_change": tolerance_change,
            "restart_every": restart_every, "line_search": line_search, "c1": c1, "c2": c2,
        }  # fmt: skip
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(
                "ConjugateGradient takes one parameter group; pass a flat list of parameters"
            )
        self._params = self.param_groups[0]["params"]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:  # type: ignore[override]
        """Run up to ``max_iter`` CG iterations; return the loss before the first one.

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward`` and returns it.
        """
        if closure is None:
            raise ValueError(
                "ConjugateGradient.step needs a closure that re-evaluates loss and gradient"
            )
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        # Keep the state on the first parameter, as LBFGS does, so state_dict() carries it.
        state = self.state[self._params[0]]
        state.setdefault("n_iter", 0)
        state.setdefault("func_evals", 0)

        loss = orig_loss = float(closure())
        evals = 1
        grad = self._gather_flat_grad()
        if grad.abs().max() <= group["tolerance_grad"]:
            state["func_evals"] += evals
            return orig_loss

        for iteration in range(1, group["max_iter"] + 1):
            state["n_iter"] += 1
            direction = self._direction(grad, state, group)
            gtd = float(grad.dot(direction))
            if gtd > -group["tolerance_change"]:
                break
            t = self._initial_step(grad, gtd, state, group)
            prev_loss = loss
            if group["line_search"] == "strong_wolfe":
                start = [p.clone(memory_format=torch.contiguous_format) for p in self._params]
                evaluate = functools.partial(self._directional_evaluate, closure, start, direction)
                point, ls_evals = strong_wolfe(
                    evaluate, Point(0.0, loss, grad, gtd), t,
                    c1=group["c1"], c2=group["c2"], tolerance_change=group["tolerance_change"],
                    direction_norm=float(direction.abs().max()),
                    max_evals=25, refine=True,
                )  # fmt: skip
                loss, new_grad, t = point.loss, point.grad, point.t
                self._add_grad(t, direction)
            else:
                self._add_grad(t, direction)
                new_grad, ls_evals = grad, 0
                # As in LBFGS: re-evaluating after the last iteration would be wasted work.
                if iteration != group["max_iter"]:
                    loss = float(closure())
                    new_grad, ls_evals = self._gather_flat_grad(), 1
            evals += ls_evals
            state.update(prev_grad=grad, direction=direction, step_size=t, gtd=gtd)
            grad = new_grad
            if evals >= group["max_eval"] or grad.abs().max() <= group["tolerance_grad"]:
                break
            if direction.abs().max() * t <= group["tolerance_change"]:
                break
            if abs(loss - prev_loss) < group["tolerance_change"]:
                break
        state["func_evals"] += evals
        return orig_loss

    def _direction(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        previous = state.get("direction")
        restart_every = group["restart_every"]
        if previous is None or (restart_every and (state["n_iter"] - 1) % restart_every == 0):
            return grad.neg()
        return conjugate_direction(grad, state["prev_grad"], previous, group["beta"])

    def _initial_step(self, grad: torch.Tensor, gtd: float, state: dict, group: dict) -> float:
        if group["line_search"] is None:
            return group["lr"]
        if state.get("step_size", 0.0) > 0:
            # Nocedal & Wright (3.60): expect the same first-order decrease as last time.
            guess = state["step_size"] * state["gtd"] / gtd
            if 0 < guess < float("inf"):
                return guess
        # LBFGS's first guess (also after a failed search): a step of at most lr in L1 norm.
        return min(1.0, 1.0 / float(grad.abs().sum())) * group["lr"]

    def _gather_flat_grad(self) -> torch.Tensor:
        views = []
        for p in self._params:
            if p.grad is None:
                views.append(p.new_zeros(p.numel()))
            elif p.grad.is_sparse:
                raise ValueError("ConjugateGradient does not support sparse gradients")
            else:
                views.append(p.grad.reshape(-1))
        return torch.cat(views)

    def _add_grad(self, step_size: float, update: torch.Tensor) -> None:
        offset = 0
        for p in self._params:
            numel = p.numel()
            p.add_(update[offset : offset + numel].view_as(p), alpha=step_size)
            offset += numel

    def _directional_evaluate(
        self, closure, x: list[torch.Tensor], d: torch.Tensor, t: float
    ) -> Point:
        self._add_grad(t, d)
        loss = float(closure())
        grad = self._gather_flat_grad()
        for p, start in zip(self._params, x):
            p.copy_(start)
        return Point(t, loss, grad, float(grad.dot(d)))

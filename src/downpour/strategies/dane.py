"""``dane``: DANE, the Distributed Approximate NEwton-type method.

Shamir, Srebro & Zhang, "Communication-Efficient Distributed Optimization
using an Approximate Newton-type Method", ICML 2014.

DANE is a batch method. The objective is the regularized empirical risk over
the whole training set,

    φ(w) = (1/N) Σ_j loss(w; x_j, y_j) + R(w) + λ/2 ||w||²,

where R is the model's own ``regularization()`` (if it has one) and λ is
``l2``, applied to the whole flat vector (biases too). Worker i's part φ_i is
the same over its own shard of n_i examples, so that φ = Σ_i n_i φ_i / N.
Every round t, from w_{t-1} (the same on every worker):

1. each worker computes φ_i(w_{t-1}) and ∇φ_i(w_{t-1}) on its whole shard;
   one allreduce gives every worker ∇φ(w_{t-1}) (and φ(w_{t-1}), logged as
   ``train/loss``);
2. each worker approximately solves its local problem

       w_i = argmin_w φ_i(w) − (∇φ_i(w_{t-1}) − η ∇φ(w_{t-1}))ᵀ w + μ/2 ||w − w_{t-1}||²

   with ``local_steps`` iterations of L-BFGS (on the whole shard) or of SGD
   (on the whole shard, or on mini-batches of ``local_batch_size``);
3. a second allreduce averages the w_i into w_t, weighted by n_i (the plain
   average of the paper when the shards are equal, as ``iid`` makes them to
   within one example).

Why this subproblem: its gradient at w_{t-1} is η ∇φ(w_{t-1}), so it is the
global problem seen through the local curvature. On a quadratic with local
Hessians H_i its exact solution is w_{t-1} − η (H_i + μI)⁻¹ ∇φ(w_{t-1}), and
the round is w_t = w_{t-1} − η · mean_i (H_i + μI)⁻¹ ∇φ(w_{t-1}): a Newton
step with the average of the local inverse Hessians standing in for the
global one (:func:`quadratic_round` computes it). With one worker, η = 1,
μ = 0 and an exact solve, one round lands on the optimum. μ > 0 damps the
step (as μ grows it tends to gradient descent with step η/μ), which
non-quadratic losses may need: on the tests' logistic regression μ = 0
oscillates and μ = 1e-3 descends every round. η scales the step.

Communication: two allreduces of the model-sized vector per round, each one
``comm/rounds`` (and one push and one pull), so the summary's ``rounds`` is
twice the DANE rounds; a worker's step is one DANE round, so the summary's
``steps`` is W times them. The local solver's iterations and the loss and
gradient evaluations it made are the ``dane/local_steps`` and
``dane/evaluations`` counters; ``worker/samples`` counts every example any
evaluation touched. The job's optimizer is not used: DANE brings its own
local solver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, ClassVar, Literal

import torch

from downpour.data import batches
from downpour.data.partition import SCHEMES
from downpour.errors import check_range, choose
from downpour.models import backward
from downpour.strategies.base import Job, Strategy, refuse_inexact
from downpour.strategies.collective import (
    BACKENDS,
    Backend,
    CollectivePlan,
    CollectiveWorker,
)
from downpour.strategies.worker import worker_stream

#: ``objective(w) -> (value, gradient)`` over a flat parameter vector; the gradient is a new tensor.
Objective = Callable[[torch.Tensor], tuple[float, torch.Tensor]]

LOCAL_SOLVERS: tuple[str, ...] = ("sgd", "lbfgs")


def subproblem(local: Objective, anchor: torch.Tensor, shift: torch.Tensor, mu: float) -> Objective:
    """DANE's local problem ``φ_i(w) − shiftᵀ w + μ/2 ||w − anchor||²`` from ``local`` = φ_i.

    ``shift`` is ``∇φ_i(anchor) − η ∇φ(anchor)``, which makes the problem's
    gradient at ``anchor`` equal to ``η ∇φ(anchor)``.

    Example:
        >>> local = lambda w: (float(w.dot(w)) / 2, w.clone())  # φ_i(w) = ||w||²/2
        >>> anchor = torch.tensor([1.0, 2.0])
        >>> value, grad = subproblem(local, anchor, anchor - 0.5 * anchor, 1.0)(anchor)
        >>> grad.tolist()  # η ∇φ(anchor) with η = 0.5
        [0.5, 1.0]
    """

    def objective(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, grad = local(w)
        offset = w - anchor
        value += -float(shift.dot(w)) + 0.5 * mu * float(offset.dot(offset))
        return value, grad.sub(shift).add_(offset, alpha=mu)

    return objective


def solve_sgd(objective: Objective, start: torch.Tensor, *, steps: int, lr: float) -> tuple[torch.Tensor, int]:
    """``steps`` steps of (stochastic) gradient descent on ``objective`` from ``start``.

    Returns the solution (a new vector) and the iterations made. Each call of ``objective`` is one step's gradient: the whole shard's, or a
    mini-batch's when the caller draws one per call.

    Example:
        >>> quadratic = lambda w: (float(w.dot(w)) / 2, w.clone())
        >>> solve_sgd(quadratic, torch.tensor([4.0]), steps=2, lr=0.5)[0].tolist()
        [1.0]
    """
    w = start.detach().clone()
    for _ in range(steps):
        _, grad = objective(w)
        w.sub_(grad, alpha=lr)
    return w, steps


def solve_lbfgs(objective: Objective, start: torch.Tensor, *, steps: int, memory: int = 10,
                max_evals: int | None = None) -> tuple[torch.Tensor, int]:
    """At most ``steps`` L-BFGS iterations (strong Wolfe line search) on ``objective`` from ``start``.

    Returns the solution (a new vector) and the iterations made. It stops
    earlier once the gradient or the progress vanishes (to within float32
    precision), so a large ``steps`` is an exact solve. ``torch.optim.LBFGS``
    runs on a detached copy, so ``objective`` is free to load each trial
    point into a model of its own.

    Example:
        >>> quadratic = lambda w: (float((w - 3).dot(w - 3)), 2 * (w - 3))
        >>> solve_lbfgs(quadratic, torch.zeros(2), steps=10)[0].tolist()
        [3.0, 3.0]
    """
    w = start.detach().clone()
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, max_eval=max_evals or 2 * steps + 5,
                                  history_size=memory, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        value, grad = objective(w.detach())
        w.grad = grad
        return torch.tensor(value, dtype=torch.float64)

    optimizer.step(closure)
    return w.detach(), int(optimizer.state[w].get("n_iter", 0))


def quadratic_round(hessians: Sequence[torch.Tensor], weights: Sequence[float], global_grad: torch.Tensor,
                    w: torch.Tensor, *, eta: float, mu: float) -> torch.Tensor:
    """DANE's round with exact local solves on quadratics: ``w − η Σ_i p_i (H_i + μI)⁻¹ ∇φ(w)``.

    ``p_i`` are the normalized ``weights`` (the workers' example counts).
    The reference the tests hold the strategy to; it is the paper's
    closed form of a DANE round on quadratic objectives.

    Example:
        >>> h = [torch.eye(2) * 2, torch.eye(2) * 4]
        >>> quadratic_round(h, [1, 1], torch.tensor([4.0, 0.0]), torch.zeros(2), eta=1.0, mu=0.0).tolist()
        [-1.5, 0.0]
    """
    total = float(sum(weights))
    eye = torch.eye(w.numel(), dtype=global_grad.dtype, device=global_grad.device)
    step = sum(weight / total * torch.linalg.solve(h + mu * eye, global_grad)
               for h, weight in zip(hessians, weights))
    return w - eta * step


@dataclass(kw_only=True)
class DaneWorker(CollectiveWorker):
    """Rounds of: allreduce the gradient, solve the local DANE problem, allreduce the solutions."""

    config: Dane
    eval_every: int = 1

    def prepare(self) -> None:
        """Hold the shard on the device and warm up before the start signal.

        No job optimizer to build: the local solver is DANE's own. The first
        backward pass and the first L-BFGS step a process makes import and
        initialize much of torch (seconds on a busy machine); done here they
        are start-up, not the first round, and keep no worker waiting in it.
        """
        self.local_steps = self.evaluations = 0
        device = self.flat.params.device
        self.x, self.y = self.job.data.x_train.to(device), self.job.data.y_train.to(device)
        self.weight = float(self.job.data.num_train)
        if self.config.local_batch_size is not None:
            self.batches = worker_stream(replace(self.job, batch_size=self.config.local_batch_size),
                                         self.rank, self.num_workers)
        x, y = next(batches(self.job.data.x_train, self.job.data.y_train, 1, shuffle=False))
        start = self.flat.params.detach().clone()
        solve_lbfgs(lambda w: self.shard_objective(w, x, y), start, steps=1)
        self.flat.params.copy_(start)
        self.flat.zero_grad_()
        self.local_steps = self.evaluations = self.samples = 0

    def shard_objective(self, w: torch.Tensor, x: torch.Tensor | None = None,
                        y: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """φ_i on the whole shard (or on the batch ``x, y``): value and a new gradient vector."""
        x, y = (self.x, self.y) if x is None else (x.to(self.x.device), y.to(self.y.device))
        if w.data_ptr() != self.flat.params.data_ptr():
            self.flat.params.copy_(w)
        self.flat.zero_grad_()
        value = float(backward(self.model, self.job.loss, x, y))
        grad = self.flat.sync_grads_().clone()
        l2 = self.config.l2
        if l2:
            value += 0.5 * l2 * float(w.dot(w))
            grad.add_(w, alpha=l2)
        self.evaluations += 1
        self.samples += len(y)
        return value, grad

    def minibatch_objective(self, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        """φ_i estimated on the next mini-batch of the worker's shard (for local SGD)."""
        return self.shard_objective(w, *next(self.batches))

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        config, n = self.config, self.flat.numel
        next_eval = self.eval_every
        round_started: float | None = None
        while self.steps < self.total_steps:
            round_started = self._stall(round_started)
            anchor = self.flat.params.detach().clone()
            value, local_grad = self.shard_objective(anchor)
            # One allreduce: the weighted gradients, objective values, weights and stop votes.
            buffer = torch.empty(n + 3, dtype=torch.float32, device=anchor.device)
            torch.mul(local_grad, self.weight, out=buffer[:n])
            buffer[n], buffer[n + 1] = value * self.weight, self.weight
            buffer[n + 2] = 1.0 if ctx.should_stop() else 0.0
            self.allreduce_(buffer)
            self.count_round()
            total = float(buffer[n + 1])
            global_grad = buffer[:n].div_(total)
            objective, grad_norm = float(buffer[n]) / total, float(global_grad.norm())
            if self.steps % self.log_every == 0:
                self.report(loss=objective)
                ctx.metrics.log(self.steps, {"dane/grad_norm": grad_norm})
            # Every worker holds the same sums, so all stop at the same round.
            if buffer[n + 2] > 0 or grad_norm <= config.gtol:
                break
            solution = self.solve_local(anchor, local_grad.sub_(global_grad, alpha=config.eta))
            # Second allreduce: the weighted average of the local solutions.
            solution.mul_(self.weight)
            self.allreduce_(solution)
            self.count_round()
            self.flat.params.copy_(solution.div_(total))
            self.steps += 1
            if self.rank == 0 and self.steps >= next_eval and self.steps < self.total_steps:
                self.snapshot()
                next_eval = self.steps + self.eval_every
        if self.rank == 0:
            self.snapshot(final=True)

    def solve_local(self, anchor: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The local DANE problem's approximate solution from ``anchor`` (a new vector)."""
        config = self.config
        if config.local == "lbfgs":
            problem = subproblem(self.shard_objective, anchor, shift, config.mu)
            solution, steps = solve_lbfgs(problem, anchor, steps=config.local_steps,
                                          memory=config.memory)
        else:
            local = self.shard_objective if config.local_batch_size is None else self.minibatch_objective
            problem = subproblem(local, anchor, shift, config.mu)
            solution, steps = solve_sgd(problem, anchor, steps=config.local_steps, lr=config.local_lr)
        self.local_steps += steps
        return solution

    def _stall(self, round_started: float | None) -> float:
        """A worker staged as slow (factor F) sleeps F − 1 times its previous round: a slow machine."""
        now = time.perf_counter()
        if self.slow_factor > 1 and round_started is not None:
            time.sleep((self.slow_factor - 1) * (now - round_started))
            now = time.perf_counter()
        return now

    def counters(self) -> dict[str, Any]:
        """The collective counters, and the local solver's iterations and evaluations so far."""
        return super().counters() | {"dane/local_steps": getattr(self, "local_steps", 0),
                                     "dane/evaluations": getattr(self, "evaluations", 0),
                                     "batch/iterations": self.steps}


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Dane(Strategy):
    """DANE's configuration (Shamir, Srebro & Zhang, ICML 2014).

    The run is ``num_rounds`` DANE rounds (capped by the job's ``max_steps``: a
    worker's step is a round), fewer if the global gradient's norm falls to
    ``gtol`` or the job's target or time budget stops it. The job's
    ``epochs``, ``batch_size`` and optimizer do not apply.

    Args:
        num_rounds: DANE rounds, two allreduces of the model each.
        local: the local solver, ``"lbfgs"`` (full batch, with a strong Wolfe
            line search) or ``"sgd"``.
        local_steps: iterations of the local solver per round (L-BFGS may stop
            sooner when the local problem is solved to float32 precision).
        mu: μ ≥ 0, the proximal weight that keeps the local solution near the
            round's start; 0 suits quadratics, μ > 0 damps the step, which
            other losses may need.
        eta: η > 0, the weight of the global gradient in the local problem
            (it scales the step; 1 is the paper's choice).
        local_lr: the local SGD step size (``local="sgd"`` only; the job's
            optimizer and its ``lr`` are not used).
        local_batch_size: mini-batches of this many examples for local SGD;
            None: the whole shard every step (gradient descent).
        memory: L-BFGS's curvature pairs (``local="lbfgs"`` only).
        l2: λ ≥ 0, adds λ/2 ||w||² (the whole flat vector) to every φ_i.
        gtol: stop once the global gradient's norm is at most this; 0: never.
        partition: how the training set is split among workers.
        alpha: Dirichlet concentration for ``partition="dirichlet"``.
        backend: ``"auto"``, ``"gloo"`` or ``"nccl"``.
        log_every: rounds between a worker's progress events (objective, gradient norm).

    Example:
        >>> Dane(num_rounds=10, local="lbfgs", local_steps=50, mu=1e-3, l2=1e-2).eta
        1.0
    """

    name: ClassVar[str] = "dane"
    buffers: ClassVar[str] = "refused: a model with buffers is an error naming the buffer"
    in_memory: ClassVar[str] = "each worker solves its local problem over its whole shard's tensors"
    ignores: ClassVar[dict[str, str]] = {
        "optimizer": "DANE brings its own local solver: use {local}, {local_steps} and {local_lr}",
        "epochs": "DANE runs rounds over every worker's whole shard: use {num_rounds}",
        "batch_size": "a round uses the whole shard (local SGD: batches of {local_batch_size})"}
    num_rounds: int = 10
    local: Literal["sgd", "lbfgs"] = "lbfgs"
    local_steps: int = 50
    mu: float = 0.0
    eta: float = 1.0
    local_lr: float = 0.1
    local_batch_size: int | None = None
    memory: int = 10
    l2: float = 0.0
    gtol: float = 0.0
    partition: Literal["iid", "label", "dirichlet"] = "iid"
    alpha: float = 0.5
    backend: Backend = "auto"
    log_every: int = 1

    def __post_init__(self) -> None:
        for name in ("num_rounds", "local_steps", "memory", "log_every"):
            _check_int(name, getattr(self, name))
        check_range("num_rounds", self.num_rounds, 1)
        choose("local solver", self.local, LOCAL_SOLVERS)
        check_range("local_steps", self.local_steps, 1)
        check_range("mu", self.mu, 0.0)
        check_range("eta", self.eta, 0.0, low_open=True)
        check_range("local_lr", self.local_lr, 0.0, low_open=True)
        if self.local_batch_size is not None:
            _check_int("local_batch_size", self.local_batch_size)
            check_range("local_batch_size", self.local_batch_size, 1)
            if self.local != "sgd":
                raise ValueError(f"local_batch_size is for local='sgd'; L-BFGS solves on the whole shard, so "
                                 f"drop local_batch_size={self.local_batch_size} or use local='sgd'")
        check_range("memory", self.memory, 1)
        check_range("l2", self.l2, 0.0)
        check_range("gtol", self.gtol, 0.0)
        choose("partition", self.partition, SCHEMES)
        check_range("alpha", self.alpha, 0.0, low_open=True)
        choose("backend", self.backend, BACKENDS)
        check_range("log_every", self.log_every, 1)

    def plan(self, job: Job) -> CollectivePlan:
        refuse_inexact(job, self.name, "its local solvers and its exact gradient pass treat the loss as a fixed "
                       "function of the parameters, which running statistics are not")
        if self.local_batch_size is not None:
            smallest = job.data.num_train // job.workers
            if self.local_batch_size > smallest:
                raise ValueError(f"local_batch_size={self.local_batch_size} exceeds a worker's shard (about "
                                 f"{smallest} examples); use at most {smallest}, or None for the whole shard")
        rounds = self.num_rounds if job.max_steps is None else min(self.num_rounds, job.max_steps)
        partition: dict[str, Any] = {"scheme": self.partition}
        if self.partition == "dirichlet":
            partition["alpha"] = self.alpha
        worker = partial(DaneWorker, config=self, total_steps=rounds, log_every=self.log_every,
                         eval_every=job.eval_interval(rounds))
        return CollectivePlan(job, make_worker=worker, global_steps=rounds * job.workers, backend=self.backend,
                              partition=partition)

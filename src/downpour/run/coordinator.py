"""The one Coordinator: it runs every strategy's plan the same way.

A strategy's :class:`~downpour.strategies.plan.Plan` says which roles the run
needs and how the model is read; everything else is done here, once, for
every strategy: opening the cluster, starting servers and then workers
together, staged faults, restarts, evaluation of the model that is returned
(in ``eval()`` mode), the start and end events, divergence, and the time
and throughput accounting.

How time is measured, for every strategy alike: training starts at the
``start`` event, once every role has started and met, and ends when the
last worker is done (or the plan's driver returns). Evaluations that ran
while workers trained (every multi-process plan) take nothing off that
time; only where training runs in the coordinator's own thread
(``Plan.inline``, the single process) did evaluating stop it, and there its
time is subtracted. ``samples_per_second`` is samples over that time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from downpour.cluster import open_cluster
from downpour.errors import DataError
from downpour.metrics import Metrics
from downpour.metrics.summary import degenerate
from downpour.models.evaluate import Target, Task, evaluate_data
from downpour.strategies import STRATEGIES, Job, Strategy
from downpour.strategies.plan import Plan, Progress
from downpour.strategies.worker import Worker

log = logging.getLogger("downpour.run")

# A training loss this many times the first one reported means the run blew up.
EXPLODED_FACTOR = 1e3


@dataclass(frozen=True, kw_only=True)
class Scoring:
    """How the coordinator scores the model: the task, a target over its scores, a test subset.

    Attributes:
        task: what the model predicts and which scores an evaluation reports.
        target: stop once an evaluation meets it (beside the job's ``target_accuracy``).
        samples: evaluate on a seeded subset of this many test examples (None: all).
    """

    task: Task = field(default_factory=Task)
    target: Target | None = None
    samples: int | None = None


def refuse_streamed(strategy: Strategy, data: Any) -> None:
    """Refuse a streamed dataset for a strategy that needs the training set in memory.

    Example:
        >>> refuse_streamed(dp.Sandblaster(), streamed)  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: strategy 'sandblaster' needs the training set in memory ...
    """
    if getattr(data, "streamed", False) and strategy.in_memory:
        takes = sorted(name for name, cls in STRATEGIES.items() if not cls.in_memory)
        raise ValueError(
            f"strategy {strategy.name!r} needs the training set in memory ({strategy.in_memory}); "
            f"{data.name!r} is a streamed dataset. Load it into memory (a downpour.data.Dataset "
            "of tensors, or dp.data.load(..., stream=False) for an image folder), or choose a "
            f"strategy that reads streamed data: {', '.join(takes)}")


class Evaluator:
    """Evaluates the coordinator's model on the test set; watches the targets and time budget."""

    def __init__(self, job: Job, metrics: Metrics, scoring: Scoring | None = None) -> None:
        self.job = job
        self.metrics = metrics
        self.scoring = scoring or Scoring()
        self.seconds = 0.0  # time spent evaluating
        self.reached = False
        self.last: dict[str, float] = {}
        self._started = time.monotonic()

    def begin(self) -> None:
        """Training starts now: the time budget counts from here."""
        self._started = time.monotonic()

    @property
    def out_of_time(self) -> bool:
        """Whether the job's ``max_seconds`` budget is spent."""
        budget = self.job.max_seconds
        return budget is not None and time.monotonic() - self._started >= budget

    def preflight(self, model: nn.Module, samples: int = 16) -> None:
        """Score the untrained model on a few test examples, so that a model whose outputs do not
        fit the task (one output for ten classes, say) is named before any process starts, not
        at the first evaluation, after the training it would have wasted."""
        task = replace(self.scoring.task, metric=None)  # a user's metric needs them all
        try:
            evaluate_data(model, self.job.loss, self.job.data, task=task, samples=samples,
                          seed=self.job.seed)
        except DataError as error:
            raise DataError(f"{error} (checked on {samples} test examples, before training; "
                            f"the task is {task.kind!r})") from None

    def __call__(self, model: nn.Module, step: int, **extra: Any) -> dict[str, float]:
        started = time.perf_counter()
        scoring = self.scoring
        result = evaluate_data(model, self.job.loss, self.job.data, task=scoring.task,
                               samples=scoring.samples, seed=self.job.seed)
        name = scoring.target.name if scoring.target is not None else scoring.task.primary(result)
        key = f"eval/{name}" if f"eval/{name}" in result else f"eval/user/{name}"
        if key in result:
            result = {**result, "eval/metric": result[key], "eval/metric_name": name}
        self.last = result
        self.seconds += time.perf_counter() - started
        target = self.job.target_accuracy
        if target is not None and result.get("eval/accuracy", -1.0) >= target:
            self.reached = True
        if scoring.target is not None and scoring.target.met(result):
            self.reached = True
        if self.reached:
            result = {**result, "eval/target_reached": True}
        self.metrics.log(step, {**result, **extra})
        return result


class Divergence:
    """A sink that notices a run whose loss became non-finite or exploded.

    The first training loss any worker reports is the reference; a loss
    that is NaN or infinite, or :data:`EXPLODED_FACTOR` times that reference,
    marks the run as diverged (once).
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.reason: str | None = None

    def write(self, event: dict[str, Any]) -> None:
        if self.reason is not None:
            return
        if event.get("worker/non_finite_update"):
            self.reason = f"worker {event.get('rank')} sent a non-finite update at step {event.get('step', '?')}"
            return
        for key in ("train/loss", "eval/loss", "batch/objective"):
            value = event.get(key)
            if not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                self.reason = f"{key} became {value} at step {event.get('step', '?')}"
            elif key == "train/loss":
                if self.first is None:
                    self.first = abs(value)
                elif self.first > 0 and abs(value) > EXPLODED_FACTOR * max(self.first, 1e-3):
                    self.reason = (f"train/loss exploded to {value:.4g} at step {event.get('step', '?')} "
                                   f"(first reported {self.first:.4g})")

    def close(self) -> None:
        pass


@dataclass
class _Session:
    """What a plan sees of the run (:class:`downpour.strategies.plan.Session`)."""

    job: Job
    metrics: Metrics
    progress: Progress
    coordinator: Coordinator
    cluster: Any = None
    host: str = "127.0.0.1"
    workers: list[Any] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def poll(self, timeout: float = 0.05) -> None:
        if self.cluster is not None:
            self.cluster.poll(timeout)

    def start(self, roles: list[Any]) -> list[Any]:
        return self.cluster.start(roles)

    def wait_published(self, handle: Any, key: str, timeout: float) -> Any:
        return self.cluster.wait_published(handle, key, timeout=timeout)

    def request_stop(self) -> None:
        if self.cluster is not None:
            self.cluster.request_stop()

    def should_stop(self) -> bool:
        return self.coordinator.should_stop()

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        return self.coordinator.evaluate(model, step)


class Coordinator:
    """Runs ``strategy``'s plan for ``job``, logging through ``metrics``; returns the trained model.

    Example:
        >>> model = Coordinator(job, metrics).run(dp.Downpour())  # doctest: +SKIP
    """

    def __init__(self, job: Job, metrics: Metrics, *, timeout: float = 60.0,
                 scoring: Scoring | None = None) -> None:
        self.job, self.metrics, self.timeout = job, metrics, timeout
        self.evaluator = Evaluator(job, metrics, scoring)
        self.progress = Progress()
        self.divergence = Divergence()
        self.reached_state: dict[str, torch.Tensor] | None = None
        self._diverged_logged = False

    # ------------------------------------------------------------ evaluation
    def should_stop(self) -> bool:
        """Whether training should stop: target reached, time budget spent, or the run diverged."""
        self._note_divergence()
        return self.evaluator.reached or self.evaluator.out_of_time or self.divergence.reason is not None

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Evaluate ``model``; the first evaluation that reaches the target keeps that model's state."""
        was_reached = self.evaluator.reached
        result = self.evaluator(model, step)
        if self.evaluator.reached and not was_reached:
            # The run returns the model that reached the target, not a later one.
            self.reached_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return result

    def _note_divergence(self) -> None:
        if self.divergence.reason is not None and not self._diverged_logged:
            self._diverged_logged = True
            log.warning("the run diverged: %s; stopping. Lower the learning rate (or the staleness).",
                        self.divergence.reason)
            self.metrics.log(self.progress.total_steps, {"event": "diverged",
                                                         "run/diverged_reason": self.divergence.reason})

    # ------------------------------------------------------------------ run
    def run(self, strategy: Strategy) -> nn.Module:
        refuse_streamed(strategy, self.job.data)
        plan = strategy.plan(self.job)
        model = plan.model()
        self.evaluator.preflight(model)
        self.metrics.sinks.extend([self.progress, self.divergence])
        try:
            if plan.inline:
                return self._run_inline(plan, model)
            return self._run_cluster(plan, model)
        finally:
            self.metrics.sinks.remove(self.progress)
            self.metrics.sinks.remove(self.divergence)

    def _run_inline(self, plan: Plan, model: nn.Module) -> nn.Module:
        session = _Session(self.job, self.metrics, self.progress, self)
        plan.open(session)
        try:
            self._start(plan)
            started = time.perf_counter()
            extra = plan.drive(session) or {}
            seconds = time.perf_counter() - started
            # Its evaluations ran in the training thread: they stopped training, so they are taken
            # off (the final one, after training, is not in ``seconds`` at all).
            stopped = self.evaluator.seconds
            plan.read(session, model, final=True)
            self._final_evaluation(model)
        finally:
            plan.close(session)
        self._end(plan, session, model, wall=seconds, train=seconds - stopped, extra=extra)
        return plan.result(model)

    def _run_cluster(self, plan: Plan, model: nn.Module) -> nn.Module:
        job, metrics, progress = self.job, self.metrics, self.progress
        with open_cluster(job.cluster, metrics, tolerate_worker_deaths=plan.tolerate_worker_deaths) as cluster:
            session = _Session(job, metrics, progress, self, cluster=cluster,
                               host=getattr(cluster, "host", "127.0.0.1"))
            plan.open(session)
            try:
                session.servers = cluster.start(plan.servers(session))
                session.addresses = [cluster.wait_published(h, "address", timeout=10 * self.timeout)
                                     for h in session.servers]
                plan.serving(session)
                session.workers = cluster.start([
                    stage_faults(job, plan.worker(session, rank, start_steps=progress.steps.get(rank, 0),
                                                  start_samples=progress.samples.get(rank, 0)), rank)
                    for rank in range(plan.num_workers())])
                cluster.on_death = _Deaths(plan, session)
                cluster.start_together(session.workers, timeout=10 * self.timeout)
                self._start(plan)
                started = time.perf_counter()
                self._stage_faults(cluster, session)
                extra: dict[str, Any] = {}
                interrupted = False
                try:
                    if plan.driven:
                        extra = plan.drive(session) or {}
                        cluster.request_stop()
                    else:
                        cluster.wait_all("worker", timeout=24 * 3600, watch=self._watcher(plan, session, model))
                except KeyboardInterrupt:
                    # Stop cleanly so the run can be resumed: workers finish their step and report,
                    # then the servers write their final checkpoints as they end. A second Ctrl-C aborts.
                    interrupted = True
                    log.warning("interrupted: stopping workers, then checkpointing the servers")
                    cluster.request_stop()
                cluster.wait_all("worker", timeout=self.timeout)
                seconds = time.perf_counter() - started
                if not interrupted:
                    self._final_read(plan, session, model)
                cluster.end()
                cluster.wait_all("server", timeout=self.timeout)
                plan.checkpoint(session, finished=not interrupted)
            finally:
                plan.close(session)
        if interrupted:
            # This attempt's training time, so that a resumed run's summary covers every attempt.
            self.metrics.log(self.progress.total_steps, {
                "event": "interrupted", "run/steps": self.progress.total_steps,
                "run/samples": self.progress.total_samples, "run/seconds": seconds,
                "run/train_seconds": seconds, "run/eval_seconds": self.evaluator.seconds})
            raise KeyboardInterrupt
        self._end(plan, session, model, wall=seconds, train=seconds, extra=extra)
        return plan.result(model)

    def _start(self, plan: Plan) -> None:
        """The mark that training begins (after processes started and met).

        Times to target, the time budget and time axes count from here, so
        process start-up is not charged to a strategy.
        """
        self.evaluator.begin()
        self.metrics.log(0, {"event": "start", "progress/total": plan.global_steps or None,
                             "progress/unit": plan.unit})

    def _stage_faults(self, cluster: Any, session: _Session) -> None:
        faults = self.job.faults
        for rank, seconds in faults.kill.items():
            cluster.kill_at(session.workers[rank], self.metrics.elapsed() + seconds)
        for shard, seconds in faults.kill_server.items():
            cluster.kill_at(session.servers[shard], self.metrics.elapsed() + seconds)

    def _watcher(self, plan: Plan, session: _Session, model: nn.Module):
        interval = self.job.eval_interval(plan.global_steps)
        next_eval = self.progress.total_steps + interval

        def watch() -> None:
            nonlocal next_eval
            plan.watch(session)
            if self.should_stop():
                session.request_stop()
            if self.evaluator.reached or self.divergence.reason is not None:
                return
            steps = self.progress.total_steps
            if not (plan.snapshots or steps >= next_eval) or not plan.read(session, model, final=False):
                return
            self.evaluate(model, steps)
            next_eval = steps + interval
            self.metrics.log(steps, {"progress/step": steps})
            plan.checkpoint(session, finished=False)
            if self.evaluator.reached:
                session.request_stop()

        return watch

    def _final_read(self, plan: Plan, session: _Session, model: nn.Module) -> None:
        if self.reached_state is None and not plan.read(session, model, final=True):
            raise RuntimeError("the run ended without a model to return: no worker published its final "
                               "parameters")
        self._final_evaluation(model)

    def _final_evaluation(self, model: nn.Module) -> None:
        if self.reached_state is not None:
            # The model that reached the target is the one returned; its evaluation is the run's last.
            model.load_state_dict(self.reached_state)
            return
        self.evaluate(model, self.progress.total_steps)

    def _end(self, plan: Plan, session: _Session, model: nn.Module, *, wall: float, train: float,
             extra: dict[str, Any]) -> None:
        extra = {**extra, **plan.finish(session, model)}
        self._note_divergence()
        last = self.evaluator.last
        if degenerate(last):
            log.warning("the model scores %.4f, which predicting the majority class alone would score "
                        "(%.4f of the test set; it predicts %d class(es)): it has learnt nothing beyond the "
                        "class shares. Train longer, raise the learning rate, or weight the classes.",
                        last["eval/accuracy"], last["eval/majority_share"], last["eval/predicted_classes"])
        if extra.get("batch/converged") is False:
            log.warning("%s did not converge: it %s; raise its max_iterations or loosen gtol/ftol.",
                        type(plan).__name__.removesuffix("Plan").lower(), extra.get("batch/stop_reason"))
        steps = extra.pop("run/steps", self.progress.total_steps)
        samples = extra.pop("run/samples", self.progress.total_samples)
        self.metrics.log(steps, {
            "event": "end",
            "run/steps": steps,
            "run/samples": samples,
            "run/seconds": wall,
            "run/train_seconds": max(train, 1e-9),
            "run/eval_seconds": self.evaluator.seconds,
            "run/diverged": self.divergence.reason is not None,
            "progress/step": steps,
            **extra,
        })


def stage_faults(job: Job, role: Any, rank: int, *, incarnation: int = 0) -> Any:
    """Give worker ``rank``'s role the faults staged for it: a slowdown, and a kill at a step.

    A kill at a step lands on the first incarnation only: its replacement is the recovery.
    """
    if isinstance(role, Worker):
        role.slow_factor = job.faults.slow.get(rank, 1.0)
        role.kill_at_step = job.faults.kill_at_step.get(rank) if incarnation == 0 else None
    return role


class _Deaths:
    """What the coordinator does when a role dies: the plan's own restart (a shard), else a worker's.

    Called by the cluster's poll with the dead role's handle; returns whether
    it restarted it (else the cluster treats the death as it does: a dead
    server ends the run; a dead worker ends it or is left behind, as the plan says).
    """

    def __init__(self, plan: Plan, session: _Session) -> None:
        self.plan, self.session = plan, session
        self.incarnations: dict[int, int] = {}

    def __call__(self, handle: Any) -> bool:
        if self.plan.on_death(self.session, handle):
            return True
        job, cluster = self.session.job, self.session.cluster
        if handle.kind != "worker" or not job.restart_workers or cluster.ended:
            return False
        started = time.perf_counter()
        rank = handle.rank
        incarnation = self.incarnations[rank] = self.incarnations.get(rank, 0) + 1
        self.plan.before_restart(self.session, rank)
        progress = self.session.progress
        role = stage_faults(job, self.plan.worker(self.session, rank, incarnation=incarnation,
                                                  start_steps=progress.steps.get(rank, 0),
                                                  start_samples=progress.samples.get(rank, 0)), rank,
                            incarnation=incarnation)
        [self.session.workers[rank]] = cluster.start([role])
        log.warning("worker %d restarted (incarnation %d) at step %d", rank, incarnation,
                    progress.steps.get(rank, 0))
        self.session.metrics.log(progress.total_steps, {
            "fault/restarted": f"worker:{rank}", "fault/incarnation": incarnation,
            "fault/restart_seconds": time.perf_counter() - started})
        return True

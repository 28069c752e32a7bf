"""``single``: single-process mini-batch SGD, the baseline every strategy is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from downpour.data import epoch
from downpour.errors import check_range
from downpour.strategies.base import Job, Strategy, sgd_step
from downpour.strategies.plan import Plan, Session


@dataclass(frozen=True, kw_only=True)
class Single(Strategy):
    """Plain mini-batch SGD in this process, with the job's optimizer and schedule.

    Example:
        >>> strategy = Single(log_every=20)
    """

    name: ClassVar[str] = "single"
    takes_workers: ClassVar[bool] = False
    buffers: ClassVar[str] = "the model's own"
    ignores: ClassVar[dict[str, str]] = dict.fromkeys(
        ("faults.slow", "faults.kill", "faults.kill_at_step"),
        "it trains in this process: there is no worker to slow down or kill")
    log_every: int = 10

    def __post_init__(self) -> None:
        check_range("log_every", self.log_every, 1)

    def plan(self, job: Job) -> SinglePlan:
        return SinglePlan(job, log_every=self.log_every)


class SinglePlan(Plan):
    """Training in the coordinator's own thread: the model it trains is the one it evaluates."""

    inline = True

    def __init__(self, job: Job, *, log_every: int) -> None:
        super().__init__(job)
        self.log_every = log_every
        self.global_steps = job.total_steps()

    def build_model(self) -> nn.Module:
        return self.job.build_model()

    def drive(self, session: Session) -> dict[str, Any]:
        # Subnormal floats make late-training steps several times slower on
        # CPUs; flush them while training, and leave the process as it was.
        torch.set_flush_denormal(True)
        try:
            return self._train(session)
        finally:
            torch.set_flush_denormal(False)

    def _train(self, session: Session) -> dict[str, Any]:
        job, metrics, model = self.job, session.metrics, self.flat.module
        optimizer = job.optimizer.build(model.parameters())
        total = self.global_steps
        scheduler = job.optimizer.build_scheduler(optimizer, total)
        interval = job.eval_interval(total)
        generator = torch.Generator().manual_seed(job.seed)

        step, samples, window_samples = 0, 0, 0
        window_start = time.perf_counter()
        model.train()
        while step < total and not session.should_stop():
            for x, y in epoch(job.data, job.batch_size, generator=generator):
                loss = sgd_step(model, self.flat.zero_grad_, optimizer, job.loss, x.to(job.device),
                                y.to(job.device))
                scheduler.step()
                step += 1
                samples += len(y)
                window_samples += len(y)
                if step % self.log_every == 0:
                    now = time.perf_counter()
                    metrics.log(step, {
                        "train/loss": loss,
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/samples_per_second": window_samples / max(now - window_start, 1e-9),
                        "progress/step": step,
                        "progress/samples": samples,
                    })
                    window_start, window_samples = now, 0
                if (step % interval == 0 or step == total) and step < total:
                    session.evaluate(model, step)
                    window_start = time.perf_counter()
                if step >= total or session.should_stop():
                    break
        return {"run/steps": step, "run/samples": samples}

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        return True  # the coordinator's model is the one trained

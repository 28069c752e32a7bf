"""``single``: single-process mini-batch SGD, the baseline every strategy is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from downpour.data import batches
from downpour.flat import FlatParams
from downpour.metrics import Metrics
from downpour.strategies.base import Evaluator, Job, log_end, log_start, sgd_step


@dataclass(frozen=True, kw_only=True)
class Single:
    """Plain mini-batch SGD in this process, with the job's optimizer and schedule.

    Example:
        >>> strategy = Single(log_every=20)
    """

    name: ClassVar[str] = "single"
    log_every: int = 10

    def run(self, job: Job, metrics: Metrics) -> nn.Module:
        # Subnormal floats make late-training steps several times slower on
        # CPUs; flush them while training, and leave the process as it was.
        torch.set_flush_denormal(True)
        try:
            return self._train(job, metrics)
        finally:
            torch.set_flush_denormal(False)

    def _train(self, job: Job, metrics: Metrics) -> nn.Module:
        model = job.build_model()
        flat = FlatParams(model)
        optimizer = job.optimizer.build(model.parameters())
        total = job.total_steps()
        scheduler = job.optimizer.build_scheduler(optimizer, total)
        evaluator = Evaluator(job, metrics)
        interval = job.eval_interval(total)
        generator = torch.Generator().manual_seed(job.seed)

        step, samples, window_samples = 0, 0, 0
        log_start(metrics, evaluator)
        started = window_start = time.perf_counter()
        model.train()
        while step < total and not evaluator.done():
            for x, y in batches(job.data.x_train, job.data.y_train, job.batch_size, generator=generator):
                loss = sgd_step(model, flat.zero_grad_, optimizer, job.loss, x.to(job.device), y.to(job.device))
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
                    })
                    window_start, window_samples = now, 0
                if step % interval == 0 or step == total:
                    evaluator(model, step)
                    window_start = time.perf_counter()
                if step >= total or evaluator.done():
                    break
        log_end(metrics, steps=step, samples=samples, seconds=time.perf_counter() - started,
                eval_seconds=evaluator.seconds)
        return model

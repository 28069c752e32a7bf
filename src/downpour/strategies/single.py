"""``single``: single-process mini-batch SGD, the baseline every strategy is measured against."""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from downpour.data import epoch
from downpour.errors import check_range, choose
from downpour.models.sparse_sgd import SparseSGD, check_csr, compact, gather_rows, warm_up
from downpour.strategies.base import Job, Strategy, sgd_step
from downpour.strategies.plan import Plan, Session
from downpour.strategies.sparse_linear import compiled_kernel, load_kernel_weights

# The compiled kernel's longest run between two looks at the stop signal.
_CHUNK_EXAMPLES = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Single(Strategy):
    """Plain mini-batch SGD in this process, with the job's optimizer and schedule.

    A linear model on sparse inputs trained by plain SGD at a constant rate
    runs on the compiled kernel (:mod:`downpour.models.sparse_sgd`): the same
    steps, on the same batches, without torch's dispatch per example.
    ``kernel="torch"`` keeps it on torch (to compare the two).

    ``average=n`` is averaged SGD (Polyak and Juditsky 1992; Bottou's ASGD;
    scikit-learn's ``average=n``): the model evaluated and returned is the mean
    of the iterates after every step from the one that brings the examples seen
    to n, parameters and floating buffers alike (torch's ``AveragedModel``; the
    compiled kernel keeps the same mean sparsely). 0 is plain SGD.

    ``shuffle`` is ``"epoch"`` (a new random order every epoch, as every
    strategy batches) or ``"once"``: one random order, drawn as the first
    epoch's, kept for every epoch (Bottou's sgd, which shuffles its data once;
    scikit-learn's ``shuffle=False`` on shuffled rows). On the compiled kernel
    the rows are then laid out in that order once, so every pass reads memory
    front to back instead of waiting on it at every row.

    Example:
        >>> strategy = Single(log_every=20, average=1000, shuffle="once")
    """

    name: ClassVar[str] = "single"
    takes_workers: ClassVar[bool] = False
    buffers: ClassVar[str] = "the model's own"
    ignores: ClassVar[dict[str, str]] = dict.fromkeys(
        ("faults.slow", "faults.kill", "faults.kill_at_step"),
        "it trains in this process: there is no worker to slow down or kill")
    log_every: int = 10
    kernel: Literal["auto", "torch"] = "auto"
    average: int = 0
    shuffle: Literal["epoch", "once"] = "epoch"

    def __post_init__(self) -> None:
        check_range("log_every", self.log_every, 1)
        choose("kernel", self.kernel, ("auto", "torch"))
        check_range("average", self.average, 0)
        choose("shuffle", self.shuffle, ("epoch", "once"))

    def plan(self, job: Job) -> SinglePlan:
        return SinglePlan(job, log_every=self.log_every, kernel=self.kernel, average=self.average,
                          shuffle=self.shuffle)


class SinglePlan(Plan):
    """Training in the coordinator's own thread: the model it trains is the one it evaluates."""

    inline = True

    def __init__(self, job: Job, *, log_every: int, kernel: str = "auto", average: int = 0,
                 shuffle: str = "epoch") -> None:
        super().__init__(job)
        self.log_every, self.kernel, self.average, self.shuffle = log_every, kernel, average, shuffle
        self.global_steps = job.total_steps()

    def build_model(self) -> nn.Module:
        return self.job.build_model()

    def open(self, session: Session) -> None:
        super().open(session)
        self.compiled = (compiled_kernel(self.job, self.flat.module, average=self.average)
                         if self.kernel == "auto" else None)
        if self.compiled is not None:
            warm_up(self.compiled)  # compiled (or loaded from numba's cache) before the clock starts

    def drive(self, session: Session) -> dict[str, Any]:
        # Subnormal floats make late-training steps several times slower on
        # CPUs; flush them while training, and leave the process as it was.
        torch.set_flush_denormal(True)
        try:
            if self.compiled is not None:
                return self._train_compiled(session, self.compiled)
            return self._train(session)
        finally:
            torch.set_flush_denormal(False)

    def _train(self, session: Session) -> dict[str, Any]:
        job, metrics, model = self.job, session.metrics, self.flat.module
        optimizer = job.optimizer.build_for(model)
        total = self.global_steps
        scheduler = job.optimizer.build_scheduler(optimizer, total)
        interval = job.eval_interval(total)
        generator = torch.Generator().manual_seed(job.seed)
        averaged = AveragedModel(model, use_buffers=True) if self.average else None

        step, samples, window_samples = 0, 0, 0
        window_start = time.perf_counter()
        model.train()
        while step < total and not session.should_stop():
            if self.shuffle == "once":  # every epoch in the first one's order
                generator = torch.Generator().manual_seed(job.seed)
            for x, y in epoch(job.data, job.batch_size, generator=generator):
                loss = sgd_step(model, self.flat.zero_grad_, optimizer, job.loss, x.to(job.device),
                                y.to(job.device))
                scheduler.step()
                step += 1
                samples += len(y)
                window_samples += len(y)
                if averaged is not None and samples >= self.average:
                    averaged.update_parameters(model)
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
                    session.evaluate(_predictor(model, averaged), step)
                    window_start = time.perf_counter()
                if step >= total or session.should_stop():
                    break
        if averaged is not None and averaged.n_averaged > 0:
            _load_average(averaged, model)
        return {"run/steps": step, "run/samples": samples, **_averaged(averaged)}

    def _train_compiled(self, session: Session, kernel: SparseSGD) -> dict[str, Any]:
        """The compiled kernel over the batches the torch loop would take, in chunks between
        evaluations (and at most :data:`_CHUNK_EXAMPLES` examples, so that a stop is heard)."""
        job, metrics, model = self.job, session.metrics, self.flat.module
        total, batch = self.global_steps, job.batch_size
        interval = job.eval_interval(total)
        generator = torch.Generator().manual_seed(job.seed)
        x = check_csr(job.data.x_train, kernel.num_features, "x_train")
        y = kernel.check_labels(job.data.y_train.numpy(), x.shape[0])
        n = x.shape[0]
        step = samples = 0
        order, position = None, n
        if self.shuffle == "once":  # the first epoch's order, laid out in memory: passes in order
            first = torch.randperm(n, generator=generator).numpy()
            x, y, order = gather_rows(x, first), y[first], np.arange(n, dtype=np.int64)
        else:
            x = compact(x)  # int32 indices (gather_rows makes them so too)
        chunk_steps = max(1, min(interval, _CHUNK_EXAMPLES // batch))
        with _Shuffles(n, generator, total, math.ceil(n / batch), self.shuffle == "epoch") as orders:
            while step < total and not session.should_stop():
                if position >= n:  # a new epoch, shuffled as data.batches shuffles it
                    order = orders.next(step) if self.shuffle == "epoch" else order
                    position = 0
                steps = min(chunk_steps, total - step, math.ceil((n - position) / batch))
                rows = order[position : position + steps * batch]
                started = time.perf_counter()
                loss = kernel.fit_epoch(x, y, rows, checked=True)
                seconds = time.perf_counter() - started
                position += len(rows)
                step += steps
                samples += len(rows)
                metrics.log(step, {
                    "train/loss": loss,  # the chunk's mean, before each example's step
                    "train/lr": job.optimizer.lr,
                    "train/samples_per_second": len(rows) / max(seconds, 1e-9),
                    "train/kernel": "compiled",
                    "progress/step": step,
                    "progress/samples": samples,
                })
                if (step % interval < steps or step == total) and step < total:
                    load_kernel_weights(kernel, model)
                    session.evaluate(model, step)
        load_kernel_weights(kernel, model)
        return {"run/steps": step, "run/samples": samples,
                **({"train/iterates_averaged": kernel.iterates_averaged} if kernel.average else {})}

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        return True  # the coordinator's model is the one trained


class _Shuffles:
    """The epochs' orders, each drawn from ``generator`` as the torch loop draws it, the next one
    on a thread of its own while the kernel runs the current one (the kernel and ``randperm``
    release the GIL): on w8a an epoch of the kernel takes ~3 ms and a ``randperm`` of its rows
    0.3-1.4 ms. Only orders that a later epoch will use are drawn. The thread outlives a run
    (:func:`_shuffler`): starting one cost 0.3-2 ms a run, a fifth of a 5-epoch run on w8a."""

    def __init__(self, n: int, generator: torch.Generator, total: int, epoch_steps: int,
                 enabled: bool) -> None:
        self._n, self._generator = n, generator
        self._total, self._epoch_steps = total, epoch_steps
        self._pool = _shuffler() if enabled else None
        self._upcoming = None if self._pool is None or total < 1 else self._pool.submit(self._draw)

    def _draw(self) -> np.ndarray:
        return torch.randperm(self._n, generator=self._generator).numpy()

    def next(self, step: int) -> np.ndarray:
        """The order of the epoch that starts at ``step``; the one after it starts drawing."""
        assert self._pool is not None and self._upcoming is not None
        order = self._upcoming.result()
        more = self._total - step > self._epoch_steps  # another epoch starts after this one
        self._upcoming = self._pool.submit(self._draw) if more else None
        return order

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        if self._upcoming is not None and not self._upcoming.cancel():
            self._upcoming.result()  # drawn by now or soon: the generator is ours again


_SHUFFLER: tuple[int, ThreadPoolExecutor] | None = None
_SHUFFLER_LOCK = threading.Lock()


def _shuffler() -> ThreadPoolExecutor:
    """The process's one shuffle thread, started on first use (again in a forked child, which
    inherits the executor but not its thread)."""
    global _SHUFFLER
    with _SHUFFLER_LOCK:
        if _SHUFFLER is None or _SHUFFLER[0] != os.getpid():
            _SHUFFLER = os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="downpour-shuffle")
        return _SHUFFLER[1]


def _predictor(model: nn.Module, averaged: AveragedModel | None) -> nn.Module:
    """The model to evaluate: the average of the iterates once it holds one."""
    if averaged is None or averaged.n_averaged == 0:
        return model
    return averaged.module


def _load_average(averaged: AveragedModel, model: nn.Module) -> None:
    """The average into ``model``: its parameters and floating buffers (an integer buffer, a
    count such as BatchNorm's ``num_batches_tracked``, keeps the model's own)."""
    with torch.no_grad():
        for mine, mean in zip(model.parameters(), averaged.module.parameters(), strict=True):
            mine.copy_(mean)
        for mine, mean in zip(model.buffers(), averaged.module.buffers(), strict=True):
            if mine.is_floating_point():
                mine.copy_(mean)


def _averaged(averaged: AveragedModel | None) -> dict[str, int]:
    return {} if averaged is None else {"train/iterates_averaged": int(averaged.n_averaged)}

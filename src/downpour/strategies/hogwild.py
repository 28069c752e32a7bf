"""``hogwild``: lock-free parallel SGD on one machine (Niu, Recht, Ré, Wright, "HOGWILD!: A Lock-Free
Approach to Parallelizing Stochastic Gradient Descent", NIPS 2011).

The coordinator puts the model's flat parameter vector in shared memory
(``Tensor.share_memory_()``) and hands it to W worker processes of one
thread each. Every worker reads the parameters, computes a gradient on its
own shard and writes the update straight into the shared vector, without a
lock: writes of different workers may interleave, and on sparse problems
they rarely touch the same coordinates. A linear model on sparse CSR inputs
(a sparse SVM or logistic regression on w8a, as in the paper) updates only
the coordinates of the batch's features (:mod:`downpour.strategies.sparse_linear`);
any other model takes its optimizer's dense step, each worker with its own
optimizer over the shared parameters, as PyTorch's ``mnist_hogwild`` does.
The learning-rate schedule follows the shared model's progress (all the
workers' updates, over W), not each worker's own count.

The paper's comparators are options: ``lock`` takes one lock around every
update, ``round_robin`` makes the workers write in turn, in rank order
(Langford, Smola, Zinkevich, "Slow learners are fast", NIPS 2009). Gradients
are computed in parallel in every mode; only the writes are serialized.

Hogwild is single-machine by construction: the parameters live in this
host's shared memory, so there is no host or address option, and a GPU
model (``device="cuda"``) is refused. Nothing goes over a wire (0 bytes);
``comm/rounds`` counts the updates written to the shared vector.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from downpour.errors import PeerTimeout, check_range, choose
from downpour.flat import FlatParams, apply_sparse_
from downpour.strategies.base import Job, Strategy
from downpour.strategies.collective import check_lockstep_optimizer
from downpour.models.sparse_sgd import SparseSGD, check_csr, compact, hogwild_threads, warm_up
from downpour.strategies.sparse_linear import (
    SparseLinearGradient,
    compiled_kernel,
    load_kernel_weights,
    supports_sparse_updates,
)
from downpour.strategies.plan import Plan, Session
from downpour.strategies.worker import Worker, shard_job

log = logging.getLogger(__name__)

Mode = Literal["hogwild", "lock", "round_robin"]

# How long a worker waiting for the lock or its turn sleeps between looks at the stop flag.
_WAIT_SLICE_SECONDS = 0.05


@dataclass
class UpdateGate:
    """Who may write the shared parameters when: anyone (``hogwild``), one at a
    time (``lock``), or each worker in turn in rank order (``round_robin``).

    Built by the coordinator from the spawn context and passed to the workers
    in their role (multiprocessing objects travel only while a process is
    spawned). ``holder`` is the rank holding the lock or the turn (-1: none),
    kept so the coordinator can free what a killed worker held (a worker
    killed between taking the lock and recording it leaves the others to
    time out with a PeerTimeout instead).

    Round robin: ``holder`` is the truth about whose turn it is; each rank's
    semaphore only wakes it up, so a stale wake-up is harmless. A worker
    leaves the ring (``retire``) while holding the turn, so the turn is never
    passed to a worker that has gone.

    Example:
        >>> gate = UpdateGate.create("lock", 2)
        >>> gate.enter(0, lambda: False, timeout=1.0), gate.holder.value
        (True, 0)
        >>> gate.leave(0)
    """

    mode: Mode
    num_workers: int
    lock: Any = None
    holder: Any = None
    active: Any = None
    wakeups: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, mode: Mode, num_workers: int) -> UpdateGate:
        context = multiprocessing.get_context("spawn")  # LocalCluster spawns its roles
        gate = cls(mode, num_workers, holder=context.RawValue("i", -1))
        if mode == "lock":
            gate.lock = context.Lock()
        elif mode == "round_robin":
            gate.holder.value = 0
            gate.active = context.RawArray("b", [1] * num_workers)
            # Semaphores, not a Condition: Condition.notify waits for every
            # sleeper to wake, and a SIGKILLed sleeper never does.
            gate.wakeups = [context.Semaphore(0) for _ in range(num_workers)]
        return gate

    def enter(self, rank: int, should_stop: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``rank`` may write; False if the run is stopping instead."""
        if self.mode == "hogwild":
            return True
        deadline = time.monotonic() + timeout
        if self.mode == "lock":
            while not self.lock.acquire(timeout=_WAIT_SLICE_SECONDS):
                if should_stop():
                    return False
                if time.monotonic() > deadline:
                    raise PeerTimeout(f"worker {self.holder.value}", timeout, "release the hogwild lock")
            self.holder.value = rank
            return True
        while self.holder.value != rank:
            self.wakeups[rank].acquire(timeout=_WAIT_SLICE_SECONDS)
            if should_stop():
                return False
            if time.monotonic() > deadline:
                raise PeerTimeout(f"worker {self.holder.value}", timeout, "pass the round-robin turn")
        return True

    def leave(self, rank: int) -> None:
        """``rank`` has written: release the lock or pass the turn on."""
        if self.mode == "lock":
            self.holder.value = -1
            self.lock.release()
        elif self.mode == "round_robin":
            self._pass_turn(rank)

    def retire(self, rank: int, should_stop: Callable[[], bool], timeout: float) -> None:
        """``rank`` takes no more turns (round robin); it leaves on its own turn."""
        if self.mode == "round_robin" and self.enter(rank, should_stop, timeout):
            self.active[rank] = 0
            self._pass_turn(rank)

    def free_dead_(self, rank: int) -> None:
        """The coordinator's cleanup after worker ``rank`` died: free what it held. Idempotent."""
        if self.mode == "lock" and self.holder.value == rank:
            self.holder.value = -1
            self.lock.release()  # a multiprocessing Lock may be released by any process
        elif self.mode == "round_robin":
            self.active[rank] = 0
            # Checked on every poll: a live worker may pass the turn to the
            # dead one just after the flag above was read.
            if self.holder.value == rank:
                self._pass_turn(rank)

    def _pass_turn(self, rank: int) -> None:
        for step in range(1, self.num_workers + 1):
            following = (rank + step) % self.num_workers
            if self.active[following]:
                self.holder.value = following
                self.wakeups[following].release()
                return
        self.holder.value = -1


def bind_shared_(flat: FlatParams, vector: torch.Tensor, buffers: list[torch.Tensor] = ()) -> None:
    """Make ``flat``'s module parameters views of ``vector`` (e.g. a shared one) instead of its own buffer,
    and its buffers (batch-norm statistics) the tensors ``buffers``, in ``module.buffers()`` order.

    Gradients stay in ``flat.grads``, private to the process.
    """
    if vector.numel() != flat.numel or vector.dtype != torch.float32:
        raise ValueError(f"expected a float32 vector of {flat.numel} elements, got {vector.dtype} {vector.numel()}")
    offset = 0
    for p in flat.parameters:
        p.data = vector[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    flat.params = vector
    for own, shared in zip(flat.module.buffers(), buffers, strict=True):
        own.data = shared


@dataclass(kw_only=True)
class HogwildWorker(Worker):
    """Compute a gradient on the shared parameters, write the update into them through the gate."""

    # The optimizer steps on each p.grad: autograd's fresh tensors cost no
    # zeroing and no accumulation into a flat buffer (a tenth of a small MLP's step).
    flat_gradients: ClassVar[bool] = False

    shared: torch.Tensor = field(repr=False)
    shared_buffers: list[torch.Tensor] = field(repr=False, default_factory=list)
    gate: UpdateGate = field(repr=False)
    steps_done: Any = field(repr=False)  # a shared array: every worker's step count, at its rank
    sparse: bool = False

    def connect(self) -> None:
        if not all(t.is_shared() for t in (self.shared, *self.shared_buffers)):
            raise RuntimeError("the shared parameters arrived as a private copy; hogwild needs shared memory")
        bind_shared_(self.flat, self.shared, self.shared_buffers)
        self.wait_seconds = 0.0
        self.optimizer = self.job.optimizer.build_for(self.model)
        self.scheduler = self.job.optimizer.build_scheduler(self.optimizer, self.total_steps)
        if self.sparse:
            self.sparse_gradient = SparseLinearGradient(self.flat, self.job.loss, self.job.data.x_train)

    def train(self, ctx: Any, stream: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in stream:
            if self.steps >= self.total_steps or ctx.should_stop():
                break
            if self.sparse:
                lr = self.optimizer.param_groups[0]["lr"]
                update = self._sparse_gradient(x, y, lr)
                written = self._write(partial(apply_sparse_, self.flat.params, update, alpha=-lr))
            else:
                self.gradient(x, y)
                written = self._write(self.optimizer.step)
            if not written:
                break
            self._follow_schedule()
        self.gate.retire(self.rank, ctx.should_stop, self.timeout)

    def _follow_schedule(self) -> None:
        """Move the learning-rate schedule to the shared model's progress: every worker's updates, over W.

        One shared model, one schedule: a worker the OS runs less than the
        others takes its lr from the updates the model has had, and does not
        write at a high lr after the others have annealed theirs.
        """
        self.steps_done[self.rank] = self.steps
        target = min(sum(self.steps_done) // self.num_workers, self.total_steps)
        if self.scheduler.last_epoch >= target:
            return
        with warnings.catch_warnings():
            # The sparse path's optimizer only carries the schedule's lr; it never steps.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            while self.scheduler.last_epoch < target:
                self.scheduler.step()

    def _sparse_gradient(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        # Worker.gradient's pacing and counting around a sparse step instead of autograd.
        self.pace()
        step = self.sparse_gradient(x, y, lr=lr)
        self.steps += 1
        self.samples += len(y)
        if self.steps % self.log_every == 0:
            self.report(loss=step.loss)
        return step.update

    def _write(self, apply: Callable[[], Any]) -> bool:
        if self.gate.mode == "hogwild":
            apply()
        else:
            waiting = time.perf_counter()
            if not self.gate.enter(self.rank, self.ctx.should_stop, self.timeout):
                return False
            self.wait_seconds += time.perf_counter() - waiting
            try:
                apply()
            finally:
                self.gate.leave(self.rank)
        # Shared memory: no bytes cross a wire; each update is one push, one round through memory.
        self.pushes += 1
        self.rounds += 1
        return True

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "hogwild/wait_seconds": getattr(self, "wait_seconds", 0.0)}


@dataclass(frozen=True, kw_only=True)
class Hogwild(Strategy):
    """Hogwild!'s configuration.

    Args:
        lock: take one lock around every update (the paper's locking comparator).
        round_robin: write updates in turn, in rank order (the paper's "RR").
        sparse_updates: ``"auto"`` writes only the touched coordinates when
            the model is linear, the inputs sparse CSR and the optimizer plain
            SGD; ``"on"`` requires that; ``"off"`` always takes dense steps.

        threads: ``"auto"`` runs the workers as threads of the coordinator over one weight
            matrix, the GIL released, when the compiled sparse kernel applies (a linear
            model on sparse data by plain SGD, no staged faults): the paper's setting, with
            no process to spawn and no copy of the data per worker. Processes otherwise
            (any other model; faults, which need a process to kill). ``"on"`` requires
            threads, ``"off"`` always uses processes.

    Example:
        >>> Hogwild(round_robin=True).mode
        'round_robin'
    """

    name: ClassVar[str] = "hogwild"
    buffers: ClassVar[str] = "in shared memory with the parameters, updated in place by every worker"
    lock: bool = False
    round_robin: bool = False
    sparse_updates: Literal["auto", "on", "off"] = "auto"
    threads: Literal["auto", "on", "off"] = "auto"
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.lock and self.round_robin:
            raise ValueError("lock and round_robin are alternative ways to serialize updates; "
                             "set at most one of them (got lock=True and round_robin=True)")
        if self.sparse_updates not in ("auto", "on", "off"):
            raise ValueError(f"sparse_updates must be 'auto', 'on' or 'off', got {self.sparse_updates!r}")
        choose("threads", self.threads, ("auto", "on", "off"))
        check_range("log_every", self.log_every, 1)

    @property
    def mode(self) -> Mode:
        return "lock" if self.lock else "round_robin" if self.round_robin else "hogwild"

    def plan(self, job: Job) -> HogwildPlan:
        if job.cluster is not None:
            raise ValueError("hogwild shares memory on one host; run it on the local cluster (cluster='local')")
        if torch.device(job.device).type != "cpu":
            raise ValueError(f"hogwild shares parameters through this host's shared memory and runs on the "
                             f"CPU only; got device={job.device!r}, use device='cpu'")
        check_lockstep_optimizer(job, self.name)
        if self.threads != "off":
            why_not = self._why_not_threads(job)
            if why_not is None:
                return HogwildThreadsPlan(job, self)
            if self.threads == "on":
                raise ValueError(f"threads='on' needs the compiled sparse kernel: {why_not}; "
                                 "use threads='auto' or 'off'")
        return HogwildPlan(job, self)

    def _why_not_threads(self, job: Job) -> str | None:
        """None where workers can be threads running the compiled kernel; else the reason."""
        if self.sparse_updates == "off":
            return "sparse_updates='off' asks for dense steps"
        if compiled_kernel(job, job.build_model()) is None:
            return ("it runs a linear model with its own loss on in-memory sparse CSR data, by plain "
                    "'sgd' at a constant rate, on the CPU")
        staged = [name for name in ("slow", "kill", "kill_at_step") if getattr(job.faults, name)]
        if staged:
            return f"staged faults ({', '.join(staged)}) need worker processes to slow down or kill"
        return None

    def _sparse(self, job: Job, model: nn.Module) -> bool:
        """Whether workers take sparse steps; a ValueError when ``"on"`` cannot be honoured."""
        if self.sparse_updates == "off":
            return False
        linear = supports_sparse_updates(model, job.data.sparse)
        spec = job.optimizer
        plain_sgd = spec.name == "sgd" and not any(
            spec.kwargs.get(key) for key in ("momentum", "weight_decay", "maximize"))
        if self.sparse_updates == "on" and not (linear and plain_sgd):
            raise ValueError(
                "sparse_updates='on' needs a linear model (svm, logistic, ...) on sparse CSR data and the plain "
                f"'sgd' optimizer; got {type(model).__name__} on {'sparse' if job.data.sparse else 'dense'} "
                f"data with optimizer {spec.name!r} {dict(spec.options)}; use sparse_updates='auto' or 'off'")
        if linear and not plain_sgd:
            log.info("hogwild takes dense steps: sparse updates need the plain 'sgd' optimizer, got %r", spec.name)
        return linear and plain_sgd


class HogwildPlan(Plan):
    """Hogwild's plan: the coordinator's model lives in shared memory, and the workers write into it.

    The coordinator evaluates exactly what the workers write, in place and
    without copies, and hands back a private copy at the end.
    """

    def __init__(self, job: Job, config: Hogwild) -> None:
        super().__init__(job)
        self.config = config
        self.gate = UpdateGate.create(config.mode, job.workers)
        self.steps_done = multiprocessing.get_context("spawn").RawArray("q", job.workers)
        self.per_worker = job.total_steps(job.data.num_train // job.workers)
        self.global_steps = self.per_worker * job.workers

    def build_model(self) -> nn.Module:
        model = self.job.build_model()
        self.sparse = self.config._sparse(self.job, model)
        return model

    def open(self, session: Session) -> None:
        # In place: the model's parameters are views of this storage, so the
        # coordinator evaluates exactly what the workers write, without copies.
        self.flat.params.share_memory_()
        # Buffers too (batch-norm statistics), as model.share_memory() would: the workers update them in place.
        self.shared_buffers = [b.share_memory_() for b in self.flat.module.buffers()]

    def worker(self, session: Session, rank: int, *, incarnation: int = 0, start_steps: int = 0,
               start_samples: int = 0) -> HogwildWorker:
        return HogwildWorker(rank=rank, num_workers=self.job.workers, job=shard_job(self.job, rank),
                             total_steps=self.per_worker, log_every=self.config.log_every,
                             shared=self.flat.params, shared_buffers=self.shared_buffers, gate=self.gate,
                             steps_done=self.steps_done, sparse=self.sparse, incarnation=incarnation,
                             start_steps=start_steps, start_samples=start_samples)

    def watch(self, session: Session) -> None:
        for handle in session.workers:
            if handle.failed:
                self.gate.free_dead_(handle.rank)

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        return True  # the shared parameters and buffers, read in place

    def result(self, model: nn.Module) -> nn.Module:
        # Hand back a model in private memory, not a view of the shared segment.
        trained = self.job.build_model()
        FlatParams(trained).load_(self.flat.params)
        for private, shared in zip(trained.buffers(), self.shared_buffers, strict=True):
            private.copy_(shared)
        return trained


# The most examples a thread trains between two looks at the stop signal.
_SEGMENT_EXAMPLES = 1 << 16


class HogwildThreadsPlan(Plan):
    """Hogwild! as the paper runs it: W threads over one weight matrix, no locks, sparse writes.

    Each thread runs the compiled kernel (:mod:`downpour.models.sparse_sgd`,
    the L2 term split over the features) on its own shard of the rows, with
    the GIL released, so the threads' writes race in shared memory. Training
    runs in segments between evaluations: every thread trains its part of the
    segment, then the coordinator evaluates the weights (training stopped, as
    for ``single``). ``lock`` and ``round_robin`` serialise each thread's
    writes, ``chunk`` examples at a time (1 by default, the paper's comparators).
    """

    inline = True

    def __init__(self, job: Job, config: Hogwild, *, chunk: int = 1) -> None:
        super().__init__(job)
        self.config, self.chunk = config, chunk
        self.per_worker = job.total_steps(job.data.num_train // job.workers)
        self.global_steps = self.per_worker * job.workers

    def build_model(self) -> nn.Module:
        return self.job.build_model()

    def open(self, session: Session) -> None:
        super().open(session)
        job = self.job
        base = compiled_kernel(job, self.flat.module)
        assert base is not None  # Hogwild.plan checked
        self.kernel = SparseSGD(base.loss, num_features=base.num_features,
                                num_classes=base.num_classes, lr=base.lr, l2=base.l2,
                                batch_size=job.batch_size, regularization="split",
                                bias_lr=base.bias_lr)
        weights, bias = base.coefficients()
        self.kernel.set_weights(weights, bias)
        warm_up(self.kernel)  # compiled before the clock starts

    def _prepare(self) -> None:
        """The run's input, checked, and its feature frequencies (the split L2's), on the clock
        as ``single``'s checks are: work that a run on this data does."""
        job = self.job
        self.x = compact(check_csr(job.data.x_train, self.kernel.num_features, "x_train"))
        self.y = self.kernel.check_labels(job.data.y_train.numpy(), self.x.shape[0])
        self.kernel.frequencies(self.x)

    def _orders(self) -> list[np.ndarray]:
        """Each thread's rows for the whole run: its shard, reshuffled every pass."""
        job, workers = self.job, self.job.workers
        rng = np.random.default_rng(job.seed)
        shards = np.array_split(rng.permutation(self.x.shape[0]), workers)
        wanted = self.per_worker * job.batch_size
        orders = []
        for shard in shards:
            passes = -(-wanted // max(len(shard), 1))
            orders.append(np.concatenate([rng.permutation(shard) for _ in range(passes)])[:wanted])
        return orders

    def drive(self, session: Session) -> dict[str, Any]:
        job, metrics, model = self.job, session.metrics, self.flat.module
        workers, batch = job.workers, job.batch_size
        self._prepare()
        orders = self._orders()
        interval = job.eval_interval(self.global_steps)  # global steps between evaluations
        segment = max(1, min(interval // workers, _SEGMENT_EXAMPLES // batch)) * batch
        done = [0] * workers  # examples each thread has trained
        updates = [0] * workers
        step = 0
        next_eval = interval
        while step < self.global_steps and not session.should_stop():
            parts = [order[d : d + segment] for order, d in zip(orders, done)]
            started = time.perf_counter()
            results = hogwild_threads(self.kernel, self.x, self.y, parts, mode=self.config.mode,
                                      chunk=self.chunk)
            seconds = time.perf_counter() - started
            examples = sum(len(part) for part in parts)
            for rank, (part, result) in enumerate(zip(parts, results)):
                done[rank] += len(part)
                updates[rank] += int(result["updates"])
            step = sum(-(-d // batch) for d in done)
            metrics.log(step, {
                "train/loss": sum(r["loss"] * len(p) for r, p in zip(results, parts)) / max(examples, 1),
                "train/lr": job.optimizer.lr,
                "train/samples_per_second": examples / max(seconds, 1e-9),
                "train/kernel": "compiled",
                "hogwild/threads": workers,
                "progress/step": step,
                "progress/samples": sum(done),
            })
            if step >= next_eval and step < self.global_steps:
                next_eval += interval
                load_kernel_weights(self.kernel, model)
                session.evaluate(model, step)
        load_kernel_weights(self.kernel, model)
        metrics.log(step, {"hogwild/thread_updates": updates, "hogwild/thread_samples": done,
                           "comm/rounds": sum(updates)})
        return {"run/steps": step, "run/samples": sum(done)}

    def read(self, session: Session, model: nn.Module, *, final: bool) -> bool:
        return True  # the kernel's weights are loaded into the model before every evaluation

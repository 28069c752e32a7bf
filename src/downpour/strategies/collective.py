"""What the collective strategies share: a process group per run, and workers that count its traffic.

``allreduce`` and ``local-sgd`` exchange the model through ``torch.distributed``
collectives (gloo on CPU, NCCL when every worker has a GPU of its own) instead
of a parameter server. The coordinator hosts the group's rendezvous (a
``TCPStore`` on its own address, which every worker reaches wherever it runs)
and hands each worker its rank and the world size; every
worker joins the group before the start signal and leaves it when it ends,
whatever happens. The group is kept on the worker and passed to every
collective explicitly.

Traffic is counted the same way for every collective, so that strategies
compare: an allreduce of n bytes among W workers is counted as a ring
allreduce, in which each rank sends (and receives) 2 (W - 1) / W * n bytes,
whatever algorithm the backend picks; an all-gather of n bytes per rank as a
ring all-gather, (W - 1) * n each way; a broadcast of n bytes as any spanning
tree, (W - 1) * n in all: every rank but the last sends n, every rank but
the root receives n.
"""

from __future__ import annotations

import datetime
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from downpour.errors import choose
from downpour.metrics import Metrics
from downpour.strategies.base import Job
from downpour.strategies.worker import Worker, WorkerGroupRun

Backend = Literal["auto", "gloo", "nccl"]
BACKENDS: tuple[str, ...] = ("auto", "gloo", "nccl")


def ring_allreduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends (and receives) in a ring allreduce of ``nbytes``: 2 (W - 1) / W * n.

    Example:
        >>> ring_allreduce_bytes(1000, 4)
        1500
    """
    return 2 * (world_size - 1) * nbytes // world_size


def resolve_backend(backend: str, device: str, workers: int) -> str:
    """The ``torch.distributed`` backend for ``workers`` ranks on ``device``.

    ``"auto"`` picks NCCL when the workers are on CUDA and each can have a GPU
    of its own (NCCL refuses two ranks on one GPU), else gloo, which also
    reduces CUDA tensors.

    Example:
        >>> resolve_backend("auto", "cpu", 4)
        'gloo'
    """
    choose("backend", backend, BACKENDS)
    on_gpu = torch.device(device).type == "cuda"
    if backend == "auto":
        return "nccl" if on_gpu and dist.is_nccl_available() and torch.cuda.device_count() >= workers else "gloo"
    if backend == "nccl":
        if not on_gpu:
            raise ValueError(f"backend 'nccl' needs workers on CUDA, got device={device!r}; use backend 'gloo'")
        if torch.cuda.device_count() < workers:
            raise ValueError(f"backend 'nccl' needs a GPU per worker: {workers} workers, "
                             f"{torch.cuda.device_count()} GPU(s); use fewer workers or backend 'gloo'")
    return backend


def check_lockstep_optimizer(job: Job, strategy: str) -> None:
    """Refuse optimizers that evaluate the loss a data-dependent number of times per step.

    Workers of a collective strategy run the same number of steps between
    collectives; L-BFGS-like optimizers (``step(closure)``) do not.
    """
    step = job.optimizer.build([torch.zeros(1, requires_grad=True)]).step
    # A step whose closure is required, not optional (L-BFGS, conjugate gradients).
    closure = inspect.signature(step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"strategy {strategy!r} cannot use optimizer {job.optimizer.name!r}, which re-evaluates "
                         "the loss within a step; choose sgd, momentum, nesterov, adagrad, rmsprop, adadelta or adam")


@dataclass(kw_only=True)
class CollectiveWorker(Worker):
    """A worker in a ``torch.distributed`` process group, with counted collectives.

    Counters: ``comm/bytes_sent`` and ``comm/bytes_received`` as the module
    docstring says; ``comm/rounds`` the exchanges of the model-sized vector
    (``comm/pushes`` and ``comm/pulls`` too: in each, a worker both sends its
    part and receives the result). Control messages of a few bytes (stop
    votes) count in bytes only.
    """

    store_address: str  # HOST:PORT of the coordinator's TCPStore, the group's rendezvous
    backend: str = "gloo"

    def connect(self) -> None:
        # The rendezvous waits for the slowest process to start, as long as the start barrier may.
        timeout = datetime.timedelta(seconds=10 * self.timeout)
        host, _, port = self.store_address.rpartition(":")
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        dist.init_process_group(self.backend, store=store, world_size=self.num_workers, rank=self.rank,
                                timeout=timeout)
        self.group = dist.group.WORLD
        # gloo reduces CUDA tensors but gathers only host ones; NCCL only device ones.
        self.comm_device = self.flat.params.device if self.backend == "nccl" else torch.device("cpu")
        self.prepare()

    def prepare(self) -> None:
        """Build the optimizer and its schedule over ``total_steps`` before the start signal.

        The first optimizer a process builds imports much of torch (seconds on
        a busy machine): start-up, not training, and it must not keep the
        other workers waiting in the first collective.
        """
        self.optimizer = self.job.optimizer.build(self.model.parameters())
        self.scheduler = self.job.optimizer.build_scheduler(self.optimizer, self.total_steps)

    def disconnect(self) -> None:
        if not dist.is_initialized():
            return
        vote = getattr(self, "_vote", None)
        try:
            if vote is not None:  # every worker cast it: let it land, leave nothing in flight
                vote[0].wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError:  # a peer is gone; the coordinator ends the run
            pass
        finally:
            dist.destroy_process_group(self.group)

    def count_round(self) -> None:
        """One exchange of the model-sized vector."""
        self.rounds += 1
        self.pushes += 1
        self.pulls += 1

    def count_allreduce(self, nbytes: int) -> None:
        moved = ring_allreduce_bytes(nbytes, self.num_workers)
        self.bytes_sent += moved
        self.bytes_received += moved

    def count_broadcast(self, nbytes: int, root: int = 0) -> None:
        self.bytes_sent += nbytes if self.rank != self.num_workers - 1 else 0
        self.bytes_received += nbytes if self.rank != root else 0

    def allreduce_(self, tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce ``tensor`` across the group in place (through the host under gloo) and count it."""
        buffer = tensor if tensor.device == self.comm_device else tensor.to(self.comm_device)
        dist.all_reduce(buffer, op=op, group=self.group)
        if buffer is not tensor:
            tensor.copy_(buffer)
        self.count_allreduce(tensor.numel() * tensor.element_size())
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor``, concatenated in rank order (on the host under gloo)."""
        buffer = tensor.detach().to(self.comm_device).contiguous()
        parts = [torch.empty_like(buffer) for _ in range(self.num_workers)]
        dist.all_gather(parts, buffer, group=self.group)
        nbytes = buffer.numel() * buffer.element_size()
        self.bytes_sent += (self.num_workers - 1) * nbytes
        self.bytes_received += (self.num_workers - 1) * nbytes
        return torch.cat(parts)

    def vote_to_stop(self, ctx: Any) -> bool:
        """Whether any worker was told to stop, as of the previous vote: all learn it at the same step.

        The vote is a 1-element allreduce (MAX) started now and read at the
        next vote, so it never holds up a step: a collective of its own would
        be one more point where every worker waits for the slowest to be
        scheduled. Every worker votes at the same steps, so none is left
        waiting in a collective when the others stop.
        """
        flag = torch.tensor([1.0 if ctx.should_stop() else 0.0], device=self.comm_device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.count_allreduce(flag.numel() * flag.element_size())
        previous, self._vote = getattr(self, "_vote", None), (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())

def _rank_device(device: str, rank: int) -> str:
    """Spread workers on ``cuda`` over the visible GPUs; keep an explicit index or the host as given."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


@dataclass(frozen=True, kw_only=True)
class CollectiveRun:
    """The coordinator of a collective strategy: a rendezvous, then a :class:`WorkerGroupRun`.

    It hosts the group's rendezvous (a ``TCPStore`` on this machine's address
    as the workers reach it) and gives every worker ``store_address``,
    ``backend``, its rank and the world size. A worker that dies ends the run
    (the others would wait in their next collective).

    Args:
        make_worker: builds worker ``rank``'s role from keyword arguments
            ``rank, num_workers, job, slow_factor, timeout, store_address, backend``.
        global_steps: steps of all workers together that make the run.
        backend: ``"auto"``, ``"gloo"`` or ``"nccl"``.
        replica: the workers' model factory when the coordinator's model is a
            different one built from the workers' (an ensemble of them).
        partition: keyword arguments for ``Dataset.shard`` (scheme, alpha...).
    """

    make_worker: Callable[..., CollectiveWorker]
    global_steps: int
    backend: str = "auto"
    replica: Callable[[], nn.Module] | None = None
    partition: dict[str, Any] = field(default_factory=dict)
    timeout: float = 60.0

    def run(self, job: Job, metrics: Metrics) -> nn.Module:
        backend = resolve_backend(self.backend, job.device, job.workers)
        host = getattr(job.cluster, "host", "127.0.0.1")  # this machine, as the workers reach it
        store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=10 * self.timeout))
        store_address = f"{host}:{store.port}"

        def make(*, rank: int, job: Job, **kwargs: Any) -> CollectiveWorker:
            job = replace(job, device=_rank_device(job.device, rank))
            if self.replica is not None:
                job = replace(job, model=self.replica)
            return self.make_worker(rank=rank, job=job, store_address=store_address, backend=backend, **kwargs)

        return WorkerGroupRun(make_worker=make, global_steps=self.global_steps, tolerate_deaths=False,
                              final_rank=0, partition=self.partition, timeout=self.timeout).run(job, metrics)


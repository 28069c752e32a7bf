"""What the collective strategies share: a process group per run, and workers that count its traffic.

``allreduce`` and ``local-sgd`` exchange the model through ``torch.distributed``
collectives (gloo on CPU, NCCL when every worker has a GPU of its own) instead
of a parameter server. The coordinator hosts the group's rendezvous (a
``TCPStore`` on its own address, which every worker reaches wherever it runs)
and hands each worker its rank and the world size; every
worker joins the group before the start signal and leaves it when it ends,
whatever happens. The group is kept on the worker and passed to every
collective explicitly.

With ``restart_workers`` (``allreduce`` and ``local-sgd``) the group is
elastic: it forms through TorchElastic's rendezvous
(:mod:`downpour.strategies.elastic`), and when a member dies the survivors
leave the broken group, the coordinator starts a replacement, and all of them
meet in the rendezvous' next round. The newly formed group then brings every
member to the most advanced member's state: the replacement (and a survivor
whose last collective failed where another's completed) takes its model,
optimizer, schedule and position, as one safetensors blob broadcast from it.

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
import gc
import inspect
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from downpour.checkpoint import pack_state, unpack_state
from downpour.errors import choose
from downpour.strategies.base import Job
from downpour.strategies.elastic import ElasticRendezvous, RendezvousClosedError
from downpour.strategies.plan import Session
from downpour.strategies.worker import Worker, WorkerGroupPlan, encode_params, worker_stream

log = logging.getLogger(__name__)

# How long a survivor whose collective failed waits to hear that the coordinator restarted a member.
RESTART_NOTICE_SECONDS = 10.0

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
    # With restart_workers: when a member dies, re-form the group with its replacement (module elastic).
    elastic: bool = False

    def connect(self) -> None:
        self.prepare()
        # The rendezvous waits for the slowest process to start, as long as the start barrier may.
        self._wait = datetime.timedelta(seconds=10 * self.timeout)
        host, _, port = self.store_address.rpartition(":")
        self.store = dist.TCPStore(host, int(port), is_master=False, timeout=self._wait)
        self.run_over = False
        if self.elastic:
            # A replacement waits for the survivors' next collective to fail, which local SGD may hold
            # off for the rest of the run (one-shot averaging): it waits as long as the coordinator does.
            wait = 10 * self.timeout if self.incarnation == 0 else 24 * 3600.0
            self.rendezvous = ElasticRendezvous(self.store, world_size=self.num_workers, host=self.ctx.host,
                                                timeout=wait)
            self.restarts_seen = _restarts(self.store)
            self.synced = self.incarnation == 0  # a replacement takes a survivor's state first
            self.regroups = 0
        self.join()

    def prepare(self) -> None:
        """Build the optimizer and its schedule over ``total_steps`` before the start signal.

        The first optimizer a process builds imports much of torch (seconds on
        a busy machine): start-up, not training, and it must not keep the
        other workers waiting in the first collective.
        """
        self.optimizer = self.job.optimizer.build_for(self.model)
        self.scheduler = self.job.optimizer.build_scheduler(self.optimizer, self.total_steps)

    def join(self) -> None:
        """Form the process group: the first time, or again after a member died (``elastic``).

        An elastic group meets through the rendezvous, whose round gives the
        store the group bootstraps on; then every member is brought to the
        most advanced member's state (:meth:`resync`). When the rendezvous
        was closed (the others finished), ``run_over`` is set instead.
        """
        store: dist.Store = self.store
        if self.elastic:
            try:
                store = self.rendezvous.next_round()
            except RendezvousClosedError:
                log.warning("worker %d: the other workers finished; nothing left to rejoin", self.rank)
                self.run_over = True
                return
        dist.init_process_group(self.backend, store=store, world_size=self.num_workers, rank=self.rank,
                                timeout=self._wait)
        self.group = dist.group.WORLD
        # gloo reduces CUDA tensors but gathers only host ones; NCCL only device ones.
        self.comm_device = self.flat.params.device if self.backend == "nccl" else torch.device("cpu")
        if self.elastic:
            self.resync()

    def leave(self, *, broken: bool = False) -> None:
        """Leave the process group (a ``broken`` one too), closing its connections.

        Nothing may keep the group alive after this: a member still blocked
        in a collective of a broken group learns that it broke only when
        this member's connections close.
        """
        vote, self._vote = getattr(self, "_vote", None), None
        group, self.group = getattr(self, "group", None), None
        if not dist.is_initialized():
            return
        try:
            if vote is not None and not broken:  # every worker cast it: let it land, leave nothing in flight
                vote[0].wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError:  # a peer is gone; the coordinator ends the run, or the group re-forms
            pass
        finally:
            del vote
            dist.destroy_process_group(group)
            del group
            if broken:
                gc.collect()  # wrappers around the group (DDP's reducer) may sit in reference cycles

    def disconnect(self) -> None:
        self.leave()
        if self.elastic and hasattr(self, "rendezvous"):
            self.rendezvous.close()

    # -------------------------------------------------------------- elastic
    def position(self) -> tuple[int, ...]:
        """Where this member is in the run, compared across members (the most advanced is the newest)."""
        return (self.steps,)

    def move_to(self, position: tuple[int, ...]) -> None:
        """Take ``position`` (a more advanced member's) as this member's own: its steps and data position."""
        (self.steps,) = position

    def elastic_tensors(self) -> dict[str, torch.Tensor]:
        """What a replacement takes from a survivor beside the model and the optimizer (a subclass's hook)."""
        return {}

    def load_elastic_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what :meth:`elastic_tensors` gave (a subclass's hook)."""

    @property
    def replica(self) -> nn.Module:
        """The model itself (``self.model`` may be a wrapper holding the group, such as DDP)."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def train_elastic(self, body: Callable[[], None]) -> None:
        """Run ``body``, a training loop that goes on from the worker's position; survive members' deaths.

        A collective that fails because a member died (the coordinator says
        it restarted one) leaves the broken group, re-forms it with the
        replacement through the rendezvous and runs ``body`` again from
        where the group now stands. Any other failure is raised.
        """
        while not self.run_over:
            try:
                body()
                return
            except RuntimeError:
                if not (self.elastic and self._member_restarted()):
                    raise
            # Out of the except block: its traceback holds the broken group, which must close its connections.
            self.regroup()

    def regroup(self) -> None:
        started = time.perf_counter()
        log.warning("worker %d: a member died; re-forming the group at step %d", self.rank, self.steps)
        self.leave(broken=True)
        self.join()
        self.regroups += 1
        self.ctx.metrics.log(self.steps, {"fault/regrouped": f"worker:{self.rank}",
                                          "fault/regroup_seconds": time.perf_counter() - started})

    def _member_restarted(self) -> bool:
        """Whether the coordinator restarted a member since this one joined (then that death broke the group).

        The coordinator notices a death within a fraction of a second of the
        survivors' failed collective; it is given ``RESTART_NOTICE_SECONDS``.
        """
        deadline = time.monotonic() + RESTART_NOTICE_SECONDS
        while True:
            restarts = _restarts(self.store)
            if restarts > self.restarts_seen:
                self.restarts_seen = restarts
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def resync(self) -> None:
        """Bring every member to the most advanced member's state; the lowest rank among them sends it.

        The members behind (a replacement; a survivor whose last collective
        failed where another's completed) take its model, optimizer and
        schedule state and its position, and set ``adopted``. The others keep
        their own state, which for local SGD is a model of its own.
        """
        mine = (*self.position(), int(self.synced))
        positions = [tuple(row) for row in
                     self.all_gather(torch.tensor(mine, dtype=torch.int64)).view(self.num_workers, -1).tolist()]
        front = max(positions)
        self.synced, self.adopted = True, False
        if all(position == front for position in positions):
            return
        source = positions.index(front)
        blob = self.broadcast_bytes(self.state_blob() if self.rank == source else b"", source)
        if mine != front:
            self.adopt(front[:-1], blob, source)

    def state_blob(self) -> bytes:
        """This member's model, optimizer and schedule, for the members behind it (safetensors, no pickle)."""
        tensors = {f"model.{name}": value.cpu() for name, value in self.replica.state_dict().items()}
        tensors |= {f"extra.{name}": value.cpu() for name, value in self.elastic_tensors().items()}
        return pack_state(tensors, {"scheduler": self.scheduler.state_dict()}, self.optimizer.state_dict())

    def adopt(self, position: tuple[int, ...], blob: bytes, source: int) -> None:
        tensors, header, optimizer = unpack_state(blob)
        self.replica.load_state_dict({name[6:]: value for name, value in tensors.items() if name.startswith("model.")})
        self.load_elastic_tensors({name[6:]: value for name, value in tensors.items() if name.startswith("extra.")})
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(header["scheduler"])
        before = self.steps
        self.move_to(position)
        # The steps it skipped were its predecessor's (or, a step behind, its own), at its data position.
        self.samples += (self.steps - before) * self.job.batch_size
        self.minibatches = worker_stream(self.job, self.rank, self.num_workers, skip=self.steps)
        self.adopted = True
        log.warning("worker %d took worker %d's state at %s", self.rank, source, position)
        self.ctx.metrics.log(self.steps, {"fault/adopted_from": source})

    def broadcast_bytes(self, data: bytes, source: int) -> bytes:
        """``data`` from rank ``source`` to every member (the others pass ``b""``), counted."""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(size, source, group=self.group)
        if self.rank == source:
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.comm_device)
        else:
            buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=self.comm_device)
        dist.broadcast(buffer, source, group=self.group)
        self.count_broadcast(size.element_size() + buffer.numel(), root=source)
        return data if self.rank == source else buffer.cpu().numpy().tobytes()

    def final_report(self) -> dict[str, Any]:
        # Replicas that end equal (allreduce, an averaged local SGD) end with equal checksums.
        return {"worker/params_crc32": zlib.crc32(encode_params(self.flat.params))}

    def counters(self) -> dict[str, Any]:
        counters = super().counters()
        if self.elastic:
            counters["comm/regroups"] = getattr(self, "regroups", 0)
        return counters

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

    def average_buffers_(self, weight: float = 1.0) -> None:
        """Replace every floating-point buffer (BatchNorm statistics) by the workers' weighted mean.

        Counters (``num_batches_tracked``) stay each replica's own. Every
        worker calls it at the same points, as any collective.
        """
        floats = [b for b in self.replica.buffers() if b.is_floating_point()]
        if not floats:
            return
        vector = torch.cat([*(b.detach().reshape(-1).float() for b in floats),
                            torch.ones(1, device=floats[0].device)]).mul_(weight)
        self.allreduce_(vector)
        if vector[-1] <= 0:
            return
        vector = vector[:-1].div_(vector[-1])
        offset = 0
        for buffer in floats:
            buffer.copy_(vector[offset : offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

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

def _restarts(store: dist.Store) -> int:
    """How many workers the coordinator has restarted so far (a counter in the group's store)."""
    return int(store.add("restarts", 0))


def _rank_device(device: str, rank: int) -> str:
    """Spread workers on ``cuda`` over the visible GPUs; keep an explicit index or the host as given."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


class CollectivePlan(WorkerGroupPlan):
    """The plan of a collective strategy: a rendezvous the coordinator hosts, then workers alone.

    The coordinator hosts the group's rendezvous (a ``TCPStore`` on this
    machine's address as the workers reach it) and every worker gets
    ``store_address``, ``backend``, its rank and the world size. A worker that
    dies ends the run (the others would wait in their next collective),
    unless ``job.restart_workers`` (allowed by the strategies whose workers
    take a member back): then its replacement starts and the group re-forms
    (:mod:`downpour.strategies.elastic`).

    Args:
        job: the run's workload.
        make_worker: builds worker ``rank``'s role from keyword arguments
            ``rank, num_workers, job, timeout, store_address, backend, elastic, ...``.
        global_steps: steps of all workers together that make the run.
        backend: ``"auto"``, ``"gloo"`` or ``"nccl"``.
        partition: keyword arguments for ``Dataset.shard`` (scheme, alpha...).
    """

    def __init__(self, job: Job, *, make_worker: Callable[..., CollectiveWorker], global_steps: int,
                 backend: str = "auto", partition: dict[str, Any] | None = None, timeout: float = 60.0) -> None:
        super().__init__(job, make_worker=make_worker, global_steps=global_steps, tolerate_deaths=False,
                         final_rank=0, partition=partition, timeout=timeout)
        self.backend = resolve_backend(backend, job.device, job.workers)

    def open(self, session: Session) -> None:
        self.store = dist.TCPStore(session.host, 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=10 * self.timeout))
        self.store_address = f"{session.host}:{self.store.port}"

    def worker_job(self, rank: int) -> Job:
        job = super().worker_job(rank)
        return replace(job, device=_rank_device(job.device, rank))

    def worker_options(self, session: Session, rank: int) -> dict[str, Any]:
        return {"store_address": self.store_address, "backend": self.backend,
                "elastic": self.job.restart_workers}

    def before_restart(self, session: Session, rank: int) -> None:
        self.store.add("restarts", 1)  # tells the survivors why their collective failed

"""Re-forming a collective group after a member dies: ``torch.distributed``'s elastic rendezvous.

With ``restart_workers``, an ``allreduce`` or ``local-sgd`` group does not end
when a worker dies. The coordinator starts a new process for the dead rank;
the survivors, whose next collective failed, leave the broken group; and all
of them, the newcomer included, meet again through TorchElastic's dynamic
rendezvous (:class:`~torch.distributed.elastic.rendezvous.dynamic_rendezvous.DynamicRendezvousHandler`,
the membership protocol ``torchrun`` uses: rounds, a wait list for late
arrivals, heartbeats that expire dead members). Each completed round gives a
store of its own, on which the new process group bootstraps.

The one part that is ours is where the rendezvous keeps its state. torch's
C10d backend stores it as a pickle in the ``TCPStore``, so every member would
unpickle bytes read from the network. :class:`JsonRendezvousBackend` stores
the same state as JSON instead, validated field by field when read back; the
handler still exchanges pickles with its backend, but only within the
process (the backend converts them as they come and go, and reads them back
with an unpickler that builds nothing but the rendezvous' own types).
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import pickle
from typing import Any

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousStateError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
    DynamicRendezvousHandler,
    RendezvousBackend,
    RendezvousTimeout,
    _NodeDesc,
    _RendezvousState,
)

__all__ = ["ElasticRendezvous", "JsonRendezvousBackend", "RendezvousClosedError"]

log = logging.getLogger(__name__)

_NULL = "null"  # the state before any member wrote one (a store read blocks until its key exists)


class JsonRendezvousBackend(RendezvousBackend):
    """A dynamic-rendezvous backend keeping the shared state in a ``Store`` as JSON, not as a pickle.

    Writes are compare-and-set on the exact bytes last read (the fencing
    token), as in torch's C10d backend.
    """

    def __init__(self, store: dist.Store, run_id: str) -> None:
        self._store = store
        self._key = f"downpour.rendezvous.{run_id}"
        self._store.compare_set(self._key, "", _NULL)  # creates the key if no member has yet

    @property
    def name(self) -> str:
        return "downpour-json"

    def get_state(self) -> tuple[bytes, Any] | None:
        return self._decode(self._store.get(self._key))

    def set_state(self, state: bytes, token: Any = None) -> tuple[bytes, Any, bool] | None:
        desired = state_to_json(_load_local(state))
        expected = token.decode() if isinstance(token, bytes) else _NULL
        current = self._store.compare_set(self._key, expected, desired)
        decoded = self._decode(current)
        if decoded is None:
            return None
        return decoded[0], decoded[1], current == desired.encode()

    @staticmethod
    def _decode(raw: bytes) -> tuple[bytes, Any] | None:
        if raw == _NULL.encode():
            return None
        return pickle.dumps(state_from_json(raw)), raw


def state_to_json(state: _RendezvousState) -> str:
    """The rendezvous state as canonical JSON (equal states give equal text)."""

    def node(n: _NodeDesc) -> list[Any]:
        return [n.addr, n.pid, n.local_id]

    return json.dumps({
        "round": state.round,
        "complete": state.complete,
        "deadline": None if state.deadline is None else state.deadline.isoformat(),
        "closed": state.closed,
        "participants": sorted([*node(n), rank] for n, rank in state.participants.items()),
        "wait_list": sorted(node(n) for n in state.wait_list),
        "redundancy_list": sorted(node(n) for n in state.redundancy_list),
        "last_heartbeats": sorted([*node(n), t.isoformat()] for n, t in state.last_heartbeats.items()),
    }, separators=(",", ":"))


def state_from_json(raw: bytes | str) -> _RendezvousState:
    """Parse :func:`state_to_json`'s text, checking every field; RendezvousStateError names what is wrong."""
    try:
        data = json.loads(raw)
        state = _RendezvousState()
        state.round = _typed(data["round"], int, "round")
        state.complete = _typed(data["complete"], bool, "complete")
        state.closed = _typed(data["closed"], bool, "closed")
        state.deadline = None if data["deadline"] is None else _time(data["deadline"])
        state.participants = {_node(entry[:3]): _typed(entry[3], int, "rank") for entry in data["participants"]}
        state.wait_list = {_node(entry) for entry in data["wait_list"]}
        state.redundancy_list = {_node(entry) for entry in data["redundancy_list"]}
        state.last_heartbeats = {_node(entry[:3]): _time(entry[3]) for entry in data["last_heartbeats"]}
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise RendezvousStateError(f"the rendezvous state in the store is malformed: {error}") from None
    return state


def _typed(value: Any, kind: type, name: str) -> Any:
    # bool is an int in Python; a rank or a round must not be one.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")
    return value


def _node(entry: list[Any]) -> _NodeDesc:
    if len(entry) != 3:
        raise ValueError(f"a node is [address, pid, local id], got {entry!r}")
    return _NodeDesc(_typed(entry[0], str, "address"), _typed(entry[1], int, "pid"), _typed(entry[2], int, "local id"))


def _time(text: Any) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(_typed(text, str, "time"))
    if moment.tzinfo is None:
        raise ValueError(f"a time must carry its zone, got {text!r}")
    return moment


class _StateUnpickler(pickle.Unpickler):
    """Builds the rendezvous state and the types it holds, and nothing else."""

    _ALLOWED = {
        ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_RendezvousState"),
        ("torch.distributed.elastic.rendezvous.dynamic_rendezvous", "_NodeDesc"),
        ("datetime", "datetime"), ("datetime", "timezone"), ("datetime", "timedelta"),
        ("builtins", "set"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"the rendezvous state may not contain {module}.{name}")
        return super().find_class(module, name)


def _load_local(state: bytes) -> _RendezvousState:
    """The state the handler in this process just pickled for its backend."""
    return _StateUnpickler(io.BytesIO(state)).load()


class ElasticRendezvous:
    """One worker's membership in its group's elastic rendezvous.

    ``next_round()`` joins the next round (the first, or the one after a
    member died) and returns that round's store once all ``world_size``
    members are in it. A dead member is dropped from the round it was in
    when its heartbeats stop: ``keep_alive`` seconds times
    ``keep_alive_attempts`` after its last one. Until then the round cannot
    end, so this is most of the time a group takes to re-form. A live
    member dropped for a late heartbeat loses nothing: the group it formed
    does not depend on the rendezvous, and it joins the next round like any.

    Args:
        store: the coordinator's store, which every member reaches.
        world_size: members in every round (min and max alike: the group
            re-forms whole, with the dead member's replacement).
        host: this member's address, as the others reach it.
        timeout: how long to wait for a round to complete, in seconds.
    """

    def __init__(self, store: dist.Store, *, world_size: int, host: str, timeout: float,
                 keep_alive: float = 0.5, keep_alive_attempts: int = 3) -> None:
        # The handler would otherwise start one more TCPStore in rank 0 for a torchrun-style agent.
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        run_id = "workers"
        backend = JsonRendezvousBackend(dist.PrefixStore("rendezvous/", store), run_id)
        self.handler = DynamicRendezvousHandler.from_backend(
            run_id=run_id, store=store, backend=backend, min_nodes=world_size, max_nodes=world_size,
            local_addr=host, timeout=RendezvousTimeout(join=datetime.timedelta(seconds=timeout)),
            keep_alive_interval=keep_alive, keep_alive_max_attempt=keep_alive_attempts)  # type: ignore[arg-type]
        self.rounds = 0

    def next_round(self) -> dist.Store:
        """Join the next round; its store, once every member is in. RendezvousClosedError: the run is over."""
        info = self.handler.next_rendezvous()
        self.rounds += 1
        return info.store

    def close(self) -> None:
        """The run is over: a member still waiting to join is told so (RendezvousClosedError)."""
        try:
            self.handler.shutdown()
        except Exception as error:  # the store may be gone with the coordinator; nothing left to tell
            log.debug("closing the rendezvous: %s", error)

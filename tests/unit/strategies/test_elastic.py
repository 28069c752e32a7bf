"""The elastic rendezvous' state travels as JSON, never as a pickle, and a round forms and closes."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import threading

import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousStateError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc, _RendezvousState

from downpour.strategies.elastic import (
    ElasticRendezvous,
    JsonRendezvousBackend,
    _load_local,
    state_from_json,
    state_to_json,
)

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.timezone.utc)


def _state() -> _RendezvousState:
    state = _RendezvousState()
    a, b, c = (_NodeDesc("10.0.0.1", pid, 0) for pid in (11, 12, 13))
    state.round, state.complete, state.deadline = 3, True, NOW
    state.participants = {a: 0, b: 1}
    state.wait_list = {c}
    state.last_heartbeats = {a: NOW, b: NOW, c: NOW - datetime.timedelta(seconds=2)}
    return state


def _store() -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def test_the_state_round_trips_through_canonical_json():
    text = state_to_json(_state())
    back = state_from_json(text)
    assert vars(back) == vars(_state())
    assert state_to_json(back) == text  # equal states, equal text: compare-and-set works on it


@pytest.mark.parametrize("field, value, problem", [
    ("round", True, "round must be int"),
    ("participants", [["10.0.0.1", 11, 0, "0"]], "rank must be int"),
    ("wait_list", [["10.0.0.1", 11]], "a node is"),
    ("deadline", "2026-11-24T12:00:00", "must carry its zone"),
])
def test_a_malformed_state_is_refused_naming_the_field(field, value, problem):
    data = json.loads(state_to_json(_state()))
    data[field] = value
    with pytest.raises(RendezvousStateError, match=problem):
        state_from_json(json.dumps(data))


def test_the_backend_writes_json_and_refuses_a_pickle_planted_in_the_store(tmp_path):
    store = _store()
    backend = JsonRendezvousBackend(store, "run")
    assert backend.get_state() is None
    state_bits, token, written = backend.set_state(pickle.dumps(_state()))
    assert written and json.loads(store.get("downpour.rendezvous.run"))["round"] == 3
    assert vars(pickle.loads(state_bits)) == vars(_state())
    # A stale token loses the compare-and-set and gets the current state back.
    newer = _state()
    newer.round = 4
    assert backend.set_state(pickle.dumps(newer), token)[2]
    _, _, written = backend.set_state(pickle.dumps(_state()), token)
    assert not written

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    store.set("downpour.rendezvous.run", pickle.dumps(Exploit()))
    with pytest.raises(RendezvousStateError, match="malformed"):
        backend.get_state()
    assert not marker.exists()


def test_only_the_rendezvous_types_are_unpickled_even_locally():
    with pytest.raises(pickle.UnpicklingError, match="may not contain posix.system"):
        _load_local(pickle.dumps(os.system))


def test_a_round_forms_with_every_member_then_a_late_one_learns_the_run_is_over():
    store = _store()

    def member() -> ElasticRendezvous:  # a store client of its own, as each worker process has
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=10))
        return ElasticRendezvous(client, world_size=2, host="127.0.0.1", timeout=20)

    members = [member(), member()]
    stores: list[dist.Store] = []
    threads = [threading.Thread(target=lambda m=m: stores.append(m.next_round())) for m in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(stores) == 2
    stores[0].set("hello", "world")  # the round's store is one store, shared by its members
    assert stores[1].get("hello") == b"world"

    members[0].close()
    with pytest.raises(RendezvousClosedError):
        member().next_round()

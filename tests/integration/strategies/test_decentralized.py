"""Decentralized asynchronous SGD with compressed updates: real peer processes, real gRPC between them."""

import math

import pytest

import downpour as dp
from tests import events

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_peers_exchange_compressed_changes_and_their_replicas_agree(digits, tmp_path):
    result = dp.train(model="logistic", data=digits, workers=4, epochs=3, batch_size=16,
                      strategy=dp.Decentralized(compress="threshold:tau=0.01,entropy", fanout=2, snapshot_every=10),
                      optimizer=dp.optim("sgd", lr=0.1), run_dir=tmp_path / "run")
    s = result.summary
    # Measured 0.897-0.905 over seeds 0-2 (2026-12-04); floors: one peer alone on its quarter for the
    # same three epochs 0.822, 5% of the steps 0.323.
    assert s["accuracy"] >= 0.85, s
    assert s["compression_ratio"] > 5 and s["bytes_raw"] > 5 * s["bytes_encoded"]
    # Every peer sends every other peer's share over the network: pushes are counted, pulls are none.
    assert s["pushes"] > 0 and s["pulls"] == 0 and s["bytes_sent"] >= s["bytes_encoded"]
    log = events.read(result.summary["run_dir"])
    distances = [e["decentralized/max_distance"] for e in log if "decentralized/max_distance" in e]
    assert distances, "the coordinator measured no distance between replicas"
    [final] = [e for e in log if "decentralized/replica_accuracy" in e]
    # Once all changes are in, replicas differ only by the residuals still held back.
    assert final["decentralized/final_max_distance"] < max(distances)
    assert abs(final["decentralized/replica_accuracy"] - s["accuracy"]) < 0.05


KILLED_AT = 40  # a multiple of the peers' log_every (10): the killed peer's last report is at the kill step


def test_a_killed_peer_does_not_stop_the_others(digits):
    result = dp.train(model="logistic", data=digits, workers=3, epochs=4, batch_size=8,
                      strategy=dp.Decentralized(), optimizer=dp.optim("sgd", lr=0.1),
                      faults=dp.Faults(kill_at_step={2: KILLED_AT}), save=False)
    per_peer = 4 * math.ceil(digits.num_train // 3 / 8)
    last = events.last_reports(result.history, "worker/steps")
    # The killed peer's steps stop at the kill; the others take all of theirs, as in a calm run.
    assert [e["fault/killed_at_step"] for e in result.history if e.get("fault/killed") == "worker:2"] == [KILLED_AT]
    assert {rank: e["worker/steps"] for rank, e in last.items()} == {0: per_peer, 1: per_peer, 2: KILLED_AT}
    assert {e["rank"] for e in result.history if e.get("peer/lost") == 2} == {0, 1}
    # And they went on talking to each other. A calm run sends every round to both others (pushes ==
    # 2 x rounds; measured 482 for 241 rounds); the survivors sent to both until they found peer 2
    # gone, then to each other alone (measured 273-283).
    for rank in (0, 1):
        rounds, pushes = last[rank]["comm/rounds"], last[rank]["comm/pushes"]
        assert rounds <= pushes < 2 * rounds, (rank, rounds, pushes)
    # The model is the average of the survivors' replicas, which hold each other's changes: they
    # differ only by what peer 2 had in flight to one and not the other when it died (measured
    # 0.07-0.12). Two peers that each trained on their own third alone end 1.5 apart.
    [final] = [e for e in result.history if "decentralized/final_max_distance" in e]
    assert final["decentralized/final_max_distance"] < 0.5, final
    # Measured 2026-12-03 over seeds 0-2: 0.911-0.916 (calm runs 0.911-0.922); floors: one peer
    # alone on its third for the same four epochs 0.897, 5% of the steps 0.630. The bar is barely
    # above the lone peer (digits saturates; a point is about 3.6 of its 360 test images): the
    # replicas' distance above shows the survivors met.
    assert result.summary["accuracy"] >= 0.90, result.summary


def test_bad_configurations_say_what_is_wrong(digits, tmp_path):
    with pytest.raises(ValueError, match="unknown compressor 'thresh'"):
        dp.Decentralized(compress="thresh:tau=1")
    with pytest.raises(ValueError, match="fanout must be in"):
        dp.Decentralized(fanout=0)
    with pytest.raises(ValueError, match="at least 2 peers"):
        dp.train(model="logistic", data=digits, workers=1, strategy=dp.Decentralized(), max_steps=2,
                 runs_root=tmp_path)
    assert not list(tmp_path.iterdir())  # a job refused before it ran leaves no run directory


@pytest.mark.slow
def test_four_peers_reach_96_percent_on_mnist(mnist):
    # Two epochs of batch 64 take as long as one of batch 32, and the replicas end with margin:
    # 97.3-97.7% in five runs under CPU load (one epoch of batch 32: 95.9-97.0%).
    result = dp.train(model="mlp", data=mnist, workers=4, epochs=2, batch_size=64,
                      strategy=dp.Decentralized(compress="threshold:tau=0.002,entropy"),
                      optimizer=dp.optim("momentum", lr=0.02), save=False)
    s = result.summary
    assert s["accuracy"] >= 0.96, s
    assert s["compression_ratio"] >= 50, s

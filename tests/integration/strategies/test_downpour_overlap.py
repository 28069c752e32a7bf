"""Downpour's courier thread and its n_fetch / n_push, in real runs.

With ``overlap=k`` a worker computes while up to k of its pushes are on the wire, so a gradient is
taken on parameters at most k pushes old: with one worker and one shard (nobody else moves the
shard) every push's staleness is at most k, and with overlap off it is 0. The calm run (overlap 0)
is the control: the staleness the test sees is the courier's doing.
"""

from __future__ import annotations

import pytest

import downpour as dp

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def digits_run(digits, strategy, *, workers=1, **kwargs):
    return dp.train(model="logistic", data=digits, strategy=strategy, workers=workers, epochs=3,
                    optimizer=dp.optim("sgd", lr=0.1), save=False, **kwargs)


@pytest.mark.parametrize("overlap", [1, 2])
def test_overlap_keeps_every_push_within_its_bound_and_trains(digits, overlap):
    calm = digits_run(digits, dp.Downpour(overlap=0))
    overlapped = digits_run(digits, dp.Downpour(overlap=overlap))
    assert calm.summary["staleness_max"] == 0, calm.summary
    assert overlapped.summary["staleness_max"] <= overlap, overlapped.summary
    # It did overlap: most pushes left while the next gradient was computed on older parameters.
    assert overlapped.summary["staleness_mean"] >= 0.5 * overlap, overlapped.summary
    # Measured: staleness mean 0.99 (overlap 1) and 1.91 (overlap 2), accuracy 0.84-0.875 over two
    # seeds each (2026-12-04) like the calm run's 0.85. Floor: 5% of the budget with overlap 0.19.
    assert overlapped.summary["accuracy"] >= 0.75, overlapped.summary
    assert overlapped.summary["samples"] == calm.summary["samples"]


def test_overlap_survives_a_refused_push(digits):
    # Bounded staleness at 0 refuses every push the courier sends on parameters a push old: the
    # refused pushes' samples are taken back (not counted as trained), and the run still ends.
    result = digits_run(digits, dp.Downpour(overlap=1, max_staleness=0))
    refused = sum(e["worker/refused"] for e in result.history
                  if e.get("role") == "worker" and e.get("worker/done"))
    assert refused > 0, result.summary
    assert result.summary["samples"] < 3 * digits.num_train  # what was refused did not train


@pytest.mark.slow
def test_fetch_and_push_every_4_reach_the_band_of_every_1_on_mnist(mnist):
    # The push is the mean of its four gradients (DownpourWorker says why; at momentum 0.05 the sum
    # diverged to 10.9%). At 0.05 every 1 itself sits at the edge of stability here (93.5-95.0% over
    # four runs, and once 26.3% in CI), so the two are compared at 0.02, measured 2026-12-04 on 2
    # cores, two epochs: every 1 at 97.29-97.46% and every 4 at 97.12-97.38% (three runs each);
    # floor: 5% of the budget of every 4 reaches 53.3%.
    common = dict(model="mlp", data=mnist, workers=2, servers=2, epochs=2, batch_size=32,
                  optimizer=dp.optim("momentum", lr=0.02), eval_every=10**9, save=False)
    every = dp.train(strategy=dp.Downpour(), **common)
    fourth = dp.train(strategy=dp.Downpour(fetch_every=4, push_every=4), **common)
    assert every.summary["accuracy"] >= 0.96, every.summary
    assert fourth.summary["accuracy"] >= 0.96, fourth.summary
    assert abs(fourth.summary["accuracy"] - every.summary["accuracy"]) <= 0.01, (every.summary,
                                                                               fourth.summary)
    # A quarter of the round trips, and of the parameters pulled. The pushes shrink less: one
    # batch's gradient leaves the weights of pixels blank in all 32 images at zero, so the first
    # shard's part goes sparse, while a mean of four batches is dense. Measured: rounds 188 -> 47,
    # received 0.254x, sent 0.333x (0.2 epochs); over these two epochs sent 0.374x and 0.523x in
    # two CI runs (how much of the every-1 pushes goes sparse varies from run to run).
    assert abs(4 * fourth.summary["rounds"] - every.summary["rounds"]) <= 8, (every.summary,
                                                                            fourth.summary)
    assert fourth.summary["bytes_received"] < 0.27 * every.summary["bytes_received"]
    assert fourth.summary["bytes_sent"] < 0.65 * every.summary["bytes_sent"]

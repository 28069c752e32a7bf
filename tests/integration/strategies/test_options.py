"""Every documented option does what it says in a real run, and the run still trains.

Digits, logistic regression, 2 workers, three epochs at lr 0.1. Measured 2026-12-03 on 2 cores:
single 0.847; the options below 0.864-0.905 (fetch/push every 4 0.864-0.880, a server-side adagrad
0.891-0.905, onebit 0.869-0.886, hogwild's lock 0.877-0.883; two runs each), but for the two with
bars of their own. Floors: one worker alone on its half for the same three epochs 0.758, 5% of the
steps 0.189. TRAINED sits between them.
"""

from __future__ import annotations

import pytest
import torch

import downpour as dp
from tests.events import per_rank

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRAINED = 0.80


def run(digits, strategy, *, workers=2, optimizer=None, **kwargs):
    return dp.train(model="logistic", data=digits, strategy=strategy, workers=workers, epochs=3,
                    optimizer=optimizer or dp.optim("sgd", lr=0.1), save=False, **kwargs)


def test_fetch_every_and_push_every_cut_traffic_by_their_factor_and_still_train(digits):
    # A push is the mean of its four gradients, one server step for a batch four times larger, so
    # the same epochs take a quarter of the steps: at 4x the learning rate every 4 reaches 0.87
    # (0.64 at lr 0.1). test_downpour_overlap.py shows it at the same rate on MNIST.
    every = run(digits, dp.Downpour())
    fourth = run(digits, dp.Downpour(fetch_every=4, push_every=4), optimizer=dp.optim("sgd", lr=0.4))
    steps = per_rank(every.history, "worker/steps")
    assert per_rank(fourth.history, "worker/steps") == steps
    pushes, pulls = per_rank(fourth.history, "comm/pushes"), per_rank(fourth.history, "comm/pulls")
    for rank, n in steps.items():
        assert per_rank(every.history, "comm/pushes")[rank] == n
        assert pushes[rank] == -(-n // 4)  # the last partial group pushes too
        assert pulls[rank] <= n // 4 + 2  # and the first, and the last
    assert fourth.summary["bytes_sent"] < 0.3 * every.summary["bytes_sent"]
    assert fourth.summary["accuracy"] >= TRAINED


def test_scale_lr_divides_each_stale_push_by_its_staleness(digits):
    # A push s versions stale (s >= 2) is applied at lr / s, so from the same start over the same
    # samples the parameters move less: 4 workers (mean staleness 1.2-1.6) moved 2.67 plain and
    # 2.15-2.20 with scale-lr over three pairs of runs.
    torch.manual_seed(0)  # the job's seed: the runs' common start
    start = dp.models.build("logistic", digits.input_shape, digits.num_classes)

    def moved(result) -> float:
        return float(torch.cat([(p - q).detach().reshape(-1) for p, q in
                                zip(result.model.parameters(), start.parameters())]).norm())

    plain = run(digits, dp.Downpour(), workers=4)
    scaled = run(digits, dp.Downpour(staleness="scale-lr"), workers=4)
    assert scaled.summary["staleness_max"] >= 2, scaled.summary
    assert moved(scaled) < 0.92 * moved(plain), (moved(scaled), moved(plain))
    # Smaller steps train less in the same epochs: 0.769-0.836 over five runs (2026-12-03); floors:
    # one of the four workers alone on its quarter 0.643, 5% of the steps 0.189.
    assert scaled.summary["accuracy"] >= 0.72


def test_a_server_optimizer_keeps_its_state_on_the_shards(digits):
    result = run(digits, dp.Downpour(server_optimizer="adagrad"))
    assert result.summary["accuracy"] >= TRAINED


def test_sync_with_compression_trains_and_sends_less(digits):
    result = run(digits, dp.Sync(compress="topk:0.1"))
    assert result.summary["compression_ratio"] > 4
    # Synchronous, so the same at a seed: 0.788 in three runs at this one (0.827 at seed 1),
    # measured 2026-12-03; floors: one worker alone on its half 0.758, 5% of the steps 0.189.
    assert result.summary["accuracy"] >= 0.77


def test_downpour_with_onebit_trains_at_about_28_times_less(digits):
    result = run(digits, dp.Downpour(compress="onebit"))
    assert result.summary["compression_ratio"] > 15
    assert result.summary["accuracy"] >= TRAINED


def test_hogwild_with_a_lock_trains_and_waits_for_it(digits):
    result = run(digits, dp.Hogwild(lock=True))
    assert result.summary["accuracy"] >= TRAINED
    assert sum(per_rank(result.history, "hogwild/wait_seconds").values()) > 0


@pytest.mark.parametrize("strategy", ["downpour", "sync", "allreduce", "local-sgd", "hogwild", "hot-potato",
                                      "decentralized"])
def test_the_cnn_trains_through_every_distributed_family(strategy, digits):
    # single reaches 0.93 on this budget; an untrained CNN 0.1, Downpour on 5% of it 0.19-0.20.
    # Downpour (2 x 2, momentum on the shards) is the lowest: 0.727-0.914 over 21 runs since a round
    # through shared memory is one call (2026-12-03/04; 0.84-0.925 before, when the other worker's
    # push more often landed between a worker's push and its pull).
    result = dp.train(model="cnn", data=digits, strategy=strategy, workers=2, epochs=4, batch_size=32,
                      optimizer=dp.optim("momentum", lr=0.05), save=False,
                      **({"servers": 2} if dp.strategies.STRATEGIES[strategy].uses_servers else {}))
    assert result.summary["accuracy"] >= 0.6, result.summary["accuracy"]

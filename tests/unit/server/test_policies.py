"""Update policies of ServerShard: Downpour, synchronous N of N+b, bounded staleness."""

from __future__ import annotations

import pytest
import torch

from downpour.errors import StaleUpdate
from downpour.flat import SparseUpdate
from downpour.server import ApplyAtOnce, BoundedStaleness, InvalidUpdate, ServerShard, Synchronous
from tests.optimizers import sgd


def balanced(status: dict) -> bool:
    return (
        status["pushes"]
        == status["applied"] + status["dropped"] + status["refused"] + status["pending"]
    )


# -- Downpour ----------------------------------------------------------------


def test_apply_at_once_applies_every_push_and_measures_staleness():
    shard = ServerShard(torch.zeros(4), optimizer=sgd(0.5), policy=ApplyAtOnce())
    assert shard.push(0, 0, torch.ones(4)) == (True, False, 0, 1)
    assert shard.push(1, 0, torch.ones(4)) == (True, False, 1, 2)  # computed on 0, shard at 1
    assert shard.push(2, 1, torch.full((4,), 2.0)) == (True, False, 1, 3)
    version, params = shard.pull()
    assert version == 3
    assert torch.equal(params, torch.full((4,), -2.0))  # -0.5 * (1 + 1 + 2)
    status = shard.status()
    assert (status["pushes"], status["applied"], status["updates"]) == (3, 3, 3)
    assert status["staleness"] == {0: 1, 1: 2}
    assert balanced(status)


def test_apply_at_once_matches_torch_optimizer_on_the_same_gradients():
    torch.manual_seed(0)
    grads = [torch.randn(10) for _ in range(5)]
    shard = ServerShard(torch.ones(10), optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1))
    reference = torch.ones(10, requires_grad=True)
    optimizer = torch.optim.Adam([reference], lr=0.1)
    for step, grad in enumerate(grads):
        shard.push(0, step, grad)
        reference.grad = grad.clone()
        optimizer.step()
    assert torch.equal(shard.pull()[1], reference.detach())


def test_delta_updates_bypass_the_optimizer():
    shard = ServerShard(torch.zeros(3), optimizer=sgd(100.0))
    shard.push(0, 0, torch.tensor([1.0, 2.0, 3.0]), kind="delta")
    assert torch.equal(shard.pull()[1], torch.tensor([1.0, 2.0, 3.0]))


def test_a_shard_without_optimizer_takes_deltas_only():
    shard = ServerShard(torch.zeros(3))
    with pytest.raises(InvalidUpdate, match="no optimizer") as error:
        shard.push(0, 0, torch.ones(3))
    assert error.value.reason == "BAD_KIND"
    assert shard.push(0, 0, torch.ones(3), kind="delta").applied


# -- synchronous N of N+b --------------------------------------------------


def test_synchronous_applies_the_average_once_n_arrive_and_drops_the_backup():
    shard = ServerShard(torch.zeros(2), optimizer=sgd(1.0), policy=Synchronous(num_required=3))
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([2.0, 3.0]), torch.tensor([3.0, 6.0])]
    assert shard.push(0, 0, grads[0]) == (False, False, 0, 0)
    assert shard.push(1, 0, grads[1]) == (False, False, 0, 0)
    assert shard.status()["pending"] == 2
    assert shard.pull()[0] == 0  # nothing applied before the third
    assert shard.push(2, 0, grads[2]) == (True, False, 0, 1)
    assert torch.equal(shard.pull()[1], -torch.stack(grads).mean(0))
    # The backup worker's gradient, computed on version 0, arrives late.
    assert shard.push(3, 0, torch.tensor([100.0, 100.0])) == (False, True, 1, 1)
    status = shard.status()
    assert (status["pushes"], status["applied"], status["dropped"], status["updates"]) == (
        4,
        3,
        1,
        1,
    )
    assert status["staleness"] == {0: 3}
    assert balanced(status)


def test_synchronous_drops_a_second_push_from_one_worker_in_a_round():
    shard = ServerShard(torch.zeros(1), optimizer=sgd(1.0), policy=Synchronous(num_required=2))
    shard.push(0, 0, torch.ones(1))
    assert shard.push(0, 0, torch.ones(1)).dropped
    assert shard.push(1, 0, torch.ones(1)).applied
    assert shard.status()["dropped"] == 1


def test_synchronous_with_n_plus_b_workers_over_rounds():
    num_required, backups, rounds = 3, 2, 4
    shard = ServerShard(
        torch.zeros(5), optimizer=sgd(0.5), policy=Synchronous(num_required=num_required)
    )
    for round_ in range(rounds):
        results = [shard.push(w, round_, torch.ones(5)) for w in range(num_required + backups)]
        assert [r.applied for r in results] == [False, False, True, False, False]
        assert [r.dropped for r in results] == [False, False, False, True, True]
    status = shard.status()
    assert status["version"] == rounds
    assert status["applied"] == num_required * rounds
    assert status["dropped"] == backups * rounds
    assert torch.equal(shard.pull()[1], torch.full((5,), -0.5 * rounds))


def test_synchronous_fold_weights_late_gradients_by_staleness():
    shard = ServerShard(
        torch.zeros(1), optimizer=sgd(1.0), policy=Synchronous(num_required=2, late="fold")
    )
    shard.push(0, 0, torch.tensor([1.0]))
    shard.push(1, 0, torch.tensor([1.0]))  # round 0 applied: -1
    shard.push(0, 1, torch.tensor([2.0]))
    shard.push(1, 1, torch.tensor([2.0]))  # round 1 applied: -2 more
    late = shard.push(2, 0, torch.tensor([9.0]))  # staleness 2: weight 1/3
    assert (late.applied, late.dropped, late.staleness) == (False, False, 2)
    shard.push(0, 2, torch.tensor([3.0]))
    assert shard.push(1, 2, torch.tensor([3.0])).applied
    expected = -1.0 - 2.0 - (3.0 + 3.0 + 9.0 / 3) / (2 + 1 / 3)
    assert shard.pull()[1].item() == pytest.approx(expected, rel=1e-6)
    status = shard.status()
    assert status["folded"] == 1
    assert status["dropped"] == 0
    assert status["staleness"] == {0: 6, 2: 1}
    assert balanced(status)


def test_synchronous_refuses_to_mix_gradients_and_deltas_in_a_round():
    shard = ServerShard(torch.zeros(1), optimizer=sgd(), policy=Synchronous(num_required=2))
    shard.push(0, 0, torch.ones(1))
    with pytest.raises(InvalidUpdate, match="collects gradient"):
        shard.push(1, 0, torch.ones(1), kind="delta")
    assert shard.status()["pending"] == 1


def test_synchronous_sparse_and_dense_pushes_average_together():
    shard = ServerShard(torch.zeros(4), optimizer=sgd(1.0), policy=Synchronous(num_required=2))
    shard.push(0, 0, SparseUpdate(torch.tensor([1, 3]), torch.tensor([2.0, 4.0]), 4))
    shard.push(1, 0, torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert torch.equal(shard.pull()[1], -torch.tensor([1.0, 2.0, 1.0, 3.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_required": 0}, "num_required"),
        ({"num_required": 2, "late": "keep"}, "choose one of: drop, fold"),
    ],
)
def test_synchronous_config_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Synchronous(**kwargs)


# -- bounded staleness -------------------------------------------------------


def test_bounded_staleness_refuses_pushes_beyond_the_bound():
    shard = ServerShard(torch.zeros(2), optimizer=sgd(), policy=BoundedStaleness(max_staleness=2))
    for version in range(3):
        shard.push(0, version, torch.ones(2))
    assert shard.push(1, 1, torch.ones(2)).staleness == 2  # at the bound: applied
    before = shard.pull()
    with pytest.raises(StaleUpdate, match="at most 2 versions old"):
        shard.push(1, 0, torch.ones(2))  # staleness 4
    after = shard.pull()
    assert before[0] == after[0] and torch.equal(before[1], after[1])
    status = shard.status()
    assert status["refused"] == 1
    assert max(status["staleness"]) <= 2
    assert balanced(status)


def test_bounded_staleness_keeps_every_applied_staleness_within_the_bound():
    generator = torch.Generator().manual_seed(1)
    bound = 3
    shard = ServerShard(
        torch.zeros(2), optimizer=sgd(0.1), policy=BoundedStaleness(max_staleness=bound)
    )
    computed_on = [0] * 6  # the version each worker last pulled
    for _ in range(300):
        worker = int(torch.randint(0, 6, (1,), generator=generator))
        try:
            result = shard.push(worker, computed_on[worker], torch.ones(2))
            assert result.staleness <= bound
        except StaleUpdate:
            pass
        if torch.rand(1, generator=generator) < 0.3:
            computed_on[worker] = shard.version  # the worker pulls
    status = shard.status()
    assert status["refused"] > 0
    assert max(status["staleness"]) <= bound
    assert balanced(status)


def test_bounded_staleness_rejects_a_negative_bound():
    with pytest.raises(ValueError, match="max_staleness"):
        BoundedStaleness(max_staleness=-1)


# -- staleness-scaled learning rate -----------------------------------------


def test_scale_lr_by_staleness_divides_the_step():
    shard = ServerShard(
        torch.zeros(1), optimizer=sgd(1.0), policy=ApplyAtOnce(scale_lr_by_staleness=True)
    )
    for version in range(4):
        shard.push(0, version, torch.zeros(1))
    shard.push(1, 0, torch.tensor([8.0]))  # staleness 4: lr 1/4
    assert shard.pull()[1].item() == -2.0
    shard.push(1, 5, torch.tensor([8.0]))  # staleness 0: full step
    assert shard.pull()[1].item() == -10.0


def test_scale_lr_by_staleness_scales_the_learning_rate_of_adam_and_restores_it():
    shard = ServerShard(
        torch.zeros(3),
        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1),
        policy=BoundedStaleness(max_staleness=10, scale_lr_by_staleness=True),
    )
    shard.push(0, 0, torch.ones(3), kind="delta")
    shard.push(0, 1, torch.ones(3), kind="delta")
    shard.push(1, 0, torch.tensor([1.0, -2.0, 3.0]))  # staleness 2
    reference = (torch.ones(3) * 2).requires_grad_(True)
    adam = torch.optim.Adam([reference], lr=0.05)
    reference.grad = torch.tensor([1.0, -2.0, 3.0])
    adam.step()
    assert torch.equal(shard.pull()[1], reference.detach())
    assert shard.state_dict()["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_delta_is_scaled_by_staleness_too():
    shard = ServerShard(torch.zeros(1), policy=ApplyAtOnce(scale_lr_by_staleness=True))
    shard.push(0, 0, torch.ones(1), kind="delta")
    shard.push(0, 1, torch.ones(1), kind="delta")
    shard.push(1, 0, torch.tensor([4.0]), kind="delta")  # staleness 2
    assert shard.pull()[1].item() == 4.0


@pytest.mark.parametrize("foreach", [False, True])
def test_plain_sgd_is_bit_identical_to_torch_sgd(foreach):
    torch.manual_seed(0)
    grads = [torch.randn(100) for _ in range(5)]
    shard = ServerShard(
        torch.ones(100), optimizer=lambda ps: torch.optim.SGD(ps, lr=0.37, foreach=foreach)
    )
    reference = torch.ones(100, requires_grad=True)
    optimizer = torch.optim.SGD([reference], lr=0.37, foreach=foreach)
    for step, grad in enumerate(grads):
        shard.push(0, step, grad)
        reference.grad = grad.clone()
        optimizer.step()
    assert torch.equal(shard.pull()[1], reference.detach())


def test_learning_rate_changes_on_the_optimizer_take_effect():
    shard = ServerShard(torch.zeros(1), optimizer=sgd(1.0))
    shard.push(0, 0, torch.ones(1))
    shard._optimizer.param_groups[0]["lr"] = 0.5  # what an LR schedule does
    shard.push(0, 1, torch.ones(1))
    assert shard.pull()[1].item() == -1.5

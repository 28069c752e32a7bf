"""The pure parts of ``boost`` and ``selfieboost``: sampling, SAMME weights, the vote, the objective, the options."""

import math

import pytest
import torch
from torch import nn

import downpour as dp
from downpour.flat import FlatParams, flatten
from downpour.strategies.boost import (
    Boost,
    SelfieBoost,
    Vote,
    default_rounds,
    default_sample_size,
    draw_counts,
    draw_examples,
    margins,
    reweigh_,
    reweighed_totals,
    samme_alpha,
    selfie_objective,
)


# ------------------------------------------------------------------ defaults
@pytest.mark.parametrize(("n", "eps", "k", "c"), [(8000, 0.01, 320, 5), (1000, 0.1, 400, 3), (10, 0.001, 1, 7)])
def test_defaults_follow_the_seed(n, eps, k, c):
    assert default_sample_size(n, eps) == k  # ceil(4 n eps), at least one
    assert default_rounds(eps) == c  # ceil(ln(1 / eps))


def test_the_plan_fills_in_only_what_is_not_given():
    job = dp.strategies.Job(model=lambda: nn.Linear(2, 2), loss=nn.functional.cross_entropy,
                            data=dp.data.load("synthetic", n=1000, d=4, seed=0), optimizer=dp.optim("sgd"),
                            batch_size=50)
    assert Boost(eps=0.05).sizes(job) == (160, 3, 20 * 4)
    assert Boost(eps=0.05, sample_size=7, num_rounds=2, steps_per_round=9).sizes(job) == (7, 2, 9)


# ------------------------------------------------------------------ sampling
def test_every_rank_draws_the_same_counts_from_the_same_seed():
    log_totals = torch.log(torch.tensor([5.0, 1.0, 0.0, 2.0], dtype=torch.float64))
    ranks = [torch.Generator().manual_seed(3) for _ in range(4)]
    for _ in range(5):  # rounds: the generators advance alike
        draws = [draw_counts(log_totals, 100, g) for g in ranks]
        assert all(torch.equal(draws[0], d) for d in draws)
        assert int(draws[0].sum()) == 100 and int(draws[0][2]) == 0  # a worker of weight 0 gives nothing


def test_counts_and_examples_follow_the_weights():
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([1.0, 3.0, 6.0], dtype=torch.float64)
    counts = draw_counts(weights.log(), 200_000, generator).double() / 200_000
    assert torch.allclose(counts, weights / weights.sum(), atol=5e-3)
    picks = draw_examples(weights.log(), 200_000, generator)
    assert torch.allclose(torch.bincount(picks, minlength=3).double() / 200_000, weights / weights.sum(), atol=5e-3)
    assert len(draw_examples(weights.log(), 0, generator)) == 0


def test_weights_far_beyond_float_range_still_sample():
    # Log weights of 1000 and 1001: exp overflows, softmax of the logs does not.
    picks = draw_examples(torch.tensor([1000.0, 1001.0], dtype=torch.float64), 50_000, torch.Generator().manual_seed(1))
    share = float((picks == 1).double().mean())
    assert share == pytest.approx(math.e / (1 + math.e), abs=0.01)


def test_nothing_to_sample_from_is_an_error():
    with pytest.raises(ValueError, match="no worker holds an example"):
        draw_counts(torch.full((3,), -math.inf), 5, torch.Generator())


# ------------------------------------------------------------------ weights
def test_samme_alpha():
    assert samme_alpha(0.25, 2) == pytest.approx(math.log(3))  # twice AdaBoost's ½ ln 3
    assert samme_alpha(0.5, 3) == pytest.approx(math.log(2))  # better than chance among 3
    assert samme_alpha(2 / 3, 3) == pytest.approx(0.0)  # chance among 3: no say
    assert samme_alpha(0.9, 3) < 0
    assert samme_alpha(0.0, 10) == math.inf and samme_alpha(1.0, 2) == -math.inf


@pytest.mark.parametrize("classes", [2, 3, 10])
def test_the_totals_every_rank_computes_match_each_workers_reweighed_examples(classes):
    generator = torch.Generator().manual_seed(classes)
    shards = [torch.randn(n, generator=generator, dtype=torch.float64) for n in (7, 0, 12)]  # log q_i; one shard empty
    wrongs = [torch.rand(len(s), generator=generator) < 0.3 for s in shards]
    log_totals = torch.stack([torch.logsumexp(s, 0) for s in shards])
    log_wrong = torch.stack([torch.logsumexp(s[w], 0) for s, w in zip(shards, wrongs)])
    expected = reweighed_totals(log_totals, log_wrong, 1.7, classes)
    for s, w in zip(shards, wrongs):
        reweigh_(s, w, 1.7, classes)
    actual = torch.stack([torch.logsumexp(s, 0) for s in shards])
    assert torch.allclose(expected[[0, 2]], actual[[0, 2]]) and expected[1] == actual[1] == -math.inf


def test_for_two_classes_the_margin_form_is_samme_normalized():
    log_q = torch.randn(20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wrong = torch.arange(20) % 3 == 0
    margin_form = reweigh_(log_q.clone(), wrong, 1.3, 2)
    # q_i exp(-y_i h(x_i)) with h = ±alpha/2: exp(-alpha/2) when right, exp(+alpha/2) when wrong.
    assert torch.allclose(margin_form - log_q, torch.where(wrong, 0.65, -0.65).double())
    samme_form = log_q + 1.3 * wrong.double()
    assert torch.allclose(torch.softmax(margin_form, 0), torch.softmax(samme_form, 0))


def test_boosting_moves_half_the_weight_onto_the_mistakes():
    # AdaBoost's invariant: after the update, the member is exactly at chance (err 1/2 for two classes).
    log_q = torch.zeros(10, dtype=torch.float64)
    wrong = torch.tensor([True, True] + [False] * 8)
    reweigh_(log_q, wrong, samme_alpha(0.2, 2), 2)
    assert float(torch.softmax(log_q, 0)[wrong].sum()) == pytest.approx(0.5)


# ------------------------------------------------------------------ the vote
class _Fixed(nn.Module):
    """Predicts a fixed class for every input (scores with one hot class)."""

    def __init__(self, cls: int, classes: int = 3) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(cls), classes).float())

    def forward(self, x):
        return self.scores.expand(x.shape[0], -1)


def test_the_vote_adds_each_members_weight_to_its_class():
    vote = Vote([_Fixed(0), _Fixed(1), _Fixed(1), _Fixed(2)])
    vote.weights.data = torch.tensor([2.5, 1.0, 1.0, 0.0])
    scores = vote(torch.zeros(4, 5))
    assert scores.tolist() == [[2.5, 2.0, 0.0]] * 4
    assert scores.argmax(dim=1).tolist() == [0] * 4
    vote.weights.data[0] = 1.5
    assert vote(torch.zeros(1, 5)).argmax(dim=1).tolist() == [1]


def test_a_vote_without_weights_ties_and_members_without_weight_are_not_run():
    class Exploding(_Fixed):
        def forward(self, x):
            raise AssertionError("a member of weight 0 was run")

    vote = Vote([_Fixed(0), Exploding(1)])
    assert vote(torch.zeros(2, 5)).tolist() == [[0.0, 0.0, 0.0]] * 2
    vote.weights.data[0] = 1.0
    assert vote(torch.zeros(2, 5)).argmax(dim=1).tolist() == [0, 0]


def test_for_two_classes_the_votes_softmax_is_adaboosts_logistic_estimate():
    torch.manual_seed(0)
    vote = Vote.build(lambda: nn.Linear(4, 2), 3)
    vote.weights.data = torch.tensor([0.7, 1.1, 0.4])  # SAMME's weights: twice AdaBoost's
    x = torch.randn(16, 4)
    signs = torch.stack([m(x).argmax(dim=1) * 2.0 - 1 for m in vote.members])  # h_t(x) in {-1, +1}
    boosted = (vote.weights[:, None].detach() / 2 * signs).sum(dim=0)  # F(x) = sum of AdaBoost weight * h_t(x)
    assert torch.allclose(torch.softmax(vote(x), dim=1)[:, 1], torch.sigmoid(2 * boosted), atol=1e-6)


def test_a_member_set_from_a_flat_vector_travels_in_the_votes_flat_vector():
    torch.manual_seed(0)
    member = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    vector = FlatParams(member).params.clone()
    sent = Vote.build(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 2)
    sent.set_member_(1, vector, 0.8)
    received = Vote.build(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 2)
    FlatParams(received).load_(flatten(p for p in sent.parameters() if p.requires_grad))  # the snapshot path
    x = torch.randn(5, 3)
    assert torch.equal(received.weights.detach(), torch.tensor([0.0, 0.8]))
    assert torch.equal(received.members[1](x), member(x))
    assert torch.equal(received(x), sent(x))


# ------------------------------------------------------------------ selfieboost
def test_margins_are_the_true_score_minus_the_best_other():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 1.0, 1.0]])
    assert margins(scores, torch.tensor([0, 0, 2])).tolist() == [1.0, -5.0, 0.0]


def test_for_two_classes_the_objective_is_the_papers():
    generator = torch.Generator().manual_seed(0)
    f_scores, g_scores = torch.randn(8, 2, generator=generator), torch.randn(8, 2, generator=generator)
    y = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    sign = y * 2.0 - 1
    f, g = f_scores[:, 1] - f_scores[:, 0], g_scores[:, 1] - g_scores[:, 0]  # binary scores
    paper = (sign * (f - g) + 0.5 * (g - f) ** 2).mean()
    assert torch.allclose(selfie_objective(g_scores, y, margins(f_scores, y)), paper)


def test_the_objective_is_least_when_every_margin_grew_by_one():
    y = torch.tensor([0, 2])
    reference = margins(torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.3]]), y)
    better = torch.tensor([[2.0, 0.0, 0.5], [0.0, 2.0, 1.3]], requires_grad=True)  # each margin + 1
    value = selfie_objective(better, y, reference)
    value.backward()
    assert float(value.detach()) == pytest.approx(-0.5) and float(better.grad.abs().max()) == 0.0


# ------------------------------------------------------------------ bad options
@pytest.mark.parametrize(("options", "message"), [
    ({"eps": 0.0}, r"eps must be in \(0, inf\], got 0.0"),
    ({"eps": 1.0}, r"eps \(the target error\) must be in \(0, 1\), got 1.0"),
    ({"eps": -0.5}, r"eps must be in \(0, inf\], got -0.5"),
    ({"sample_size": 0}, r"sample_size must be in \[1, inf\], got 0"),
    ({"num_rounds": 0}, r"num_rounds must be in \[1, inf\], got 0"),
    ({"steps_per_round": -2}, r"steps_per_round must be in \[1, inf\], got -2"),
    ({"coordinator_device": "gpu0"}, r"coordinator_device must be 'auto' or a torch device .* got 'gpu0'"),
    ({"log_every": 0}, r"log_every must be in \[1, inf\], got 0"),
])
def test_bad_boost_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Boost(**options)


def test_warm_start_must_be_a_bool():
    with pytest.raises(TypeError, match="warm_start must be True or False, got 'yes'"):
        Boost(warm_start="yes")


@pytest.mark.parametrize(("options", "message"), [
    ({"sample_size": 0}, r"sample_size must be in \[1, inf\], got 0"),
    ({"steps_per_round": 0}, r"steps_per_round must be in \[1, inf\], got 0"),
    ({"coordinator_device": "tpu"}, r"coordinator_device must be 'auto' or a torch device"),
])
def test_bad_selfieboost_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SelfieBoost(**options)


@pytest.mark.parametrize("strategy", [Boost(), SelfieBoost()], ids=["boost", "selfieboost"])
def test_slow_workers_are_refused_before_any_process_starts(strategy):
    with pytest.raises(ValueError, match=r"takes every gradient step on rank 0.*stage no slow workers"):
        dp.train(model="logistic", data="digits", strategy=strategy, workers=2, faults=dp.Faults(slow={1: 3.0}),
                 save=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_coordinator_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="coordinator_device='cuda' but this machine has no CUDA GPU"):
        dp.train(model="logistic", data="digits", strategy=Boost(coordinator_device="cuda"), workers=2, save=False)

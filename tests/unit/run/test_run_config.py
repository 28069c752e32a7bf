"""RunConfig: the one configuration tree, and what the API derives from it."""

import dataclasses
import inspect
import re
import string
import sys

import pytest

import downpour as dp
from downpour.api import UNSET
from downpour.run import RunConfig
from downpour.run.config import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    LengthConfig,
    leaves,
    options,
    unread,
)
from downpour.strategies import STRATEGIES


def test_defaults_live_in_the_tree_and_the_api_repeats_none():
    config = RunConfig()
    assert (config.strategy, config.data.dataset, config.model.name) == (
        dp.Single(), "mnist", "mlp")
    assert (config.optimizer.name, config.optimizer.lr) == ("sgd", 0.05)
    assert (config.length.epochs, config.length.batch_size, config.cluster.workers) == (1.0, 64, 1)
    # Every keyword of train and compare that is a run option defaults to "not given" (compare's
    # workers is its own: the counts it sweeps, 4 unless told).
    for function in (dp.train, dp.compare):
        own = {"workers"} if function is dp.compare else set()
        for name, parameter in inspect.signature(function).parameters.items():
            if name in leaves_or_sections() - own:
                assert parameter.default is UNSET, (function.__name__, name)


def leaves_or_sections():
    return {option.api for option in options().values()} | set(options())


def test_every_train_keyword_is_an_option_or_says_why_not():
    keywords = set(inspect.signature(dp.train).parameters)
    not_options = {"model", "data", "loss", "save", "progress", "options", "config"}
    assert keywords - not_options <= leaves_or_sections()
    # ... and every option is reachable from it: by its name, or by its section (optimizer=...).
    assert {option.api for option in options().values()} <= keywords | {"data"}


def test_every_option_is_described():
    for name, option in options().items():
        if option.flag:
            assert option.help, name


@pytest.mark.parametrize(("build", "error", "message"), [
    (lambda: LengthConfig(batch_size=0), ValueError, "batch_size must be in [1, inf], got 0"),
    (lambda: LengthConfig(epochs="3"), TypeError, "epochs must be a number, got '3'"),
    (lambda: LengthConfig(max_steps=2.5), TypeError, "max_steps must be an integer"),
    (lambda: ClusterConfig(workers=True), TypeError, "workers must be an integer, got True"),
    (lambda: ClusterConfig(spec="slurm"), ValueError, "cluster must be 'local', 'ray' or"),
    (lambda: CheckpointConfig(every="5m"), ValueError, "--checkpoint-every expects N (versions)"),
    (lambda: DataConfig(dataset=""), TypeError, "dataset must be a non-empty string"),
    (lambda: RunConfig(data="mnist"), TypeError, "data must be a DataConfig"),
    (lambda: RunConfig(seed=1.5), TypeError, "seed must be an integer"),
    (lambda: RunConfig(strategy="downpour"), TypeError, "strategy must be a strategy's config"),
    (lambda: RunConfig.of(lrr=0.1), TypeError, "unknown run option 'lrr'; the options are:"),
    (lambda: RunConfig.of(optimizer="adamm"), ValueError, "unknown optimizer 'adamm'"),
    (lambda: RunConfig.of(strategy=dp.Allreduce(), checkpoint_every=10), ValueError,
     "checkpoints, server restarts and --resume are for the parameter-server strategies "
     "(downpour, sync); 'allreduce' keeps its state in its workers"),
    (lambda: RunConfig.of(strategy=dp.Hogwild(), restart_workers=True), ValueError,
     "restart_workers is for downpour, sync, allreduce and local-sgd"),
    (lambda: RunConfig.of(strategy=dp.Downpour(), resume=True), ValueError,
     "resume needs the run_dir of the stopped run"),
])
def test_mistakes_are_named(build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_options_are_set_by_name_or_by_section():
    base = RunConfig.of(strategy=dp.Downpour(), workers=4, lr=0.1)
    config = RunConfig.of(base, optimizer=dp.optim("adam", lr=1e-3), epochs=2, data_dir="/tmp")
    assert config.cluster.workers == 4 and config.strategy == dp.Downpour()  # kept from base
    assert config.optimizer == dp.optim("adam", lr=1e-3) and config.length.epochs == 2
    assert config.data.data_dir == "/tmp" and config.value("lr") == 1e-3
    assert RunConfig.of(optimizer="momentum").optimizer.kwargs["momentum"] == 0.9
    assert set(config.changed()) == {"optimizer", "lr", "epochs", "data_dir", "workers"}
    assert leaves({"faults": dp.Faults(kill={1: 2.0})})["faults.kill"] == {1: 2.0}
    assert dataclasses.replace(config, seed=3).seed == 3  # frozen, and a plain dataclass


def test_a_kill_at_a_step_reaches_the_job():
    config = RunConfig.of(strategy=dp.Downpour(), workers=2,
                          faults=dp.Faults(kill_at_step={1: 200}))
    job = config.job(model=lambda: None, loss=None, data=None)
    assert job.faults.kill_at_step == {1: 200} and job.workers == 2


# ------------------------------------------------------------------ nothing silently ignored
def test_sandblaster_through_the_api_names_every_option_it_does_not_read(monkeypatch):
    # Refused before the data is loaded or anything starts.
    monkeypatch.setattr(dp.data, "load", lambda *a, **k: pytest.fail("loaded the data"))
    with pytest.raises(ValueError) as error:
        dp.train(model="logistic", data="digits", strategy="sandblaster", save=False,
                 optimizer=dp.optim("adam", lr=5), epochs=3, batch_size=7)
    message = str(error.value)
    assert message.startswith("strategy 'sandblaster' does not read optimizer (")
    for said in ("epochs (", "batch_size (", "Sandblaster(method=...)",
                 "Sandblaster(max_iterations=...)"):
        assert said in message, said


@pytest.mark.parametrize(("strategy", "values", "said"), [
    (dp.Single(), {"workers": 2}, "'single' does not read workers"),
    (dp.Single(), {"servers": 2}, "'single' does not read servers (it has no parameter servers)"),
    (dp.Single(), {"faults": dp.Faults(slow={0: 2.0})}, "'single' does not read faults"),
    (dp.Hogwild(), {"servers": 2, "workers": 2}, "'hogwild' does not read servers"),
    (dp.Dane(), {"workers": 2, "lr": 0.1}, "Dane(local_lr=...)"),
    (dp.Dane(), {"workers": 2, "batch_size": 8}, "Dane(local_batch_size=...)"),
    (dp.Boost(), {"workers": 2, "max_steps": 8}, "Boost(num_rounds=...)"),
    (dp.Sandblaster(), {"max_seconds": 8}, "Sandblaster(max_iterations=...)"),
    (dp.Sandblaster(), {"eval_every": 8}, "it evaluates once, at the end"),
])
def test_an_option_set_for_a_strategy_that_does_not_read_it_is_an_error(strategy, values, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        RunConfig.of(strategy=strategy, **values)


def test_only_an_option_that_differs_from_its_default_is_set():
    # As the API is called with every strategy alike: values at their defaults are no choice.
    RunConfig.of(strategy=dp.Sandblaster(), epochs=1.0, batch_size=64, servers=2, workers=4)
    RunConfig.of(strategy=dp.Single(), workers=1, servers=1, faults=dp.Faults())
    RunConfig.of(strategy=dp.SelfieBoost(), epochs=2, batch_size=8, lr=0.1, workers=2)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_what_a_strategy_ignores_names_real_options_and_its_own_fields(name):
    cls = STRATEGIES[name]
    sections = {option.section for option in options().values()}
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, hint in cls.ignores.items():
        assert key in options() or key in sections, (name, key)
        placeholders = {f for _, f, _, _ in string.Formatter().parse(hint) if f}
        assert placeholders <= fields, (name, key, placeholders - fields)
    # Nothing it is asked to ignore is something it must read to run at all.
    assert not unread(cls(), ["seed", "model", "dataset", "device"])


def test_compare_refuses_an_option_none_of_its_strategies_reads():
    with pytest.raises(ValueError, match=re.escape(
            "none of the strategies compared (allreduce, hogwild) reads servers")):
        dp.compare(strategies=["allreduce", "hogwild"], servers=2, model="logistic", data="digits")
    with pytest.raises(TypeError, match="compare sets run_dir for each run; use out_dir"):
        dp.compare(strategies=["sync"], run_dir="x")


def test_compare_gives_each_run_what_its_strategy_reads(monkeypatch, tmp_path):
    module = sys.modules["downpour.compare"]
    configs = []
    monkeypatch.setattr(module, "train", lambda config, **kwargs: configs.append(config))
    monkeypatch.setattr(module, "write_comparison_report", lambda *a: {"rows": []})
    digits = dp.data.load("digits")
    module.compare(strategies=["sync", "allreduce", "single"], data=digits, workers=2, servers=2,
                   lr=0.1, faults=dp.Faults(slow={1: 2.0, 3: 2.0}), budget_seconds=9,
                   out_dir=tmp_path)
    sync, allreduce, single = configs
    assert (sync.cluster.servers, allreduce.cluster.servers, single.cluster.servers) == (2, 1, 1)
    assert sync.faults == allreduce.faults == dp.Faults(slow={1: 2.0})  # rank 3 is not in the run
    assert single.faults == dp.Faults() and single.cluster.workers == 1
    assert all(c.optimizer.lr == 0.1 and c.length.max_seconds == 9 for c in configs)
    assert sync.output.run_dir == str(tmp_path / "sync-w2")


def test_train_takes_a_whole_config():
    config = RunConfig.of(dataset="digits", model="logistic", max_steps=3, seed=2)
    result = dp.train(config=config, save=False)
    assert result.summary["steps"] == 3 and result.summary["dataset"] == "digits"
    assert result.summary["model"] == "logistic"

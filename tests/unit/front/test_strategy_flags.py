"""Strategy options on the command line: --STRATEGY.OPTION flags, [STRATEGY] tables, --resume."""

import json
import re

import pytest

import downpour as dp
from downpour.cli import build_parser, main, option_defaults
from downpour.run import RunConfig
from tests.unit.front.cli_helpers import error, flag_help


def _group(help_text: str, title: str) -> str:
    match = re.search(rf"^{re.escape(title)}:\n(.*?)(?=^\S|\Z)", help_text,
                      re.MULTILINE | re.DOTALL)
    assert match, f"no group {title!r} in --help"
    return match[1]


def test_namespaced_flags_configure_the_chosen_strategy(trained):
    assert main(["train", "--strategy", "downpour", "--downpour.push-every", "4",
                 "--downpour.ema-decay", "0.99", "--downpour.evaluate-average",
                 "--downpour.no-sparse-push", "--downpour.staleness", "scale-lr", "--quiet"]) == 0
    [call] = trained
    assert call["config"].strategy == dp.Downpour(push_every=4, ema_decay=0.99,
                                                  evaluate_average=True, sparse_push=False,
                                                  staleness="scale-lr")


def test_a_dashed_strategy_name_takes_its_flags(trained):
    assert main(["train", "--strategy", "local-sgd", "--local-sgd.average-every", "2",
                 "--local-sgd.partition", "dirichlet", "--quiet"]) == 0
    assert trained[0]["config"].strategy == dp.LocalSGD(average_every=2, partition="dirichlet")


@pytest.mark.parametrize(("argv", "message"), [
    (["--downpour.push-every", "x"], "argument --downpour.push-every: invalid int value: 'x'"),
    (["--downpour.staleness", "old"], "argument --downpour.staleness: invalid choice: 'old'"),
])
def test_a_flag_takes_its_fields_type(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--strategy", "downpour", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_each_strategys_own_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    sync, downpour = _group(out, "sync options"), _group(out, "downpour options")
    assert "--sync.ema-decay" in sync and "--downpour.ema-decay" not in sync
    assert "--downpour.ema-decay" in downpour and "--sync.ema-decay" not in downpour
    assert flag_help(out, "--sync.ema-decay").endswith("(default: 0.99)")
    assert flag_help(out, "--downpour.ema-decay").endswith("(default: unset)")
    assert flag_help(out, "--sandblaster.gtol").endswith("(default: 1e-05)")
    assert flag_help(out, "--dane.gtol").endswith("(default: 0)")
    assert flag_help(out, "--selfieboost.sample-size").endswith("(default: 8192)")
    assert flag_help(out, "--boost.sample-size").endswith("(default: unset)")
    # The field's own description comes from the config's docstring.
    assert flag_help(out, "--downpour.push-every").startswith("INT n_push, steps whose gradients")
    assert flag_help(out, "--downpour.sparse-push, --downpour.no-sparse-push").endswith(
        "(default: true)")


def test_a_foreign_strategys_flag_is_named(capsys, trained):
    err = error(capsys, ["train", "--strategy", "sync", "--downpour.push-every", "4"])
    assert "--downpour.push-every is for strategy 'downpour', but --strategy is 'sync'" in err
    err = error(capsys, ["train", "--sync.backup", "1"])  # the default strategy, single
    assert "--sync.backup" in err and "--strategy is 'single'" in err
    assert not trained


def test_compare_refuses_options_of_a_strategy_it_does_not_run(capsys):
    err = error(capsys, ["compare", "--strategies", "sync,allreduce", "--sync.backup", "1",
                          "--downpour.push-every", "4"])
    assert ("--downpour.push-every is for strategy 'downpour', which --strategies sync,allreduce "
            "does not name") in err


def test_a_worker_refuses_the_other_strategys_flag(capsys):
    err = error(capsys, ["worker", "--servers", "127.0.0.1:1", "--rank", "0", "--of", "2",
                          "--token", "t", "--strategy", "sync", "--downpour.push-every", "4"])
    assert "--downpour.push-every is for strategy 'downpour', but --strategy is 'sync'" in err


def test_config_file_tables_and_flags_win(tmp_path, trained):
    config = tmp_path / "job.toml"
    config.write_text('strategy = "downpour"\nlr = 0.01\n\n'
                      "[downpour]\npush_every = 4\nfetch-every = 2\nema_decay = 0.9\n")
    assert main(["train", "--config", str(config), "--downpour.push-every", "8", "--lr", "0.02",
                 "--quiet"]) == 0
    [call] = trained
    assert call["config"].strategy == dp.Downpour(push_every=8, fetch_every=2, ema_decay=0.9)
    assert call["config"].optimizer.lr == 0.02
    assert call["options"]["downpour"] == {"push_every": 8, "fetch_every": 2, "ema_decay": 0.9}


def test_a_config_table_for_another_strategy_is_named(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text('[downpour]\npush_every = 4\n')
    err = error(capsys, ["train", "--config", str(config), "--strategy", "sync"])
    assert f"[downpour] push_every in config file {config} is for strategy 'downpour'" in err


@pytest.mark.parametrize(("text", "message"), [
    ('[downpour]\npush_every = "4"\n', "[downpour] push_every must be an integer, got '4'"),
    ("[downpour]\nstaleness = \"old\"\n", "[downpour] staleness must be one of 'none', 'scale-lr'"),
    ("[downpour]\nevaluate_average = 1\n", "[downpour] evaluate_average must be true or false"),
    ("[downpour]\npush_everyy = 4\n", "[downpour] has no option 'push_everyy'; it has: fetch_"),
    ("[downpor]\npush_every = 4\n", "unknown table [downpor]"),
    ("push_every = 4\n", "'push_every' is a strategy option; put it in its strategy's table"),
    ("ema_decay = 0.9\n", "[downpour] or [sync]"),
])
def test_config_file_strategy_mistakes_are_named(text, message, tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text(text)
    assert message in error(capsys, ["train", "--config", str(config), "--strategy", "downpour"])


def test_resume_rebuilds_the_strategy_from_config_json(tmp_path, trained):
    assert main(["train", "--strategy", "sync", "--sync.backup", "1", "--sync.late", "fold",
                 "--sync.no-evaluate-average", "--workers", "3", "--quiet"]) == 0
    first = trained.pop()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # As downpour.train keeps them: JSON, through a file.
    (run_dir / "config.json").write_text(json.dumps({"options": first["options"]}))
    assert main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    resumed = trained.pop()["config"]
    assert resumed.strategy == first["config"].strategy == dp.Sync(backup=1, late="fold")
    assert resumed.cluster.workers == 3 and resumed.checkpoint.resume
    assert resumed.output.run_dir == str(run_dir)


def test_resume_reads_a_run_from_before_options_were_namespaced(tmp_path, trained):
    options = {**option_defaults(), "strategy": "downpour", "strategy_options": {"push_every": 3}}
    (tmp_path / "config.json").write_text(json.dumps({"options": options}))
    assert main(["train", "--resume", str(tmp_path), "--quiet"]) == 0
    assert trained[0]["config"].strategy == dp.Downpour(push_every=3)


def test_resume_refuses_a_strategy_flag(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"options": option_defaults()}))
    err = error(capsys, ["train", "--resume", str(tmp_path), "--downpour.push-every", "2"])
    assert "--resume takes the run's own options; drop --downpour.push-every" in err


def test_hand_started_roles_default_to_trains_optimizer():
    parser = build_parser()
    server = parser.parse_args(["server", "--shard", "0", "--of", "1"])
    worker = parser.parse_args(["worker", "--servers", "127.0.0.1:1", "--rank", "0", "--of", "1"])
    defaults = RunConfig()
    for role in (server, worker):
        assert (role.optimizer, role.lr) == (defaults.optimizer.name, defaults.optimizer.lr)
        assert (role.dataset, role.model, role.seed) == (
            defaults.data.dataset, defaults.model.name, defaults.seed)
    assert (worker.batch_size, worker.epochs) == (defaults.length.batch_size,
                                                  defaults.length.epochs)


def test_compare_is_exported():
    from downpour.compare import compare

    assert dp.compare is compare and "compare" in dp.__all__


def test_errors_through_the_command_line_name_its_flags(capsys):
    from downpour.cli import main

    assert main(["train", "--strategy", "downpour", "--downpour.evaluate-average", "--dataset", "digits",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--downpour.evaluate-average needs a moving average: set --downpour.ema-decay" in err, err

"""General options on the command line: from RunConfig, faults at a step, nothing ignored."""

import re

import pytest

import downpour as dp
from downpour.cli import _parse_faults, build_parser, general_options, main, option_defaults
from downpour.run import RunConfig
from tests.unit.front.cli_helpers import error, flag_help


def _help(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


# ------------------------------------------------------------------ nothing silently ignored
def test_sandblaster_names_every_option_it_does_not_read(capsys, trained):
    err = error(capsys, ["train", "--strategy", "sandblaster", "--optimizer", "adam", "--lr", "5",
                          "--epochs", "3", "--batch-size", "7"])
    assert "strategy 'sandblaster' does not read" in err
    for flag in ("--optimizer", "--lr", "--epochs", "--batch-size"):
        assert flag in err, flag
    # What to use instead, as flags of its own.
    assert "--sandblaster.method" in err and "--sandblaster.max-iterations" in err
    assert "--sandblaster.portions" in err
    assert not trained


def test_its_own_options_and_the_ones_it_reads_are_fine(trained):
    assert main(["train", "--strategy", "sandblaster", "--workers", "4", "--servers", "2",
                 "--sandblaster.max-iterations", "30", "--slow-worker", "1:2", "--quiet"]) == 0
    config = trained[0]["config"]
    assert config.strategy == dp.Sandblaster(max_iterations=30)
    assert (config.cluster.workers, config.cluster.servers) == (4, 2)


@pytest.mark.parametrize(("argv", "said"), [
    (["--strategy", "single", "--servers", "2"], "'single' does not read --servers"),
    (["--strategy", "hogwild", "--workers", "2", "--servers", "2"],
     "'hogwild' does not read --servers (it has no parameter servers)"),
    (["--strategy", "single", "--workers", "4"], "'single' does not read --workers"),
    (["--strategy", "single", "--kill-worker", "0@step=3"], "'single' does not read --kill-worker"),
    (["--strategy", "dane", "--epochs", "2", "--lr", "0.1"], "--dane.num-rounds"),
    (["--strategy", "dane", "--lr", "0.1"], "--dane.local-lr"),
    (["--strategy", "boost", "--epochs", "2"], "--boost.num-rounds and --boost.steps-per-round"),
    (["--strategy", "boost", "--eval-every", "5"], "--eval-every (the vote is evaluated"),
    (["--strategy", "allreduce", "--checkpoint-every", "10"], "parameter-server strategies"),
])
def test_an_option_a_strategy_does_not_read_is_anerror(argv, said, capsys, trained):
    err = error(capsys, ["train", *argv])
    assert said in err
    assert not trained


def test_a_given_option_counts_even_at_its_default_value(tmp_path, capsys, trained):
    # The user wrote it: a sandblaster run would not use it, whatever its value.
    err = error(capsys, ["train", "--strategy", "sandblaster", "--epochs", "1"])
    assert "does not read --epochs" in err
    config = tmp_path / "job.toml"
    config.write_text('strategy = "dane"\nbatch_size = 64\n')
    assert "'dane' does not read --batch-size" in error(capsys, ["train", "--config", str(config)])
    assert not trained


def test_the_options_each_strategy_reads_pass(trained):
    assert main(["train", "--strategy", "selfieboost", "--workers", "2", "--epochs", "0.5",
                 "--batch-size", "32", "--optimizer", "momentum", "--quiet"]) == 0
    assert main(["train", "--strategy", "dane", "--workers", "2", "--max-steps", "3",
                 "--quiet"]) == 0
    assert main(["train", "--strategy", "boost", "--workers", "2", "--batch-size", "16",
                 "--lr", "0.1", "--quiet"]) == 0
    assert len(trained) == 3


def test_compare_refuses_an_option_none_of_its_strategies_reads(capsys, compared):
    err = error(capsys, ["compare", "--strategies", "allreduce,hogwild", "--servers", "2"])
    assert "none of the strategies compared (allreduce, hogwild) reads --servers" in err
    assert not compared


def test_compare_hands_on_an_option_that_one_of_its_strategies_reads(compared):
    assert main(["compare", "--strategies", "sync,allreduce", "--servers", "2", "--workers", "2,4",
                 "--kill-worker", "1@step=20", "--budget-seconds", "30", "--quiet"]) == 0
    [call] = compared
    assert call["servers"] == 2 and call["workers"] == [2, 4] and call["max_seconds"] == 30
    assert call["faults"] == dp.Faults(kill_at_step={1: 20})


def test_compare_refuses_a_per_run_option_from_the_config_file(tmp_path, capsys, compared):
    config = tmp_path / "job.toml"
    config.write_text("run_dir = \"runs/x\"\n")
    err = error(capsys, ["compare", "--strategies", "sync", "--config", str(config)])
    assert "compare does not take 'run_dir'; use --out-dir" in err


# ------------------------------------------------------------------ faults at a step
@pytest.mark.parametrize(("kill", "faults"), [
    (["1@3.5"], dp.Faults(kill={1: 3.5})),
    (["1@3s"], dp.Faults(kill={1: 3.0})),
    (["1@step=200"], dp.Faults(kill_at_step={1: 200})),
    (["0@2", "1@ step = 7"], dp.Faults(kill={0: 2.0}, kill_at_step={1: 7})),
])
def test_kill_worker_takes_seconds_or_a_step(kill, faults):
    assert _parse_faults([], kill) == faults


@pytest.mark.parametrize(("kill", "kill_server", "message"), [
    (["1@step=x"], [], "--kill-worker expects RANK@SECONDS (1@3.5 or 1@3s) or RANK@step=N"),
    (["1@"], [], "--kill-worker expects"),
    (["x@3"], [], "--kill-worker expects"),
    (["1@3m"], [], "--kill-worker expects"),
    ([], ["0@step=3"], "--kill-server expects SHARD@SECONDS (1@3.5 or 1@3s) or SHARD@version=N"),
    (["1@version=3"], [], "--kill-worker expects RANK@SECONDS (1@3.5 or 1@3s) or RANK@step=N"),
])
def test_a_malformed_kill_is_named(kill, kill_server, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _parse_faults([], kill, kill_server)


def test_a_kill_at_a_step_reaches_the_run(trained, tmp_path):
    assert main(["train", "--strategy", "downpour", "--workers", "2", "--kill-worker", "1@step=200",
                 "--kill-worker", "0@4s", "--quiet"]) == 0
    assert trained[0]["config"].faults == dp.Faults(kill={0: 4.0}, kill_at_step={1: 200})
    config = tmp_path / "job.toml"  # the config file takes the same notation, by the same name
    config.write_text('strategy = "downpour"\nworkers = 2\nkill-worker = ["1@step=9"]\n')
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    assert trained[1]["config"].faults.kill_at_step == {1: 9}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_documents_a_kill_at_a_step(command, capsys):
    text = flag_help(_help(capsys, command), "--kill-worker")
    assert text.startswith("RANK@SECONDS|RANK@step=N") and "1@step=200" in text


# ------------------------------------------------------------------ derived from RunConfig
def test_every_general_flag_shows_its_runconfig_default(capsys):
    out = _help(capsys, "train")
    for name, option in general_options().items():
        prefix = "no-" if option.default is True else ""  # a switch on by default: --no-X
        flag = "--" + prefix + name.replace("_", "-")
        text = flag_help(out, flag)
        assert option.help.rstrip(".") in text, (flag, text)
        if option.default is not None and not isinstance(option.default, bool):
            shown = f"{option.default:g}" if isinstance(option.default, float) else option.default
            assert text.endswith(f"(default: {shown})"), (flag, text)


def test_the_defaults_of_the_command_line_are_runconfigs(trained):
    assert main(["train", "--quiet"]) == 0
    assert trained[0]["config"] == RunConfig.of(faults=dp.Faults())
    defaults = option_defaults()
    assert defaults["strategy"] == RunConfig().strategy.name and defaults["kill_worker"] == []
    assert {name: defaults[name] for name in general_options()} == {
        name: option.default for name, option in general_options().items()}


def test_a_new_flag_from_a_field(trained):
    assert main(["train", "--max-seconds", "2.5", "--quiet"]) == 0
    assert trained[0]["config"].length.max_seconds == 2.5


def test_model_options_are_flags_and_compare_hands_them_on(trained, compared):
    assert main(["train", "--model", "svm", "--l2", "1e-5", "--bias-lr", "0.01", "--quiet"]) == 0
    model = trained[0]["config"].model
    assert (model.l2, model.bias_lr) == (1e-5, 0.01)
    assert model.options() == {"l2": 1e-5, "bias_lr": 0.01}
    assert main(["compare", "--strategies", "single,hogwild", "--model", "svm", "--l2", "1e-5",
                 "--quiet"]) == 0
    assert compared[0]["l2"] == 1e-5 and compared[0].get("bias_lr") is None


@pytest.mark.parametrize(("text", "message"), [
    ('batch_size = "32"\n', "batch_size must be an integer, got '32'"),
    ("tensorboard = 1\n", "tensorboard must be true or false"),
    ("kill_worker = \"1@3\"\n", "kill_worker must be a list of strings"),
    ("lr = \"fast\"\n", "lr must be a number"),
])
def test_config_file_values_are_checked_against_their_fields(text, message, tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text(text)
    assert message in error(capsys, ["train", "--config", str(config)])


def test_roles_take_their_defaults_and_help_from_runconfig(capsys):
    worker = build_parser().parse_args(["worker", "--servers", "127.0.0.1:1", "--rank", "0",
                                        "--of", "2", "--epochs", "2"])
    assert worker.epochs == 2.0 and worker.batch_size == RunConfig().length.batch_size
    text = flag_help(_help(capsys, "server"), "--model")
    assert text.endswith(f"(default: {RunConfig().model.name})") and "one of:" in text


def test_a_shard_kill_at_a_version_reaches_the_run(trained):
    assert main(["train", "--strategy", "downpour", "--workers", "2", "--servers", "2",
                 "--kill-server", "1@version=450", "--kill-server", "0@3s", "--quiet"]) == 0
    assert trained[0]["config"].faults == dp.Faults(kill_server={0: 3.0},
                                                    kill_server_at_version={1: 450})
    with pytest.raises(ValueError, match="both by time and at a version"):
        dp.Faults(kill_server={1: 3.0}, kill_server_at_version={1: 450})

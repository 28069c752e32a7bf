import json
import subprocess
import sys

import pytest

from downpour.cli import build_parser, main
from downpour.metrics import RunDir

# The public CLI surface, frozen: a flag changes only on purpose (update this list with it).
CLI_SURFACE = {'compare': ['--batch-size', '--budget-seconds', '--cluster', '--config', '--data-dir', '--dataset', '--device',
             '--epochs', '--eval-every', '--help', '--kill-worker', '--lr', '--max-steps', '--model', '--optimizer',
             '--out-dir', '--quiet', '--schedule', '--seed', '--servers', '--slow-worker', '--strategies',
             '--target-accuracy', '--tensorboard', '--warmup-steps', '--workers'],
 'report': ['--help', '--json'],
 'server': ['--bind', '--data-dir', '--dataset', '--ema-decay', '--events', '--help', '--insecure', '--late',
            '--lr', '--max-staleness', '--model', '--num-required', '--of', '--optimizer', '--policy', '--scale-lr',
            '--seed', '--shard', '--threads', '--tls-ca', '--tls-cert', '--tls-key', '--token', '--token-file'],
 'token': ['--file', '--help'],
 'train': ['--alpha', '--average-every', '--backend', '--backup', '--backups', '--batch-size', '--beta',
           '--bucket-cap-mb', '--checkpoint-every', '--clients-per-round', '--cluster', '--compress', '--config',
           '--coordinator-device', '--data-dir', '--dataset', '--device', '--ema-decay', '--ensemble', '--epochs',
           '--eps', '--eta', '--eval-every', '--evaluate-average', '--fanout', '--fetch-every', '--ftol', '--gtol',
           '--handoff-timeout', '--help', '--kill-server', '--kill-worker', '--l2', '--late', '--local',
           '--local-batch-size', '--local-lr', '--local-steps', '--lock', '--log-every', '--lr', '--max-iterations',
           '--max-staleness', '--max-steps', '--memory', '--method', '--model', '--mu', '--no-backups',
           '--no-ensemble', '--no-evaluate-average', '--no-lock', '--no-round-robin', '--no-sparse-push',
           '--no-warm-start', '--num-rounds', '--optimizer', '--partition', '--portions', '--push-every', '--quiet',
           '--restart-workers', '--resume', '--round-robin', '--rounds', '--run-dir', '--sample-size', '--schedule',
           '--seed', '--send-every', '--server-optimizer', '--servers', '--slow-worker', '--snapshot-every',
           '--sparse-push', '--sparse-updates', '--staleness', '--step', '--steps-per-round', '--steps-per-turn',
           '--strategy', '--sync-warmup-steps', '--target-accuracy', '--tensorboard', '--warm-start',
           '--warmup-steps', '--workers'],
 'worker': ['--backup', '--batch-size', '--compress', '--data-dir', '--dataset', '--epochs', '--evaluate',
            '--events', '--fetch-every', '--help', '--lr', '--model', '--of', '--optimizer', '--push-every',
            '--rank', '--seed', '--servers', '--shutdown-servers', '--strategy', '--timeout', '--tls-ca',
            '--tls-cert', '--tls-key', '--token', '--token-file']}
TRAIN_FLAGS = set(CLI_SURFACE["train"])
COMMANDS = set(CLI_SURFACE)


def _subparsers(parser):
    [action] = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_cli_surface_is_frozen():
    commands = _subparsers(build_parser())
    assert set(commands) == COMMANDS
    for command, flags in CLI_SURFACE.items():
        found = sorted({s for a in commands[command]._actions for s in a.option_strings if s.startswith("--")})
        assert found == flags, command


@pytest.mark.parametrize("command", [[], ["train"], ["report"]])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: downpour" in out
    if command == ["train"]:
        for flag in TRAIN_FLAGS:
            assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--strategy", "downpor"], "unknown strategy 'downpor'; choose one of:"),
        (["train", "--dataset", "mnits", "--max-steps", "1"], "unknown dataset 'mnits'; choose one of:"),
        (["train", "--dataset", "digits", "--model", "mlpp"], "unknown model 'mlpp'; choose one of:"),
        (["train", "--dataset", "digits", "--optimizer", "adamm"], "unknown optimizer 'adamm'"),
        (["train", "--dataset", "digits", "--batch-size", "0"], "batch_size must be in [1, inf], got 0"),
        (["train", "--dataset", "digits", "--target-accuracy", "3"], "target_accuracy must be in [0, 1]"),
        (["train", "--dataset", "digits", "--slow-worker", "x"], "--slow-worker expects RANK:NUMBER"),
        (["train", "--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
        (["report", "/nonexistent-run"], "is not a run directory"),
    ],
)
def test_user_errors_exit_non_zero_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("downpour: error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="unknown strategy"):
        main(["--debug", "train", "--strategy", "nope"])


def test_train_then_report_from_events_alone(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text('dataset = "digits"\nmodel = "logistic"\noptimizer = "adam"\nlr = 0.05\nepochs = 3\n'
                      'batch-size = 32\n')
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), "--epochs", "2", "--run-dir", str(run_dir), "--quiet",
                 "--target-accuracy", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out
    for name in ("config.json", "events.jsonl", "model.safetensors", "loss.png", "accuracy.png", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    config_json = json.loads((run_dir / "config.json").read_text())
    assert config_json["epochs"] == 2 and config_json["model"] == "logistic"  # the flag beat the file
    assert summary["strategy"] == "single" and summary["dataset"] == "digits"
    assert summary["accuracy"] >= 0.5 and summary["time_to_target"] is not None

    for name in ("loss.png", "accuracy.png", "summary.json"):
        (run_dir / name).unlink()
    assert main(["report", str(run_dir), "--json"]) == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt == summary
    assert (run_dir / "loss.png").stat().st_size > 1000 and (run_dir / "accuracy.png").is_file()
    RunDir(run_dir).read_summary()


def test_unknown_config_key_is_named(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("lrr = 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown key 'lrr'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "downpour.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "report" in out.stdout

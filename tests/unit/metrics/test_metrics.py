import json

import pytest
import torch

from downpour.metrics import (
    SUMMARY_KEYS,
    JsonlSink,
    MemorySink,
    Metrics,
    RunDir,
    plot_run,
    read_events,
    summarize,
)


def _events():
    return [
        {"time": 0.5, "role": "coordinator", "rank": 0, "step": 10, "eval/accuracy": 0.5, "eval/loss": 1.0},
        {"time": 0.6, "role": "worker", "rank": 0, "step": 10, "train/loss": 0.9, "comm/bytes_sent": 100},
        {"time": 0.7, "role": "worker", "rank": 1, "step": 10, "train/loss": 0.8, "comm/bytes_sent": 50},
        {"time": 0.8, "role": "worker", "rank": 0, "step": 20, "comm/bytes_sent": 300, "comm/pushes": 4,
         "worker/dropped": 2},
        {"time": 0.9, "role": "server", "rank": 0, "step": 3, "ps/staleness": [0, 1, 2], "ps/dropped": 2},
        {"time": 1.0, "role": "server", "rank": 0, "step": 5, "ps/staleness_counts": {"0": 1, "4": 1}},
        {"time": 1.5, "role": "coordinator", "rank": 0, "step": 20, "eval/accuracy": 0.9, "eval/loss": 0.3},
        {"time": 2.0, "role": "coordinator", "rank": 0, "step": 30, "eval/accuracy": 0.85, "eval/loss": 0.35},
        {"time": 2.1, "role": "coordinator", "rank": 0, "step": 30, "event": "end", "run/steps": 30,
         "run/samples": 960, "run/seconds": 2.1, "run/train_seconds": 1.6},
    ]


def test_summary_is_computed_from_events():
    config = {"strategy": "x", "dataset": "d", "model": "m", "workers": 2, "servers": 1,
              "target_accuracy": 0.8, "run_dir": "r"}
    s = summarize(_events(), config)
    assert tuple(s) == SUMMARY_KEYS
    assert s["accuracy"] == 0.85 and s["best_accuracy"] == 0.9 and s["loss"] == 0.35
    assert s["time_to_target"] == 1.5
    assert s["samples"] == 960 and s["steps"] == 30 and s["samples_per_second"] == pytest.approx(600)
    assert s["bytes_sent"] == 350  # last value per role, summed over roles
    assert s["pushes"] == 4 and s["dropped_gradients"] == 2
    assert s["staleness_max"] == 4 and s["staleness_mean"] == pytest.approx(7 / 5)


def test_target_not_reached_is_null():
    s = summarize(_events(), {"target_accuracy": 0.95})
    assert s["time_to_target"] is None


def test_jsonl_sink_round_trip(tmp_path):
    sink = JsonlSink(tmp_path / "events.jsonl", flush_every=1)
    metrics = Metrics([sink, MemorySink()], role="worker", rank=2)
    metrics.log(7, {"train/loss": torch.tensor(0.25), "nan": float("nan")})
    metrics.close()
    [event] = list(read_events(tmp_path / "events.jsonl"))
    assert event["role"] == "worker" and event["rank"] == 2 and event["step"] == 7
    assert event["train/loss"] == 0.25 and event["nan"] is None


def test_read_events_names_a_malformed_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"a": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"events.jsonl:2"):
        list(read_events(path))


def test_run_dir_files(tmp_path):
    run = RunDir.create(tmp_path / "run", "single")
    run.write_config({"a": 1})
    run.write_summary({"accuracy": 0.5})
    model = torch.nn.Linear(3, 2)
    run.save_model(model)
    copy = run.load_model_(torch.nn.Linear(3, 2))
    assert torch.equal(copy.weight, model.weight)
    assert run.read_config() == {"a": 1} and json.loads((run.path / "summary.json").read_text())["accuracy"] == 0.5
    paths = plot_run(_events(), run.path)
    assert [p.name for p in paths] == ["loss.png", "accuracy.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_run_dir_refuses_to_overwrite_a_run(tmp_path):
    run = RunDir.create(tmp_path / "run", "single")
    (run.path / RunDir.EVENTS).write_text("")
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunDir.create(tmp_path / "run", "single")

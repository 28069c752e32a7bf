"""The progress a user watches says what the summary will say."""

from __future__ import annotations

import io
import re

import pytest

import downpour as dp
from downpour.strategies import STRATEGIES
from downpour.metrics import ProgressSink


def plain(events, total=100):
    stream = io.StringIO()
    sink = ProgressSink(total, "downpour", terminal=False, interval=1.0, stream=stream)
    for event in events:
        sink.write(event)
    sink.close()
    return stream.getvalue().splitlines()


def test_without_a_terminal_progress_is_whole_lines_at_an_interval():
    events = [{"time": 0.0, "role": "coordinator", "event": "start", "progress/total": 40}]
    events += [{"time": 0.1 * i, "role": "worker", "rank": i % 2, "worker/steps": i, "worker/samples": 32 * i,
                "train/loss": 1.0 / i} for i in range(1, 30)]
    lines = plain(events)
    assert 2 <= len(lines) <= 4, lines  # one a second over about three seconds
    assert all(line.startswith("downpour: steps ") and "/40" in line for line in lines), lines


def test_the_last_line_has_the_summarys_samples_per_second_and_a_full_count():
    events = [{"time": 0.0, "role": "coordinator", "event": "start", "progress/total": 40},
              {"time": 1.0, "role": "worker", "rank": 0, "worker/steps": 42, "worker/samples": 1344},
              {"time": 2.0, "role": "coordinator", "event": "end", "run/steps": 42, "run/samples": 1344,
               "run/train_seconds": 1.5}]
    last = plain(events)[-1]
    assert "steps 42/42" in last, last  # a run that took more steps than planned does not end past the end
    assert "896 samples/s" in last, last  # 1344 / 1.5: the summary's definition


def test_a_negative_objective_is_labelled_as_one():
    events = [{"time": 0.0, "event": "start"},
              {"time": 9.0, "role": "worker", "rank": 0, "worker/steps": 3, "train/objective": -0.0989}]
    assert "objective -0.0989" in plain(events)[-1]


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["single", "downpour"])
def test_a_runs_progress_ends_with_its_summary(strategy, capsys):
    result = dp.train(model="logistic", data="digits", strategy=strategy, workers=workers(strategy), epochs=1,
                      progress=True, save=False)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    rate = float(re.search(r"([\d,]+) samples/s", last).group(1).replace(",", ""))
    assert abs(rate - result.summary["samples_per_second"]) <= 1, (last, result.summary)
    steps = re.search(r"steps (\d+)/(\d+)", last)
    assert int(steps.group(1)) == result.summary["steps"], last


def workers(strategy: str) -> int:
    return 2 if STRATEGIES[strategy].takes_workers else 1


def test_a_run_that_never_starts_draws_no_bar():
    # Resuming a finished run is refused before its start mark: no empty "0/1875" bar first.
    stream = io.StringIO()
    sink = ProgressSink(1875, "downpour", terminal=True, stream=stream)
    sink.close()
    assert stream.getvalue() == ""

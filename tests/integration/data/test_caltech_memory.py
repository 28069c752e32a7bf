"""A Caltech-101-shaped folder trains a CNN with downpour, the images never held in memory.

101 classes of generated JPEGs of about 300 x 200 (45 each: 4,545 images,
about 2.8 GB decoded at full size as float32); downpour with 2 workers and
1 shard trains the reference CNN at 64 x 64 for 300 steps a worker, in a
fresh process, and every process's peak resident memory is measured
(``downpour.metrics.memory``). The bound is stated once, below: what torch
and the CNN take, with room, far under the decoded images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.data.caltech import CLASSES, make_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

PER_CLASS = 45
STEPS = 300
# Peak resident memory allowed to the coordinator and to each worker. A process that has
# imported torch holds about 260 MB; the CNN, its optimizer and a batch of activations add
# about 250 MB more. The in-memory form would hold every decoded image: 2.8 GB.
BOUND = 768 * 2**20


@pytest.fixture(scope="module")
def caltech(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("caltech"), per_class=PER_CLASS)


def test_caltech_shaped_folder_trains_within_the_memory_bound(caltech, tmp_path):
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.data.caltech", str(caltech),
         "--steps", str(STEPS), "--run-dir", str(tmp_path / "run")],
        cwd=root, env=env, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["classes"] == CLASSES and figures["images"] == CLASSES * PER_CLASS
    assert figures["steps"] == 2 * STEPS
    decoded = figures["decoded_train_bytes"]
    assert decoded > 3 * BOUND  # the bound is far under what the images take decoded
    workers = {title: peak for title, peak in figures["role_peak_bytes"].items()
               if "worker" in title}
    assert len(workers) == 2, figures["role_peak_bytes"]
    assert figures["coordinator_peak_bytes"] < BOUND, figures
    for title, peak in workers.items():
        assert peak < BOUND, (title, peak, figures)
    # It learnt: the test loss is below the first training loss and beyond chance accuracy.
    assert figures["loss"] < figures["first_loss"]
    assert figures["accuracy"] > 3 / CLASSES
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == "imagefolder" and summary["metric_name"] == "accuracy"

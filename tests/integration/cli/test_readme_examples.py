"""Every example line of the README's quickstart runs as written, scaled down, through the CLI.

The lines are read from README.md itself, so an example that changes is tested as it now reads.
Each runs with its own flags plus one that shortens it (a step cap, or a batch method's iteration
cap); lines that state a figure (``# 98.1%``) run at full scale and are held to it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from downpour.strategies import STRATEGIES

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# What shortens a run of each strategy, where a step cap is not what it reads.
SHORTER = {
    "sandblaster": ["--sandblaster.max-iterations", "2"],
    "dane": ["--dane.num-rounds", "1"],
    "boost": ["--boost.num-rounds", "1", "--boost.steps-per-round", "5"],
}
# Lines left to their own tests: Ray clusters (tests/integration/cluster/test_ray.py), a resume
# (test_recovery.py), and commands that train nothing.
ELSEWHERE = ("--cluster ray", "--resume", "downpour report", "--help")


def quickstart_lines() -> list[str]:
    """The ``downpour train`` and ``compare`` lines of README's quickstart, continuations joined."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.startswith(".venv/bin/downpour ")]


EXAMPLES = [line for line in quickstart_lines() if not any(skip in line for skip in ELSEWHERE)]


def stated_figure(line: str) -> float | None:
    """The accuracy a line's comment states (``# 98.1% ...``), as a fraction."""
    match = re.search(r"#\s*([\d.]+)%", line)
    return float(match.group(1)) / 100 if match else None


def run(line: str, tmp_path: Path, *, full: bool) -> dict:
    command, _, comment = line.partition("#")
    argv = shlex.split(command)[1:]  # the CLI's arguments, after .venv/bin/downpour
    kind = argv[0]
    if "--run-dir" in argv:
        argv[argv.index("--run-dir") + 1] = str(tmp_path / "run")
    elif kind == "train":
        argv += ["--run-dir", str(tmp_path / "run")]
    else:
        argv += ["--out-dir", str(tmp_path / "comparison")]
    if not full and kind == "train":
        strategy = argv[argv.index("--strategy") + 1]
        argv += SHORTER.get(strategy, ["--max-steps", "20"])
    out = subprocess.run([sys.executable, "-m", "downpour.cli", *argv, "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=540, check=False)
    assert out.returncode == 0, f"{line}\n{out.stderr[-3000:]}"
    if kind == "train":
        return json.loads((tmp_path / "run" / "summary.json").read_text())
    return json.loads((tmp_path / "comparison" / "comparison.json").read_text())


def test_the_quickstart_has_examples_of_every_strategy_it_documents():
    named = {line.split("--strategy ")[1].split()[0] for line in EXAMPLES if "--strategy " in line}
    assert named <= set(STRATEGIES), named - set(STRATEGIES)
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("line", EXAMPLES, ids=lambda line: " ".join(line.split()[1:4]))
def test_a_readme_example_runs_and_reaches_the_figure_it_states(line, tmp_path):
    figure = stated_figure(line)
    if " compare " in f" {line} ":
        rows = run(line, tmp_path, full=True)["rows"]
        target = float(line.split("--target-accuracy ")[1].split()[0])
        # "all reach 95%": every strategy's time to target is set, and its accuracy is the target's.
        assert all(row["time_to_target"] is not None for row in rows), rows
        assert all(row["accuracy"] >= target for row in rows), rows
        assert {row["strategy"] for row in rows} >= {"single"}
        return
    summary = run(line, tmp_path, full=figure is not None)
    assert summary["diverged"] is False, summary
    if figure is not None:
        assert summary["accuracy"] >= figure - 0.005, (summary["accuracy"], figure)
        assert summary["degenerate"] is False

"""A script that trains at module level, outside ``if __name__ == "__main__":``, fails clearly.

Each local role process imports the main module before it runs its role, so
such a script would start its run again in every role. The run ends with one
UnguardedMain naming the script, not a traceback per role and "process
exited with code 1", and leaves no process behind.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.waiting import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

TRAIN = ('dp.train(model="logistic", data="digits", strategy="allreduce", workers=2, epochs=0.2,\n'
         '         save=False, progress=False)')
# The start method a run's roles use; "spawn" is the fallback where there is no forkserver.
START_METHOD = textwrap.dedent("""
    import multiprocessing
    import downpour.cluster.local as local
    local._context = lambda: multiprocessing.get_context("spawn")
""")


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the script's and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(entry.name))
    return found


def _run_script(path: Path, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """Run ``path`` in a session of its own; fail if any process of it outlives it."""
    proc = subprocess.Popen([sys.executable, str(path)], cwd=path.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        # The fork server and the roles leave once the script is gone.
        wait_until(lambda: not _session(proc.pid), timeout=15,
                   what=f"the script's processes leaving (left: {_session(proc.pid)})")
    finally:
        for pid in [proc.pid, *_session(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_run_started_at_module_level_fails_with_one_clear_error(tmp_path, start_method):
    script = tmp_path / "unguarded.py"
    setup = START_METHOD if start_method == "spawn" else ""
    script.write_text(f"import downpour as dp\n{setup}\n{TRAIN}\n")
    done = _run_script(script)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr  # one error, not one per role
    assert (f"downpour.errors.UnguardedMain: the script {script} must guard its entry point with "
            'if __name__ == "__main__":') in done.stderr
    assert "re-import" in done.stderr  # why
    assert "bootstrapping phase" not in done.stderr and "exited with code" not in done.stderr


def test_a_guarded_script_trains(tmp_path):
    script = tmp_path / "guarded.py"
    body = f"result = {TRAIN}\nprint('trained', result.summary is not None)"
    body = textwrap.indent(body, "    ")
    script.write_text(f'import downpour as dp\n\nif __name__ == "__main__":\n{body}\n')
    done = _run_script(script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "trained True"

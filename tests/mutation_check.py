"""Break the code on purpose and check that the suite notices: every mutation must fail a test.

Each mutation replaces one statement of the package in a copy of this checkout (the checkout
itself is never touched), then runs the tests that should catch it; the check passes when every
mutation makes them fail. Run by hand (minutes; not part of the suite):

    .venv/bin/python tests/mutation_check.py [--only NAME ...] [--keep]

The copy lies beside this checkout's ``shared/`` folder, as the tests expect their data there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the checkout
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: node ids or files with -k


MUTATIONS = [
    Mutation("buffers not returned", "src/downpour/flat/buffers.py",
             '    """Copy buffers encoded by :func:`encode_buffers` into ``module``\'s own, in place."""\n',
             '    """Copy buffers encoded by :func:`encode_buffers` into ``module``\'s own, in place."""\n'
             "    return\n",
             ("tests/integration/strategies/test_conformance.py", "-k", "downpour or allreduce")),
    Mutation("bytes halved", "src/downpour/strategies/collective.py",
             "moved = ring_allreduce_bytes(nbytes, self.num_workers)",
             "moved = ring_allreduce_bytes(nbytes, self.num_workers) // 2",
             ("tests/integration/strategies/test_allreduce_local_sgd.py::"
              "test_allreduce_4_workers_reaches_96_percent_in_one_epoch",)),
    Mutation("the slow worker not slowed", "src/downpour/strategies/worker.py",
             "if self.slow_factor > 1 and self._step_started is not None:",
             "if False and self._step_started is not None:",
             ("tests/integration/strategies/test_parameter_server.py", "-k", "slow")),
    Mutation("the killed worker not killed", "src/downpour/strategies/worker.py",
             "os.kill(os.getpid(), signal.SIGKILL)", "return",
             ("tests/integration/strategies/test_coordinator.py", "-k", "killed")),
    Mutation("push_every ignored", "src/downpour/strategies/downpour.py",
             "if pending == self.push_every:", "if pending >= 1:",
             ("tests/integration/strategies/test_options.py", "-k", "push_every")),
    Mutation("scale-lr ignored", "src/downpour/server/policy.py",
             "return 1.0 / max(1, staleness) if enabled else 1.0", "return 1.0",
             ("tests/integration/strategies/test_options.py", "-k", "scale_lr")),
    Mutation("compression bypassed", "src/downpour/strategies/parameter_server.py",
             "if self.streams and isinstance(update, torch.Tensor):",
             "if False and isinstance(update, torch.Tensor):",
             ("tests/integration/strategies/test_options.py", "-k", "compression or onebit")),
    # The byte figures against the bytes that crossed the kernel (a network namespace each).
    Mutation("bytes halved, against the wire", "src/downpour/strategies/collective.py",
             "moved = ring_allreduce_bytes(nbytes, self.num_workers)",
             "moved = ring_allreduce_bytes(nbytes, self.num_workers) // 2",
             ("tests/integration/transport/test_wire_bytes.py", "-k", "allreduce")),
    Mutation("ring allreduce formula wrong", "src/downpour/strategies/collective.py",
             "return 2 * (world_size - 1) * nbytes // world_size",
             "return (world_size - 1) * nbytes",
             ("tests/integration/transport/test_wire_bytes.py", "-k", "local-sgd or dane")),
    Mutation("push bytes doubled", "src/downpour/strategies/parameter_server.py",
             'counters = {"comm/bytes_sent": c.bytes_sent + c.bytes_shared_sent,',
             'counters = {"comm/bytes_sent": 2 * c.bytes_sent + c.bytes_shared_sent,',
             ("tests/integration/transport/test_wire_bytes.py", "-k", "downpour or sync")),
    Mutation("peer bytes halved", "src/downpour/strategies/decentralized.py",
             '"comm/bytes_sent": sum(c.bytes_sent for c in clients),',
             '"comm/bytes_sent": sum(c.bytes_sent for c in clients) // 2,',
             ("tests/integration/transport/test_wire_bytes.py", "-k", "decentralized")),
    Mutation("hand-off bytes doubled", "src/downpour/strategies/hot_potato.py",
             "self.bytes_received += buffer.numel() * 4",
             "self.bytes_received += buffer.numel() * 8",
             ("tests/integration/transport/test_wire_bytes.py", "-k", "hot-potato")),
]


def copy_checkout(where: Path) -> Path:
    """This checkout's src/ and tests/ (and pyproject.toml) in ``where/main``, with ``where/shared``."""
    copy = where / "main"
    for part in ("src", "tests", "pyproject.toml"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / part)
    shared = ROOT.parent / "shared"
    if shared.exists():
        (where / "shared").symlink_to(shared)
    return copy


def run(mutation: Mutation, copy: Path, *, mutate: bool = True) -> tuple[bool, float, str]:
    """Apply ``mutation`` in ``copy``, run its tests, undo it; (caught, seconds, last line of pytest).

    With ``mutate=False`` the same tests run on the code as it is (the control: they must pass).
    """
    target = copy / mutation.path
    original = target.read_text()
    if original.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: {mutation.old!r} is not once in {mutation.path}; update the check")
    if mutate:
        target.write_text(original.replace(mutation.old, mutation.new))
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                              *mutation.tests], cwd=copy, env=env, capture_output=True, text=True,
                             timeout=1800, check=False)
    finally:
        target.write_text(original)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    caught = out.returncode == 1  # tests ran and failed (5: none collected, 2/3/4: broken run)
    return caught, time.perf_counter() - started, lines[-1] if lines else out.stderr[-200:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only the mutations whose names contain these words")
    parser.add_argument("--keep", action="store_true", help="keep the copy (its path is printed)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip running each mutation's tests on the unmutated code first")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or any(word in m.name for word in args.only)]
    where = Path(tempfile.mkdtemp(prefix="downpour-mutants-"))
    try:
        copy = copy_checkout(where)
        results = []
        for mutation in chosen:
            if not args.no_control:
                failed, _, last = run(mutation, copy, mutate=False)
                if failed or "passed" not in last:
                    raise SystemExit(f"control for {mutation.name!r}: its tests do not pass unmutated: {last}")
            caught, seconds, last = run(mutation, copy)
            results.append((mutation.name, caught, seconds, last))
            print(f"{'caught' if caught else 'MISSED':7} {mutation.name:32} {seconds:6.1f} s  {last}",
                  flush=True)
    finally:
        if args.keep:
            print(f"copy kept in {where}")
        else:
            shutil.rmtree(where, ignore_errors=True)
    missed = [name for name, caught, *_ in results if not caught]
    print(f"{len(results) - len(missed)} of {len(results)} mutations caught"
          + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())

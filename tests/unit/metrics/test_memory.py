"""Peak resident memory of this process and of the processes it started."""

from __future__ import annotations

import subprocess
import sys

from downpour.metrics.memory import RoleMemory, peak_rss

HOLD = 150 * 2**20

# A child that holds HOLD bytes, says so, and waits for a line before it exits.
CHILD = f"""
import sys
block = bytearray({HOLD})
block[::4096] = b"x" * len(block[::4096])
print("holding", flush=True)
sys.stdin.readline()
"""


def test_peak_rss_is_the_process_own_high_water_mark():
    # A fresh process, so that no earlier allocation of this one sets the mark.
    script = f"""
from downpour.metrics.memory import peak_rss
before = peak_rss()
block = bytearray({HOLD})
block[::4096] = b"x" * len(block[::4096])
print(before, peak_rss())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    before, after = map(int, done.stdout.split())
    assert after - before >= 0.9 * HOLD, (before, after)
    assert before < 10 * HOLD  # its own start, not an inherited parent's size
    assert peak_rss() > 0


def test_role_memory_reads_a_child_peak_by_title():
    roles = RoleMemory()
    child = subprocess.Popen([sys.executable, "-c", CHILD, "marker-title"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding"
        roles.sample()
    finally:
        child.communicate("\n", timeout=30)
    mine = {title: peak for title, peak in roles.peaks.items() if "marker-title" in title}
    assert len(mine) == 1 and next(iter(mine.values())) >= HOLD, roles.peaks

"""CPU time and peak memory of worker processes, read from /proc (Linux; elsewhere 0).

Worker processes are the forkserver's children, not the benchmark's, so ``resource.getrusage``
sees neither their CPU time nor their memory. CPU time next to wall time tells a benchmark on a
shared machine apart: wall time shrinks with free cores, CPU time shows the work itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and ``pids`` so far."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0

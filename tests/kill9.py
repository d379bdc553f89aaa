"""``kill -9`` at a chosen moment: the crash-safety tests' one way of killing a process mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def kill_when_printed(code: str, args: list[str], marker: str, timeout: float, what: str) -> None:
    """Run ``python -c code args…`` and SIGKILL it as soon as it prints a line containing
    ``marker`` (it prints the marker just before the step under test); fail if it ends or times
    out first, naming ``what`` it should have reached."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    try:
        line, deadline = "", time.monotonic() + timeout
        while marker not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, f"it ended before {what}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker in line, f"it did not reach {what} within {timeout:.0f} s"

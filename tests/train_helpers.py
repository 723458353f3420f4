"""Shared by the `fastgpt train` tests: waiting on a run's own log instead of guessed sleeps."""

import json
import subprocess
import time
from pathlib import Path

import pytest


def wait_for_log_step(log: Path, step: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    """Return as soon as log.jsonl records ``step`` (or a later one): the file is re-read whenever it
    grows (checked every millisecond), so the wait ends with the event, never after a guessed sleep."""
    deadline, seen = time.monotonic() + timeout, -1
    while time.monotonic() < deadline:
        size = log.stat().st_size if log.exists() else -1
        if size != seen:
            seen = size
            steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines()[:-1] if line.strip()]
            if steps and max(steps) >= step:  # complete lines only: the last one may still be being written
                return
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step} was logged"
        time.sleep(0.001)
    pytest.fail(f"step {step} not logged within {timeout} s")

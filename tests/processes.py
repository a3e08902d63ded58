"""Helpers for tests that start several local worker processes (DDP on gloo)."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process (killing stragglers) and fail with their output unless all exited 0."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(logs)[-3000:]

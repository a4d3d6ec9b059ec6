"""Helpers for tests that start a real process (the server's CLI, JupyterLab)."""
from __future__ import annotations

import subprocess


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """Terminate, wait `grace` seconds, then kill; close its captured output."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stdout:
        proc.stdout.close()

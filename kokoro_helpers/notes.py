"""The notes a step prints as it goes: every long-running function takes `log=print` (or None for quiet),
so notebooks show what happened and tests can collect the notes."""
from __future__ import annotations

from typing import Callable

Log = Callable[[str], None] | None


def say(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)

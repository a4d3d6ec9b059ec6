"""Resume after a killed kernel: a run's checkpoint folder (the Trainer's ``checkpoint-N`` folders) and the
run's own state file in it (``kokoro_run.json``: the fingerprint of base, data and settings, the base's
held-out loss, the wall time so far, the checkpoints resumed from), and which checkpoint a run picks up.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from kokoro_helpers.jsonio import read_json, write_json_atomic
from kokoro_helpers.paths import portable, resolve

STATE_FILE = "kokoro_run.json"


class Checkpoints:
    """The checkpoints of one run name. Only the main process (``is_main``) writes or removes; ``barrier``
    makes every process wait for it (several processes: torchrun / accelerate launch)."""

    def __init__(self, root: Path, *, is_main: bool, log: Callable[[str], None], barrier: Callable[[], None]):
        self.root = root
        self.is_main = is_main
        self.log = log
        self.barrier = barrier

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def state(self, required: bool = False) -> dict[str, Any]:
        """The state file's content; {} when there is none, unless ``required`` (a resumed run's must exist)."""
        if required:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        return read_json(self.state_file, default={})

    def resumed_from(self) -> list[str]:
        """The checkpoints earlier sessions of this run resumed from."""
        try:
            return list(self.state().get("resumed_from", []))
        except ValueError:
            return []

    def find(self, resume: Any, fingerprint: str) -> str | None:
        """The checkpoint to resume from under ``resume`` (auto | never | latest | a folder), or None to start
        over. auto resumes only a checkpoint written with the same ``fingerprint`` (else removes them)."""
        root = self.root
        last = self.last_complete() if root.is_dir() else None
        recorded = self.state().get("fingerprint")
        if resume in (False, None, "never", "no", "false"):
            self.clear()
            return None
        if resume not in (True, "auto", "latest", "true"):
            path = resolve(str(resume))
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"resume={resume!r}: {path} is not a checkpoint folder (no trainer_state.json)")
            return str(path)
        if last is None:
            if resume in (True, "latest", "true"):
                raise FileNotFoundError(f"resume={resume!r} but there is no checkpoint in {root}")
            return None
        if recorded != fingerprint:
            message = (f"checkpoint {portable(last)} was written by a run with another base (by content), data or "
                       f"settings (fingerprint {recorded} != {fingerprint})")
            if resume != "auto":
                raise ValueError(message + "; set resume='never' to start over")
            self.log(f"not resuming: {message}. Starting over; the old checkpoints are removed.")
            self.clear()
            return None
        return last

    def last_complete(self) -> str | None:
        """The newest checkpoint the Trainer finished writing (trainer_state.json is written last):
        a kill in the middle of a save leaves a newer, partial folder, which is removed."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        def step(p: Path) -> int:
            tail = p.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
            return int(tail) if tail.isdigit() else -1

        folders = sorted((p for p in self.root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                          if p.is_dir() and step(p) >= 0), key=step, reverse=True)
        for folder in folders:
            try:
                json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                if self.is_main:
                    self.log(f"removing {portable(folder)}: its save was interrupted")
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            return str(folder)
        return None

    def clear(self) -> None:
        if self.is_main and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        self.barrier()

    def start(self, fingerprint: str, base_loss: float | None, base_fingerprint: str, resuming: bool) -> None:
        """Record a session's start (a fresh run forgets the old state); every process waits for it."""
        if self.is_main:
            old = self.state() if resuming else {}
            write_json_atomic(self.state_file, dict(old, fingerprint=fingerprint, base_valid_loss=base_loss,
                                                    base_fingerprint=base_fingerprint), indent=1)
        self.barrier()

    def update(self, **fields: Any) -> None:
        """Add or replace fields of the state file (main process only)."""
        if self.is_main:
            write_json_atomic(self.state_file, dict(self.state(), **fields), indent=1)

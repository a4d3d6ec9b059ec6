"""Parameter files (params/*.yaml), the same ones papermill passes to the notebooks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kokoro_helpers.paths import resolve


def load_params(path: str | Path) -> dict[str, Any]:
    """Read a parameter file; a clear error for a missing or malformed one."""
    p = resolve(path)
    if not p.is_file():
        raise FileNotFoundError(f"parameter file not found: {p} (see params/default.yaml for the format)")
    with open(p, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a parameter file must be a YAML mapping of name: value")
    return data


def run_name(params: dict[str, Any], params_path: str | Path | None = None) -> str:
    """The run's name: `run_name` if given, else the last part of `run_dir`, else the file stem."""
    if params.get("run_name"):
        return str(params["run_name"])
    if params.get("run_dir"):
        return Path(str(params["run_dir"])).name
    return Path(params_path).stem if params_path else "default"


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` strings (VALUE read as YAML: 10, null, [a, b], text) -> {KEY: value}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--set takes KEY=VALUE with a parameter name as KEY, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out

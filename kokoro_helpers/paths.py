"""Where things live: the project root, a run's folders, the package's shipped data."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_RUN_DIR = "runs/default"
SAMPLE_DIR = PACKAGE_DIR / "sample_data" / "dialogues"


def project_root(start: str | Path | None = None) -> Path:
    """The repository root: the nearest folder above `start` (default: cwd) holding both
    `pyproject.toml` and `params/`; else the folder above the package (editable installs);
    else the current directory. Notebooks run from `notebooks/`, `make` from the root: both
    resolve `runs/default` to the same place."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "params").is_dir():
            return folder
    if (PACKAGE_DIR.parent / "params").is_dir():
        return PACKAGE_DIR.parent
    return here


def resolve(path: str | Path) -> Path:
    """An absolute path: relative paths are taken from the project root, not the cwd."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def portable(path: str | Path) -> str:
    """A path as cards, READMEs and messages show it: relative to the project root when inside it,
    else absolute. A relative path (or a name such as a Hub id) is returned as given."""
    p = Path(str(path))
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.resolve().relative_to(project_root()))
    except ValueError:
        return str(p)


def cache_dir() -> Path:
    """Package caches (tiny model, tokenizer files): $KOKORO_CACHE or <root>/.cache/kokoro."""
    env = os.environ.get("KOKORO_CACHE")
    return Path(env).expanduser() if env else project_root() / ".cache" / "kokoro"

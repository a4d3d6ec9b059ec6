"""What a base model *is*, by content: its config and weights, not the path it was loaded from.

- the embedded tiny model: its recipe's fingerprint (the recipe decides the weights);
- a local folder: sha256 over ``config.json`` and the sha256 of every weight file, the weights'
  hashes cached by (path, size, mtime) so a multi-GB base is read once, not at every run;
- a Hub id: ``hub:<id>@<revision>`` when the Hub cache holds a snapshot (its commit), else the id.

Resume refuses a checkpoint of another base, and 03 keys the base's cached replies with it, so a
folder whose weights were replaced is never mistaken for the old one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _cache_file() -> Path:
    from kokoro_helpers.local.tiny_model import model_dir
    return Path(model_dir()).parent / "weights-sha256.json"


def _file_sha(path: Path, cache: dict) -> str:
    from kokoro_helpers.jsonio import file_sha256

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if key not in cache:
        cache[key] = file_sha256(path)
    return cache[key]


def folder_fingerprint(folder: str | Path) -> str:
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    weights = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    blob = {"config": hashlib.sha256(config.read_bytes()).hexdigest(),
            "weights": {p.name: _file_sha(p, cache) for p in weights}}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(cache_path.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0), encoding="utf-8")
        os.replace(tmp, cache_path)
    except OSError:
        pass
    return "sha256:" + hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:32]


def hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot of a Hub model (None when it is not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:       # not a valid repo id, no cache
        return None
    if isinstance(hit, str):
        parts = Path(hit).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


def base_fingerprint(name: str, resolved: str | Path | None = None) -> str:
    """The content fingerprint of a base given by its parameter value (``name``) and, when known,
    the folder it resolved to."""
    from kokoro_helpers.local.tiny_model import DEFAULT_RECIPE, EMBEDDED_TINY, is_embedded

    if is_embedded(name):
        return f"{EMBEDDED_TINY}:{DEFAULT_RECIPE.fingerprint()[:32]}"
    path = Path(resolved) if resolved else Path(name)
    if path.is_dir():
        return folder_fingerprint(path)
    rev = hub_revision(name)
    return f"hub:{name}@{rev}" if rev else f"hub:{name}"

"""File helpers every step shares: JSON lines in (strict, or lenient for append-only files a crash can tear),
atomic file and folder writes (a crash leaves the old or the new, never half), content hashes.

Every write of a finished artifact in the package goes through `atomic_write` / `atomic_dir`; append-only logs
(score files, response caches) are the exception by design — they are read back with `lenient=True`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

OnBad = Callable[[int, str], None]   # (line number, the line) of a line that is not JSON

try:  # orjson writes exactly json.dumps(r, ensure_ascii=False, separators=(",", ":")) as UTF-8, faster
    from orjson import dumps as _dumps_bytes
except ImportError:
    _encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def _dumps_bytes(obj: Any) -> bytes:
        return _encode(obj).encode("utf-8")


def iter_jsonl(lines: Iterable[str], *, where: str = "<text>", lenient: bool = False,
               on_bad: OnBad | None = None) -> Iterator[Any]:
    """The rows of JSON lines, blank lines skipped. Strict (the default): a ValueError naming the broken
    line. `lenient=True`: a broken line (a torn write after a power cut, a hand edit) is skipped and handed
    to `on_bad(line_number, line)` so the caller can count or warn."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as exc:
            if not lenient:
                raise ValueError(f"{where}:{n} is not valid JSON ({exc.msg}); re-run the step that wrote it") from None
            if on_bad is not None:
                on_bad(n, line)


def read_jsonl(path: str | Path, *, lenient: bool = False, on_bad: OnBad | None = None,
               missing_ok: bool = False) -> list[Any]:
    """The rows of a .jsonl file (see `iter_jsonl`); `missing_ok=True` gives [] for a file that is not there.
    Lenient reading also replaces undecodable bytes, which a torn multi-byte character leaves."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    with open(path, encoding="utf-8", errors="replace" if lenient else "strict") as f:
        return list(iter_jsonl(f, where=str(path), lenient=lenient, on_bad=on_bad))


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content; `default` when it does not exist; a ValueError naming the file when
    it cannot be read or parsed."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc})") from exc


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tmp_name(path: Path) -> Path:
    # per process, so two runs writing the same file never share (or delete) each other's temp file
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, durable: bool = True,
                 buffering: int = -1) -> Iterator[IO[Any]]:
    """Write a file all or nothing: the body writes to a temp file beside `path` (text modes are UTF-8),
    which replaces `path` only when the body finishes; on an exception the temp file goes and `path` is
    untouched. `durable` fsyncs before the rename so a power cut cannot leave an empty file either."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, buffering, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path, *, keep_existing: bool | Callable[[Path], bool] = False) -> Iterator[Path]:
    """Build a folder all or nothing: the body fills a fresh temp folder beside `path`, which replaces
    `path` (and whatever was there) when the body finishes; on an exception the temp folder goes and `path`
    is untouched. `keep_existing`: when a folder is already at `path` and this is true (or, a function,
    returns true for it — e.g. "another process finished it first"), that folder is kept and the new one
    dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def keep() -> bool:
        return path.is_dir() and (keep_existing(path) if callable(keep_existing) else bool(keep_existing))

    try:
        yield tmp
        if path.exists() and not keep():
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if not keep():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON atomically and durably (see `atomic_write`), UTF-8 as is, ending in a newline."""
    with atomic_write(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
    return Path(path)


def dumps_line(row: Any) -> bytes:
    """One compact JSON line (UTF-8, no ASCII escapes), newline included."""
    return _dumps_bytes(row) + b"\n"


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> str:
    """Write rows as JSON lines atomically (see `atomic_write`); returns the sha256 of the bytes written."""
    # line by line (same bytes, same hash): no file-sized intermediate strings, whose fresh memory costs
    # more than the copying itself on a large split
    digest = hashlib.sha256()
    with atomic_write(path, "wb", durable=False, buffering=1 << 20) as f:
        for r in rows:
            line = dumps_line(r)
            digest.update(line)
            f.write(line)
    return digest.hexdigest()


def content_sha1(obj: Any) -> str:
    """sha1 hex of an object's canonical JSON (sorted keys, compact, UTF-8): equal content, equal hash —
    the key of every cache in the package."""
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()

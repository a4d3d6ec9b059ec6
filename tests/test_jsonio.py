"""The shared file chores: atomic file/folder writes and JSON-lines reading, strict and lenient."""
import json

import pytest

from kokoro_helpers.jsonio import atomic_dir, atomic_write, read_jsonl, write_json_atomic, write_jsonl


def test_atomic_write_leaves_the_old_file_when_the_body_fails(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write('{"v": 2')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]      # no temp file left behind


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("new, half written")
            raise RuntimeError("crash")
    assert (out / "weights").read_text() == "old"
    with atomic_dir(out) as tmp:
        (tmp / "other").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["other"]           # the old folder is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_dir_keeps_a_finished_folder_and_replaces_a_half_one(tmp_path):
    out = tmp_path / "build"
    out.mkdir()
    (out / "half").write_text("a killed build")

    def finished(folder):
        return (folder / "done").is_file()

    with atomic_dir(out, keep_existing=finished) as tmp:
        (tmp / "done").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["done"]              # the half build was replaced
    with atomic_dir(out, keep_existing=finished) as tmp:
        (tmp / "done").write_text("second")
    assert (out / "done").read_text() == "mine"                          # a finished one is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_write_jsonl_returns_the_hash_of_exactly_the_bytes_written(tmp_path):
    import hashlib
    path = tmp_path / "x.jsonl"
    sha = write_jsonl(path, [{"text": "こんにちは"}, {"n": 1}])
    data = path.read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    assert data.decode("utf-8") == '{"text":"こんにちは"}\n{"n":1}\n'


def test_read_jsonl_strict_names_the_line_and_lenient_reports_it(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3, "tor')           # a crash tore the last line
    with pytest.raises(ValueError, match=r"scores.jsonl:4 is not valid JSON"):
        read_jsonl(path)
    bad = []
    assert read_jsonl(path, lenient=True, on_bad=lambda n, line: bad.append(n)) == [{"a": 1}, {"a": 2}]
    assert bad == [4]
    assert read_jsonl(tmp_path / "missing.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")

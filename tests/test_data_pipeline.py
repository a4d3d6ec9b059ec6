"""prepare_data end to end: the output contract, bad input, filters, determinism."""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from conftest import eval_id
from kokoro_helpers.data.schema import SCORE_SUBSETS
from kokoro_helpers.data.split import split_sizes

SPLITS = ("train", "valid", "test")


def _read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _stats(run_dir: Path):
    return json.loads((run_dir / "data" / "stats.json").read_text(encoding="utf-8"))


def _kept_ids(run_dir: Path):
    splits = json.loads((run_dir / "data" / "splits.json").read_text(encoding="utf-8"))
    return sorted(i for name in SPLITS for i in splits[name])


# ---------------------------------------------------------------- output contract


def test_outputs_follow_the_contract(tmp_path, run, sample_records):
    run_dir = tmp_path / "run"
    result = run("embedded", run_dir)
    data = run_dir / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted(
        ["train.jsonl", "valid.jsonl", "test.jsonl", "splits.json", "stats.json", "example_tokens.json"])
    counted = json.loads((data / "example_tokens.json").read_text(encoding="utf-8"))
    assert counted["token_counter"] == _stats(run_dir)["token_counter"]
    splits = json.loads((data / "splits.json").read_text(encoding="utf-8"))
    assert list(splits) == list(SPLITS)
    stats = _stats(run_dir)
    for key in ("dialogues_in", "dialogues_kept", "rejected", "splits", "tokens", "token_counter"):
        assert key in stats
    n = len(sample_records)
    assert stats["dialogues_in"] == stats["dialogues_kept"] == n
    assert stats["rejected"] == {} and stats["format_errors"] == {}
    assert stats["splits"] == split_sizes(n) == {k: len(v) for k, v in splits.items()}
    assert sorted(i for k in SPLITS for i in splits[k]) == sorted(eval_id(r) for r in sample_records)
    assert stats["token_counter"].startswith("estimate:")
    for name in SPLITS:
        path = data / f"{name}.jsonl"
        blob = path.read_bytes()
        assert stats["data_sha256"][name] == hashlib.sha256(blob).hexdigest() == counted["splits"][name]["sha256"]
        assert sum(counted["splits"][name]["tokens"]) == stats["tokens"][name]
        assert len(counted["splits"][name]["tokens"]) == stats["examples"][name]
        lines = blob.decode("utf-8").splitlines()
        assert len(lines) == stats["splits"][name] == stats["examples"][name]
        for line in lines:
            obj = json.loads(line)
            assert list(obj) == ["messages"]
            assert isinstance(obj["messages"], list) and obj["messages"][-1]["role"] == "assistant"
            for m in obj["messages"]:
                assert set(m) <= {"role", "content"} and m["content"].strip()
        assert stats["tokens"][name] == sum(result.example_tokens[name]) > 0
    assert result.data_dir == data
    assert len(result.frame()) == n and set(result.frame()["split"]) == set(SPLITS)


def test_rerun_is_byte_identical_and_seed_changes_split(tmp_path, run, outputs):
    run("embedded", tmp_path / "a")
    run("embedded", tmp_path / "b")
    run("embedded", tmp_path / "c", seed=7)
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")
    assert _stats(tmp_path / "a") == {**_stats(tmp_path / "b")}
    a = json.loads(outputs(tmp_path / "a")["splits.json"])
    c = json.loads(outputs(tmp_path / "c")["splits.json"])
    assert a != c and sorted(sum(a.values(), [])) == sorted(sum(c.values(), []))


def test_system_prompt_opens_every_example(tmp_path, run):
    prompt = "あなたは相談者の話を丁寧に聴くカウンセラーです。"
    run("embedded", tmp_path / "run", system_prompt=prompt)
    for name in SPLITS:
        for ex in _read_jsonl(tmp_path / "run" / "data" / f"{name}.jsonl"):
            assert ex["messages"][0] == {"role": "system", "content": prompt}
            assert [m["role"] for m in ex["messages"][1:]].count("system") == 0
    assert _stats(tmp_path / "run")["system_prompt"] == prompt


def test_all_counselor_text_is_kept(tmp_path, run, sample_records):
    run("embedded", tmp_path / "run")
    assistant = Counter()
    for name in SPLITS:
        for ex in _read_jsonl(tmp_path / "run" / "data" / f"{name}.jsonl"):
            for m in ex["messages"]:
                if m["role"] == "assistant":
                    assistant.update(m["content"].split("\n"))
    counselor = Counter(t["utterance"] for r in sample_records for t in r["dialogue"] if t["role"] == "counselor")
    assert not counselor - assistant      # every counselor utterance appears (with its multiplicity)


def test_stratified_by_topic(tmp_path, run, sample_records):
    result = run("embedded", tmp_path / "run", stratify_by_topic=True)
    assert result.stats["splits"] == split_sizes(len(sample_records))
    topic = {eval_id(r): r["topic"]["main_en"] for r in sample_records}
    for t, n in Counter(topic.values()).items():
        in_train = sum(topic[i] == t for i in result.splits["train"])
        assert in_train >= n * 0.8 - 1.5, (t, in_train, n)


# ---------------------------------------------------------------- bad input


def _bad_files(folder: Path):
    """One file per kind of broken input; returns {file name: expected reason}."""
    bad = {
        "9001.json": ("not_utf8", '{"dialogue": [{"role": "client", "utterance": "相談"}]}'.encode("cp932")),
        "9002.json": ("invalid_json", '{"dialogue": [{"role": "counselor", "utterance": "こんにちは"'.encode()),
        "9003.json": ("record_not_object", json.dumps([{"role": "counselor", "utterance": "はい"}]).encode()),
        "9004.json": ("missing_dialogue", json.dumps({"topic": {"main_en": "Others"}}).encode()),
        "9005.json": ("dialogue_not_list", json.dumps({"dialogue": "こんにちは"}, ensure_ascii=False).encode()),
        "9006.json": ("empty_dialogue", json.dumps({"dialogue": []}).encode()),
        "9007.json": ("unknown_role", json.dumps(
            {"dialogue": [{"role": "observer", "utterance": "見学です"}]}, ensure_ascii=False).encode()),
        "9008.json": ("missing_utterance", json.dumps({"dialogue": [{"role": "counselor"}]}).encode()),
        "9009.json": ("no_counselor_turn", json.dumps(
            {"dialogue": [{"role": "client", "utterance": "誰かいますか"}]}, ensure_ascii=False).encode()),
        "9010.json": ("utterance_not_object", json.dumps({"dialogue": ["こんにちは"]}, ensure_ascii=False).encode()),
    }
    for name, (_, blob) in bad.items():
        (folder / name).write_bytes(blob)
    return {name: reason for name, (reason, _) in bad.items()}


def test_bad_files_are_rejected_and_good_ones_kept(tmp_path, writers, sample_records, run):
    folder = writers["folder"](sample_records, tmp_path / "mixed")
    expected = _bad_files(folder)
    # not .json: ignored entirely (not even counted as input)
    (folder / "README.md").write_text("# メモ", encoding="utf-8")
    (folder / "101.json.bak").write_text("{", encoding="utf-8")
    (folder / "notes.txt").write_bytes(b"\xff\xfe")
    (folder / "nested.json").mkdir()
    result = run(folder, tmp_path / "run")
    stats = _stats(tmp_path / "run")
    assert stats["dialogues_in"] == len(sample_records) + len(expected)
    assert stats["dialogues_kept"] == len(sample_records)
    assert stats["rejected"] == dict(sorted(Counter(expected.values()).items()))
    assert {r.origin: r.reason for r in result.rejects} == expected
    assert _kept_ids(tmp_path / "run") == sorted(eval_id(r) for r in sample_records)
    assert stats["format_errors"] == {}


def test_bad_files_do_not_change_the_good_outputs(tmp_path, writers, sample_records, run, outputs,
                                                  embedded_outputs):
    folder = writers["folder"](sample_records, tmp_path / "mixed")
    _bad_files(folder)
    run(folder, tmp_path / "run")
    assert outputs(tmp_path / "run") == embedded_outputs


def test_unreadable_file_chmod(tmp_path, writers, sample_records, run):
    folder = writers["folder"](sample_records[:6], tmp_path / "d")
    locked = folder / "9100.json"
    locked.write_text(json.dumps(sample_records[6], ensure_ascii=False), encoding="utf-8")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: a chmod 000 file is still readable")
        result = run(folder, tmp_path / "run")
    finally:
        locked.chmod(0o644)
    assert result.stats["rejected"] == {"unreadable_file": 1}
    assert result.stats["dialogues_kept"] == 6


def test_unreadable_file_oserror(tmp_path, writers, sample_records, run, monkeypatch):
    """The same case on any user: reading one file raises OSError (as a permission error would)."""
    folder = writers["folder"](sample_records[:6], tmp_path / "d")
    locked = folder / "9100.json"
    locked.write_text(json.dumps(sample_records[6], ensure_ascii=False), encoding="utf-8")
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.name == "9100.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result = run(folder, tmp_path / "run")
    assert result.stats["rejected"] == {"unreadable_file": 1}
    assert [(r.origin, r.reason) for r in result.rejects] == [("9100.json", "unreadable_file")]
    assert result.stats["dialogues_kept"] == 6


def test_blank_utterances_are_dropped_and_counted(tmp_path, writers, sample_records, run, record_factory):
    rec = record_factory([("co", "こんにちは。"), ("cl", ""), ("cl", "   "), ("cl", "相談があります。"),
                          ("co", "\u3000"), ("co", "どうぞお話しください。")], eid=8001)
    folder = writers["folder"](sample_records[:5] + [rec], tmp_path / "d")
    result = run(folder, tmp_path / "run")
    assert result.stats["blank_utterances_dropped"] == 3
    assert result.stats["rejected"] == {}
    assert result.stats["dialogues_kept"] == 6
    ex = [e for name in SPLITS for e in result.examples[name]
          if e["messages"][0]["content"] == "こんにちは。"]
    assert ex and ex[0]["messages"] == [
        {"role": "assistant", "content": "こんにちは。"},
        {"role": "user", "content": "相談があります。"},
        {"role": "assistant", "content": "どうぞお話しください。"}]


def test_duplicate_ids_keep_one(tmp_path, writers, sample_records, run):
    folder = writers["folder"](sample_records[:6], tmp_path / "d")
    (folder / "copy_of_101.json").write_text(
        json.dumps(sample_records[0], ensure_ascii=False), encoding="utf-8")
    result = run(folder, tmp_path / "run")
    assert result.stats["rejected"] == {"duplicate_id": 1}
    assert result.stats["dialogues_kept"] == 6
    assert _kept_ids(tmp_path / "run") == sorted(eval_id(r) for r in sample_records[:6])


def test_duplicate_ids_do_not_make_the_result_depend_on_row_order(tmp_path, writers, sample_records, run,
                                                                   outputs):
    """Two different records with one id: which one is kept must not depend on row order."""
    records = [dict(r) for r in sample_records[:8]]
    twin = json.loads(json.dumps(records[2]))
    twin["dialogue"][0]["utterance"] = "別の版の最初の発話です。"
    results = []
    for i, order in enumerate(([*records, twin], [twin, *records])):
        path = writers["jsonl"](order, tmp_path / f"r{i}.jsonl")
        run(path, tmp_path / f"run{i}")
        results.append(outputs(tmp_path / f"run{i}"))
        assert _stats(tmp_path / f"run{i}")["rejected"] == {"duplicate_id": 1}
    assert results[0] == results[1]


def test_no_json_files_in_folder(tmp_path, run):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here", encoding="utf-8")
    result = run(folder, tmp_path / "run")
    assert result.stats["dialogues_in"] == 0 and result.stats["dialogues_kept"] == 0
    assert all((tmp_path / "run" / "data" / f"{n}.jsonl").read_bytes() == b"" for n in SPLITS)


# ---------------------------------------------------------------- filters


def _scores(sample_records):
    return {eval_id(r): r["review_by_client_en"]["score"] for r in sample_records}


def test_min_and_max_score_are_inclusive(tmp_path, run, sample_records):
    scores = _scores(sample_records)
    values = sorted(set(scores.values()))
    lo, hi = values[3], values[-4]
    result = run("embedded", tmp_path / "run", min_score=lo, max_score=hi)
    expected = sorted(i for i, s in scores.items() if lo <= s <= hi)
    assert _kept_ids(tmp_path / "run") == expected
    assert any(scores[i] == lo for i in expected) and any(scores[i] == hi for i in expected)
    assert result.stats["filtered"] == {"score_out_of_range": len(scores) - len(expected)}
    assert result.stats["score_range"] == [lo, hi]
    only_min = run("embedded", tmp_path / "run2", min_score=lo)
    assert only_min.stats["dialogues_kept"] == sum(s >= lo for s in scores.values())


@pytest.mark.parametrize("preset, rule", [
    ("low", lambda s: s < 70), ("high", lambda s: 70 <= s <= 98),
    ("full", lambda s: s <= 98), ("test", lambda s: s >= 99), ("LOW", lambda s: s < 70),
])
def test_score_subset_presets(preset, rule, tmp_path, run, sample_records):
    scores = _scores(sample_records)
    result = run("embedded", tmp_path / "run", score_subset=preset, min_score=0, max_score=100)
    expected = sorted(i for i, s in scores.items() if rule(s))
    assert expected, preset                               # the sample has dialogues in every subset
    assert _kept_ids(tmp_path / "run") == expected
    assert result.stats["score_range"] == list(SCORE_SUBSETS[preset.lower()])


def test_invalid_score_subset_is_an_error(tmp_path, run):
    with pytest.raises(ValueError, match="score_subset must be one of"):
        run("embedded", tmp_path / "run", score_subset="medium")


def test_score_filter_rejects_records_without_score(tmp_path, record_factory, writers, sample_records, run):
    rec = record_factory([("cl", "相談です。"), ("co", "はい。")], eid=8100, score=None)
    folder = writers["folder"](sample_records[:4] + [rec], tmp_path / "d")
    result = run(folder, tmp_path / "run", min_score=0)
    assert result.stats["filtered"] == {"no_score": 1}
    assert 8100 not in _kept_ids(tmp_path / "run")
    assert 8100 in _kept_ids(Path(run(folder, tmp_path / "run2").data_dir).parent)   # no filter: kept


def test_max_samples_is_deterministic_by_seed(tmp_path, run, outputs, sample_records, writers):
    run("embedded", tmp_path / "a", max_samples=10)
    run("embedded", tmp_path / "b", max_samples=10)
    run("embedded", tmp_path / "c", max_samples=10, seed=1)
    shuffled = list(sample_records)
    random.Random(4).shuffle(shuffled)
    run(writers["jsonl"](shuffled, tmp_path / "s.jsonl"), tmp_path / "d", max_samples=10)
    a, c = _kept_ids(tmp_path / "a"), _kept_ids(tmp_path / "c")
    assert len(a) == len(c) == 10 and a != c
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b") == outputs(tmp_path / "d")
    stats = _stats(tmp_path / "a")
    assert stats["dialogues_kept"] == 10
    assert stats["filtered"] == {"over_max_samples": len(sample_records) - 10}
    assert stats["splits"] == split_sizes(10)
    big = run("embedded", tmp_path / "e", max_samples=10_000)
    assert big.stats["dialogues_kept"] == len(sample_records) and big.stats["filtered"] == {}

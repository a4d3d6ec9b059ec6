"""Every kind of `dataset_source` gives the same records and byte-identical outputs; the embedded
sample itself meets the issue's constraints."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from conftest import ROOT, eval_id
from kokoro_helpers.data import schema
from kokoro_helpers.data.convert import record_id
from kokoro_helpers.paths import SAMPLE_DIR
from kokoro_helpers.data.sources import SourceError, describe_source, read_source

HUB = "UEC-InabaLab/KokoroChat"


def _by_id(raw):
    """Records of read_source keyed by their dialogue id."""
    out = {}
    for item in raw:
        rid = record_id(item.record, item.fallback_id)
        assert rid not in out
        out[rid] = item.record
    return out


def _write(kind, writers, records, tmp_path):
    target = {"folder": tmp_path / "dialogues", "json": tmp_path / "records.json",
              "jsonl": tmp_path / "records.jsonl", "parquet": tmp_path / "records.parquet"}[kind]
    return writers[kind](records, target)


@pytest.fixture
def fake_hub(monkeypatch):
    """datasets.load_dataset replaced by an offline stand-in serving `records`; records the calls."""
    import datasets

    state = {"records": None, "calls": []}

    def load_dataset(*args, **kwargs):
        state["calls"].append((args, kwargs))
        return datasets.Dataset.from_list(state["records"])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return state


# ---------------------------------------------------------------- kinds of source


def test_describe_source_kinds(tmp_path, writers, sample_records):
    assert describe_source("embedded") == "embedded"
    assert describe_source(str(writers["folder"](sample_records[:2], tmp_path / "d"))) == "folder"
    assert describe_source(str(writers["json"](sample_records[:2], tmp_path / "a.json"))) == "json"
    assert describe_source(str(writers["jsonl"](sample_records[:2], tmp_path / "a.jsonl"))) == "jsonl"
    assert describe_source(str(writers["parquet"](sample_records[:2], tmp_path / "a.parquet"))) == "parquet"
    (tmp_path / "a.csv").write_text("question,answer\nq,a\n", encoding="utf-8")
    assert describe_source(str(tmp_path / "a.csv")) == "csv"
    assert describe_source(HUB) == "hub"


def test_unsupported_and_missing_sources_say_what_to_do(tmp_path):
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(SourceError, match="unsupported file type"):
        describe_source(str(tmp_path / "notes.txt"))
    with pytest.raises(SourceError, match="neither an existing path nor a Hub id"):
        describe_source(str(tmp_path / "no" / "such" / "place.json"))


@pytest.mark.parametrize("kind", ["folder", "json", "jsonl", "parquet"])
def test_file_sources_give_identical_records(kind, tmp_path, writers, sample_records):
    embedded, emb_rejects = read_source("embedded")
    assert emb_rejects == [] and len(embedded) == len(sample_records)
    path = _write(kind, writers, sample_records, tmp_path)
    raw, rejects = read_source(str(path))
    assert rejects == []
    assert _by_id(raw) == _by_id(embedded)
    assert sorted(_by_id(raw)) == sorted(eval_id(r) for r in sample_records)


@pytest.mark.parametrize("kind", ["folder", "json", "jsonl", "parquet"])
def test_file_sources_give_byte_identical_outputs(kind, tmp_path, writers, sample_records, run,
                                                  outputs, embedded_outputs):
    path = _write(kind, writers, sample_records, tmp_path)
    result = run(path, tmp_path / "run")
    assert result.stats["dialogues_kept"] == len(sample_records)
    assert outputs(tmp_path / "run") == embedded_outputs


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
@pytest.mark.parametrize("shuffle_seed", [1, 2])
def test_row_order_changes_nothing(kind, shuffle_seed, tmp_path, writers, sample_records, run,
                                   outputs, embedded_outputs):
    records = list(sample_records)
    random.Random(shuffle_seed).shuffle(records)
    assert [eval_id(r) for r in records] != [eval_id(r) for r in sample_records]
    path = _write(kind, writers, records, tmp_path)
    run(path, tmp_path / "run")
    assert outputs(tmp_path / "run") == embedded_outputs


def test_folder_file_names_and_order_change_nothing(tmp_path, writers, sample_records, run, outputs,
                                                    embedded_outputs):
    """Files named in an order unrelated to the ids: the result is still ordered by evaluation_id."""
    rng = random.Random(7)
    names = {eval_id(r): f"dlg_{rng.randrange(10**9):09d}_{eval_id(r)}.json" for r in sample_records}
    records = list(sample_records)
    rng.shuffle(records)
    folder = writers["folder"](records, tmp_path / "renamed", name=lambda r: names[eval_id(r)])
    run(folder, tmp_path / "run")
    assert outputs(tmp_path / "run") == embedded_outputs


def test_single_object_json_file_is_one_record(tmp_path, sample_records):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(sample_records[0], ensure_ascii=False), encoding="utf-8")
    raw, rejects = read_source(str(path))
    assert rejects == [] and len(raw) == 1 and raw[0].record == sample_records[0]


def test_unparseable_json_file_source_raises_source_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"dialogue": ', encoding="utf-8")
    with pytest.raises(SourceError, match="invalid_json"):
        read_source(str(path))


def test_jsonl_bad_lines_are_rejected_and_blank_lines_skipped(tmp_path, sample_records, run):
    lines = [json.dumps(r, ensure_ascii=False) for r in sample_records[:5]]
    lines.insert(2, '{"dialogue": [')   # invalid JSON on line 3
    lines.insert(4, "")                 # blank line: skipped, not an error
    path = tmp_path / "mixed.jsonl"
    blob = ("\n".join(lines) + "\n").encode("utf-8") + "相談".encode("cp932") + b"\n"
    path.write_bytes(blob)
    raw, rejects = read_source(str(path))
    assert len(raw) == 5
    assert sorted((r.origin, r.reason) for r in rejects) == [
        ("mixed.jsonl:3", "invalid_json"), (f"mixed.jsonl:{len(lines) + 1}", "not_utf8")]
    result = run(path, tmp_path / "run")
    assert result.stats["dialogues_in"] == 7
    assert result.stats["dialogues_kept"] == 5
    assert result.stats["rejected"] == {"invalid_json": 1, "not_utf8": 1}


# ---------------------------------------------------------------- the Hugging Face Hub


def test_hub_source_calls_load_dataset_and_gives_identical_outputs(tmp_path, fake_hub, sample_records,
                                                                   run, outputs, embedded_outputs):
    records = list(sample_records)
    random.Random(3).shuffle(records)
    fake_hub["records"] = records
    raw, rejects = read_source(HUB)
    assert fake_hub["calls"] == [((HUB,), {"split": "train"})]
    assert rejects == []
    assert _by_id(raw) == _by_id(read_source("embedded")[0])
    run(HUB, tmp_path / "run")
    assert outputs(tmp_path / "run") == embedded_outputs


def test_hub_failure_raises_source_error_with_advice(monkeypatch, tmp_path, run):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'UEC-InabaLab/KokoroChat' on the Hub (offline)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(SourceError) as err:
        read_source(HUB)
    message = str(err.value)
    assert HUB in message and "ConnectionError" in message
    assert "folder" in message and ".parquet" in message   # what to do instead
    with pytest.raises(SourceError):
        run(HUB, tmp_path / "run")
    assert not (tmp_path / "run" / "data" / "train.jsonl").exists()


# ---------------------------------------------------------------- CSV (the seeds' csv_to_jsonl)


def test_csv_question_answer_gives_single_turn_examples(tmp_path, run):
    rows = [("最近よく眠れません。", "眠れない日が続くとつらいですよね。"),
            ("職場の人間関係に悩んでいます。", "どんな場面で特にそう感じますか。"),
            ("将来が不安です。", "不安な気持ちを教えてくださってありがとうございます。"),
            ("友達と喧嘩しました。", "それは気がかりですね。"),
            ("家族と話す時間がありません。", "お忙しい毎日なのですね。")]
    path = tmp_path / "qa.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer"])
        w.writerows(rows)
    result = run(path, tmp_path / "run", system_prompt="あなたは傾聴するカウンセラーです。")
    assert result.stats["dialogues_kept"] == len(rows)
    got = set()
    for name in ("train", "valid", "test"):
        for line in (tmp_path / "run" / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            msgs = json.loads(line)["messages"]
            assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
            got.add((msgs[1]["content"], msgs[2]["content"]))
    assert got == set(rows)


def test_csv_without_question_answer_columns_is_a_source_error(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("prompt,completion\nこんにちは,こんにちは\n", encoding="utf-8")
    with pytest.raises(SourceError, match="question and answer"):
        read_source(str(path))


# ---------------------------------------------------------------- the embedded sample


def test_build_sample_data_check_passes():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_sample_data.py"), "--check"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match their sources" in proc.stdout


def test_sample_meets_the_issue_constraints():
    paths = sorted(SAMPLE_DIR.glob("*.json"))
    records = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in paths}
    assert len(records) >= 48
    en_keys = list(schema.REVIEW_ID_KEYS_EN) + list(schema.CRITERIA) + list(schema.FLAGS)
    jp_keys = list(schema.REVIEW_ID_KEYS_JP) + list(schema.CRITERIA.values()) + list(schema.FLAGS.values())
    topics, scores = Counter(), []
    same_speaker_runs = client_first = client_last = 0
    for stem, rec in records.items():
        assert list(rec) == list(schema.TOP_LEVEL_KEYS), stem          # exactly four keys, in order
        turns = rec["dialogue"]
        assert 12 <= len(turns) <= 60, (stem, len(turns))
        for t in turns:
            assert set(t) == {"role", "time", "utterance"}, stem
            assert t["role"] in schema.ROLES and isinstance(t["utterance"], str) and t["utterance"].strip()
        roles = [t["role"] for t in turns]
        same_speaker_runs += any(a == b for a, b in zip(roles, roles[1:]))
        client_first += roles[0] == "client"
        client_last += roles[-1] == "client"
        topic = rec["topic"]
        assert set(topic) == {"main_jp", "main_en", "sub"}
        assert schema.TOPICS[topic["main_en"]][0] == topic["main_jp"]
        topics[topic["main_en"]] += 1
        en, jp = rec["review_by_client_en"], rec["review_by_client_jp"]
        assert list(en) == en_keys and list(jp) == jp_keys, stem
        assert str(en["evaluation_id"]) == stem and en["evaluation_id"] == jp["評価ID"]
        assert en["score"] == jp["点数"] and 0 <= en["score"] <= 100
        for k, k_jp in schema.CRITERIA.items():
            assert isinstance(en[k], int) and 0 <= en[k] <= 5 and jp[k_jp] == en[k]
        for k, k_jp in schema.FLAGS.items():
            assert en[k] in (None, schema.FLAG_CHECKED) and jp[k_jp] == en[k]
        scores.append(en["score"])
    assert set(topics) == set(schema.TOPICS)                          # all 11 main topics
    assert same_speaker_runs >= 5 and client_first >= 2 and client_last >= 2
    assert max(scores) >= 99 and min(scores) < 70

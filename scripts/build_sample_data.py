"""Build the embedded sample (kokoro_helpers/sample_data/dialogues/<evaluation_id>.json) from the
project-written sources in scripts/sample_src/*.yaml, in exactly the KokoroChat record schema.

The dialogues are original texts written for this project (KokoroChat's CC BY-NC-ND license
forbids distributing any derivative of its text). Times, reviewer ids and the 20 review criteria
are derived deterministically from each dialogue's id and score, so the build is reproducible:
    python scripts/build_sample_data.py          # rewrite the JSON files
    python scripts/build_sample_data.py --check  # exit 1 if the shipped files differ (a test runs this)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kokoro_helpers.data.schema import CRITERIA, FLAG_CHECKED, FLAGS, TOPICS  # noqa: E402

SRC = ROOT / "scripts" / "sample_src"
OUT = ROOT / "kokoro_helpers" / "sample_data" / "dialogues"
ROLE = {"co": "counselor", "cl": "client"}


def _rand(*parts) -> float:
    """A deterministic number in [0, 1) from the parts."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def build_record(src: dict) -> dict:
    did, score = int(src["id"]), int(src["score"])
    t = datetime.fromisoformat(src["start"])
    dialogue = []
    for i, (who, text) in enumerate(src["dialogue"]):
        if i:
            t += timedelta(seconds=int(8 + len(text) * 1.2 + 40 * _rand(did, i, "t")))
        dialogue.append({"role": ROLE[who], "time": t.isoformat(), "utterance": text})
    created = t + timedelta(minutes=int(3 + 20 * _rand(did, "created")))
    base = score / 100 * 5
    criteria = {}
    for k in CRITERIA:
        v = round(base + 0.6 + (_rand(did, k) - 0.5) * 1.6)
        criteria[k] = max(0, min(5, v))
    flags = {k: None for k in FLAGS}
    if score < 40:
        flags["unwilling_to_continue"] = FLAG_CHECKED
    if score < 35:
        flags["harmful_due_to_ignorance"] = FLAG_CHECKED
    ids = {
        "evaluation_id": did,
        "evaluation_created_at": created.isoformat(sep=" "),
        "client_id": 1 + int(60 * _rand(did, "client")),
        "counselor_id": 100 + int(60 * _rand(did, "counselor")),
        "score": score,
    }
    en = {**ids, **criteria, **flags}
    jp = {"評価ID": ids["evaluation_id"], "評価作成日時": ids["evaluation_created_at"],
          "クライアント役ID": ids["client_id"], "カウンセラー役ID": ids["counselor_id"], "点数": score}
    jp.update({CRITERIA[k]: v for k, v in criteria.items()})
    jp.update({FLAGS[k]: v for k, v in flags.items()})
    topic = {"main_jp": TOPICS[src["topic_en"]][0], "main_en": src["topic_en"], "sub": src["sub"]}
    return {"dialogue": dialogue, "topic": topic, "review_by_client_en": en, "review_by_client_jp": jp}


def build() -> dict[str, str]:
    files = {}
    for path in sorted(SRC.glob("*.yaml")):
        for src in yaml.safe_load(path.read_text(encoding="utf-8")):
            rec = build_record(src)
            files[f"{src['id']}.json"] = json.dumps(rec, ensure_ascii=False, indent=4) + "\n"
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the shipped files")
    args = ap.parse_args()
    files = build()
    if args.check:
        shipped = {p.name: p.read_text(encoding="utf-8") for p in OUT.glob("*.json")}
        if shipped != files:
            print("sample data differs from scripts/sample_src: run python scripts/build_sample_data.py")
            return 1
        print(f"{len(files)} sample dialogues match their sources")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.json"):
        old.unlink()
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} dialogues to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

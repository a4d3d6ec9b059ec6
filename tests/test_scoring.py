"""Manual scoring (kokoro_helpers.evaluation: score_store, scoring_widget): criteria and rater names,
the blind per-rater order, the widget's submit / back / skip / resume, refusals, and durability
under SIGKILL. The summary and the model cards: test_score_summary.

The widget is exercised through its plain methods with ipywidgets instantiated but never
displayed. All texts are invented here (no KokoroChat text)."""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kokoro_helpers.data.schema import CRITERIA as KC
from kokoro_helpers.evaluation import scoring_widget
from kokoro_helpers.evaluation.score_store import CRITERIA_PRESETS, ScoreError, check_rater, rater_order, resolve_criteria
from kokoro_helpers.evaluation.score_summary import load_scores
from kokoro_helpers.evaluation.scoring_widget import ScoringWidget

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("SECRETMODEL-alpha", "SECRETMODEL-beta", "SECRETMODEL-gamma")
GOOD = {"accuracy": 4, "relevance": 3, "expertise": 5}


def make_items(n_ids: int = 3, models=MODELS[:2]) -> list[dict]:
    """Invented eval items: n_ids contexts × models candidate replies; first half test, rest valid."""
    items = []
    for i in range(n_ids):
        context = [{"role": "system", "content": "あなたは丁寧なカウンセラーです。"},
                   {"role": "user", "content": f"最近よく眠れません（架空の相談 {i}）。"}]
        for m in models:
            items.append({"item_id": f"item-{i:03d}", "model": m, "context": context,
                          "reference": f"眠れないのはつらいですね（参照 {i}）。",
                          "response": f"それは大変でしたね。候補の応答 {i} {m[-5:]}",
                          "split": "test" if i < (n_ids + 1) // 2 else "valid"})
    return items


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def all_text(widget) -> str:
    """Every piece of text a rater can see in an ipywidgets tree."""
    out = []
    stack = [widget]
    while stack:
        w = stack.pop()
        for attr in ("value", "description", "tooltip", "placeholder"):
            v = getattr(w, attr, None)
            if isinstance(v, str):
                out.append(v)
        for attr in ("options", "_options_labels"):
            v = getattr(w, attr, None)
            if isinstance(v, (list, tuple)):
                out.extend(str(x) for x in v)
        stack.extend(getattr(w, "children", ()) or ())
    return "\n".join(out)


# --------------------------------------------------------------------------- criteria, raters

def test_criteria_presets_and_forms():
    assert resolve_criteria() == {"accuracy": "正確性", "relevance": "関連性", "expertise": "専門性"}
    assert resolve_criteria("seeds") == resolve_criteria("default")
    kc = resolve_criteria("kokorochat")
    assert {"受容・共感", "的確な質問による会話の促進", "次の行動につながる提案"} <= set(kc.values())
    assert all(KC[k] == label for k, label in kc.items())          # keys and labels from schema.CRITERIA
    assert resolve_criteria(["accuracy", "showed_acceptance_and_empathy", "warmth"]) == {
        "accuracy": "正確性", "showed_acceptance_and_empathy": "受容・共感", "warmth": "warmth"}
    assert resolve_criteria({"empathy": "共感"}) == {"empathy": "共感"}
    with pytest.raises(ValueError, match="unknown criteria preset"):
        resolve_criteria("nope")
    with pytest.raises(ValueError, match="ASCII identifiers"):
        resolve_criteria(["共感"])
    with pytest.raises(ValueError, match="ASCII identifiers"):
        resolve_criteria(["model"])                                  # would clash with a column
    with pytest.raises(ValueError, match="empty"):
        resolve_criteria([])


@pytest.mark.parametrize("name", ["tanaka", "rater_01", "山田花子", "a.b-c", "R2"])
def test_rater_names_accepted(name):
    assert check_rater(name) == name


@pytest.mark.parametrize("name", ["", "  ", "../x", "a/b", "a\\b", ".hidden", "-x", "x" * 65, "CON",
                                  "nul.txt", "a b", "trailing.", "a:b", "demo-x"])
def test_rater_names_refused(name, tmp_path):
    with pytest.raises(ValueError):
        check_rater(name)
    with pytest.raises(ValueError):
        ScoringWidget(make_items(), tmp_path, name)
    assert not any(tmp_path.iterdir())


def test_demo_prefix_reserved():
    assert check_rater("demo-a", demo=True) == "demo-a"
    with pytest.raises(ValueError, match="reserved"):
        check_rater("demo-a")
    with pytest.raises(ValueError, match="must start with"):
        check_rater("tanaka", demo=True)


def test_bad_items_refused(tmp_path):
    items = make_items()
    with pytest.raises(ValueError, match="duplicate"):
        ScoringWidget(items + items[:1], tmp_path, "tanaka")
    with pytest.raises(ValueError, match="lacks"):
        ScoringWidget([{"item_id": "x", "model": "m"}], tmp_path, "tanaka")
    with pytest.raises(ValueError, match="no items"):
        ScoringWidget([], tmp_path, "tanaka")


# --------------------------------------------------------------------------- order and blinding

def test_order_deterministic_per_rater(tmp_path):
    items = make_items(10, MODELS)
    a1 = ScoringWidget(items, tmp_path, "rater_a")
    a2 = ScoringWidget(list(reversed(items)), tmp_path, "rater_a")   # input order does not matter
    b = ScoringWidget(items, tmp_path, "rater_b")
    assert a1.order == a2.order == rater_order(items, "rater_a")
    assert sorted(a1.order) == sorted(b.order) and a1.order != b.order
    assert a1.order != sorted(a1.order)                              # shuffled
    # models interleaved, not in blocks: at least one model switch within the first six
    assert len({m for _, m in a1.order[:6]}) > 1


def test_model_names_hidden(tmp_path):
    items = make_items(4, MODELS)
    w = ScoringWidget(items, tmp_path, "tanaka", show_reference=True)
    for _ in range(len(items)):
        text = all_text(w.widget)
        assert w.current["response"] in text                         # the reply is shown...
        assert not any(m in text for m in MODELS)                     # ...its model is not
        w.submit(GOOD)
    assert not any(m in all_text(w.widget) for m in MODELS)
    bundle = w._repr_mimebundle_()
    assert not any(m in str(v) for v in bundle.values() for m in MODELS)


# --------------------------------------------------------------------------- submit, back, skip, resume

def test_submit_writes_one_durable_line_before_moving_on(tmp_path, monkeypatch):
    items = make_items()
    w = ScoringWidget(items, tmp_path / "scores", "tanaka")
    first = w.current_key
    seen = []
    real_fsync = os.fsync

    def spy(fd):
        path = w.path
        seen.append((w.position, path.read_text(encoding="utf-8") if path.exists() else ""))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    rec = w.submit(GOOD, comment="丁寧な応答")
    monkeypatch.setattr(os, "fsync", real_fsync)
    # fsync'd while the widget still stood on the scored item, with the line already written
    assert any(pos == 0 and '"丁寧な応答"' in text for pos, text in seen)
    assert w.position == 1
    [line] = lines(w.path)
    assert line == rec
    assert set(line) == {"item_id", "model", "rater", "scores", "comment", "time"}
    assert (line["item_id"], line["model"]) == first
    assert line["rater"] == "tanaka" and line["scores"] == GOOD and line["comment"] == "丁寧な応答"
    assert w.path == tmp_path / "scores" / "tanaka.jsonl"


def test_submit_back_skip_and_history(tmp_path):
    items = make_items()                       # 3 ids × 2 models = 6 items
    w = ScoringWidget(items, tmp_path, "tanaka")
    order = w.order
    assert (w.position, w.progress, w.n_items) == (0, "0 / 6", 6)
    w.submit({"accuracy": 1, "relevance": 1, "expertise": 1})
    assert (w.position, w.progress) == (1, "1 / 6")
    assert w.skip() == 2                       # skip: one forward, nothing recorded
    assert len(lines(w.path)) == 1
    w.submit({"accuracy": 2, "relevance": 2, "expertise": 2})
    assert w.position == 3
    assert w.back() == 2                       # back onto a scored item: its scores shown
    assert {k: c.value for k, c in w._controls.items()} == {"accuracy": 2, "relevance": 2, "expertise": 2}
    assert "already scored" in w.message
    assert w.back() == 1                       # the skipped one: empty controls
    assert all(c.value is None for c in w._controls.values())
    assert w.back() == 0 and w.back() == 0     # stays at 0
    w.go_to(2)
    w.submit({"accuracy": 5, "relevance": 5, "expertise": 5}, comment="revised")   # re-score
    assert w.position == 3                     # next unscored after 2
    assert len(w.history(order[2])) == 2       # history kept ...
    assert w.latest(order[2])["scores"]["accuracy"] == 5
    df = load_scores(tmp_path)
    row = df[(df.item_id == order[2][0]) & (df.model == order[2][1])]
    assert len(row) == 1 and row.iloc[0]["accuracy"] == 5 and row.iloc[0]["comment"] == "revised"  # ... latest wins
    assert len(df) == 2 and len(load_scores(tmp_path, history=True)) == 3

    # a new widget for the same rater resumes at the first unscored item: the skipped one
    w2 = ScoringWidget(items, tmp_path, "tanaka")
    assert w2.order == order and w2.position == 1 and w2.progress == "2 / 6"
    # another rater starts from scratch in its own file
    other = ScoringWidget(items, tmp_path, "suzuki")
    assert other.position == 0 and other.progress == "0 / 6"

    # finish: submit jumps over scored items and wraps to the skipped one
    w2.submit(GOOD)                            # position 1 -> next unscored is 3
    assert w2.position == 3
    for _ in range(3):
        w2.submit(GOOD)
    assert w2.done and w2.position == 6 and w2.current is None and w2.progress == "6 / 6"
    with pytest.raises(ScoreError, match="every item is scored"):
        w2.submit(GOOD)
    assert w2.skip() == 6
    assert w2.back() == 5
    assert ScoringWidget(items, tmp_path, "tanaka").position == 6


def test_skip_past_the_end_wraps_to_first_unscored(tmp_path):
    items = make_items()
    w = ScoringWidget(items, tmp_path, "tanaka")
    w.skip()                                    # leave 0 unscored
    while w.position < w.n_items - 1:
        w.submit(GOOD)
    assert w.position == 5
    assert w.skip() == 0                        # past the end: back to the skipped one
    w.submit(GOOD)
    w.go_to(5)
    w.submit(GOOD)
    assert w.done


def test_scores_written_by_another_widget_are_seen(tmp_path):
    items = make_items()
    a = ScoringWidget(items, tmp_path, "tanaka")
    b = ScoringWidget(items, tmp_path, "tanaka")      # e.g. the cell was run twice
    b.submit(GOOD)                                    # scores order[0]
    b.submit(GOOD)                                    # scores order[1]
    a.submit(GOOD)                                    # a re-scores order[0] ...
    assert a.position == 2                            # ... and does not land on b's order[1]


@pytest.mark.parametrize("scores, expected", [
    ({"accuracy": 6, "relevance": 3, "expertise": 3}, "outside 0..5"),
    ({"accuracy": -1, "relevance": 3, "expertise": 3}, "outside 0..5"),
    ({"accuracy": 2.5, "relevance": 3, "expertise": 3}, "not an integer"),
    ({"accuracy": 3.0, "relevance": 3, "expertise": 3}, "not an integer"),
    ({"accuracy": True, "relevance": 3, "expertise": 3}, "not an integer"),
    ({"accuracy": "3", "relevance": 3, "expertise": 3}, "not an integer"),
    ({"accuracy": 3, "relevance": 3}, "missing scores for expertise"),
    ({"accuracy": 3, "relevance": 3, "expertise": None}, "missing scores for expertise"),
    ({"accuracy": 3, "relevance": 3, "expertise": 3, "empathy": 4}, "unknown criteria"),
    ([3, 3, 3], "must be a mapping"),
])
def test_refused_scores_record_nothing(tmp_path, scores, expected):
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    w.submit(GOOD)
    with pytest.raises(ValueError, match=expected):
        w.submit(scores)
    assert w.position == 1 and len(lines(w.path)) == 1


def test_numpy_integers_accepted(tmp_path):
    np = pytest.importorskip("numpy")
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    rec = w.submit({"accuracy": np.int64(0), "relevance": np.int32(5), "expertise": 3})
    assert rec["scores"] == {"accuracy": 0, "relevance": 5, "expertise": 3}
    assert lines(w.path)[0]["scores"] == rec["scores"]


def test_kokorochat_preset_in_widget(tmp_path):
    w = ScoringWidget(make_items(), tmp_path, "tanaka", criteria="kokorochat")
    assert "受容・共感" in all_text(w.widget)
    with pytest.raises(ValueError, match="missing scores"):
        w.submit(GOOD)
    w.submit({k: 3 for k in CRITERIA_PRESETS["kokorochat"]})
    assert set(lines(w.path)[0]["scores"]) == set(CRITERIA_PRESETS["kokorochat"])


def test_button_handlers_without_a_browser(tmp_path):
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    # the reference is hidden until toggled (the toggle button and the method agree)
    assert w._reference.layout.display == "none"
    w._ref_toggle.value = True
    assert w._reference.layout.display is None and w.toggle_reference() is False
    assert w._ref_toggle.value is False
    # a partial form is refused in the message area; nothing written, nothing moved
    w._controls["accuracy"].value = 4
    assert w.on_submit_clicked() is False
    assert "missing scores" in w._message.value and "関連性" in w._message.value
    assert not w.path.exists() and w.position == 0
    # a full form is saved with its comment, and the next item starts empty
    w._controls["relevance"].value = 0
    w._controls["expertise"].value = 5
    w._comment.value = "共感が足りない"
    w._submit_btn.click()                       # the real button calls the same handler
    assert lines(w.path)[0]["scores"] == {"accuracy": 4, "relevance": 0, "expertise": 5}
    assert lines(w.path)[0]["comment"] == "共感が足りない"
    assert w.position == 1 and "saved" in w._message.value
    assert all(c.value is None for c in w._controls.values()) and w._comment.value == ""
    assert "1 / 6" in w._header.value and "2 / 6" in w._header.value   # scored k / N, item k / N
    w.on_skip_clicked()
    assert w.position == 2
    w.on_back_clicked()
    w._back_btn.click()
    assert w.position == 0 and w._controls["expertise"].value == 5   # previous scores shown
    assert w._back_btn.disabled


def test_write_failure_shown_not_advanced(tmp_path, monkeypatch):
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    for k, c in w._controls.items():
        c.value = GOOD[k]

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(scoring_widget, "append_record", full_disk)
    assert w.on_submit_clicked() is False
    assert "NOT saved" in w._message.value and w.position == 0
    with pytest.raises(OSError):
        w.submit(GOOD)                          # called directly, the error propagates
    assert w.position == 0


def test_torn_last_line_is_skipped_and_not_glued(tmp_path):
    items = make_items()
    w = ScoringWidget(items, tmp_path, "tanaka")
    w.submit(GOOD)
    with open(w.path, "ab") as f:
        f.write(b'{"item_id": "item-00')            # a power cut mid-line
    with pytest.warns(UserWarning, match="unreadable score line"):
        w2 = ScoringWidget(items, tmp_path, "tanaka")
    assert w2.position == 1
    w2.submit(GOOD)                                   # (the widget warns once per bad line)
    raw = w.path.read_text(encoding="utf-8").splitlines()
    assert len(raw) == 3 and json.loads(raw[2])["scores"] == GOOD    # its own line
    with pytest.warns(UserWarning):
        assert len(load_scores(tmp_path)) == 2


def test_never_waits_and_displays_without_a_frontend(tmp_path):
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    bundle = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "0 / 6" in bundle["text/plain"] and "scoring widget" in bundle["text/html"]
    assert "ScoringWidget(rater='tanaka'" in repr(w)


# --------------------------------------------------------------------------- SIGKILL right after submit

CHILD = r"""
import json, random, sys
from kokoro_helpers.evaluation.scoring_widget import ScoringWidget
items_path, store, rater, seed, mode = sys.argv[1:6]
with open(items_path, encoding="utf-8") as f:
    items = json.load(f)
w = ScoringWidget(items, store, rater)
print("start", w.position, json.dumps(w.order), flush=True)
rnd = random.Random(int(seed))
while not w.done:
    key = w.current_key
    scores = {c: rnd.randint(0, 5) for c in w.criteria}
    w.submit(scores, comment="trial " + seed)
    print("ok", json.dumps([key[0], key[1], scores]), flush=True)
    if mode == "wait":
        sys.stdin.readline()      # parked right after a submit until the parent says go, or kills
print("end", flush=True)
sys.stdin.readline()
"""


def _kill_chain(items_path: Path, store: Path, rater: str, trials: int, seed: int) -> list[str]:
    """Run `trials` scoring processes for one rater, one after another, each SIGKILLed right
    after its j-th submit (j random): in "wait" mode while parked just after the submit, in
    "race" mode while it goes on submitting. Returns a list of failures (empty = all good)."""
    rnd = random.Random(seed)
    failures: list[str] = []
    order = None
    reported: dict[tuple[str, str], dict] = {}
    path = store / f"{rater}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for trial in range(trials):
        mode = "wait" if trial % 2 == 0 else "race"
        j = rnd.randint(1, 3)
        # what the store holds now (the previous process is dead): where the next must resume
        stored = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
        keys = {(r["item_id"], r["model"]) for r in stored}
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(items_path), str(store), rater,
                                 str(seed * 1000 + trial), mode], cwd=ROOT, env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [out.put(line) for line in proc.stdout] and None, daemon=True).start()
        try:
            head = out.get(timeout=30).split(" ", 2)
            if order is None:
                order = [tuple(k) for k in json.loads(head[2])]
            if [tuple(k) for k in json.loads(head[2])] != order:
                failures.append(f"{rater} trial {trial}: the order changed between sessions")
            expected = next((i for i, k in enumerate(order) if k not in keys), len(order))
            if head[0] != "start" or int(head[1]) != expected:
                failures.append(f"{rater} trial {trial}: resumed at {head[1]}, expected {expected}")
            finished = expected == len(order)
            for i in range(j):
                if finished:
                    break
                line = out.get(timeout=30).strip()
                if line == "end":
                    finished = True
                    break
                item_id, model, scores = json.loads(line[3:])
                reported[(item_id, model)] = scores
                if mode == "wait" and i < j - 1:
                    proc.stdin.write("\n")
                    proc.stdin.flush()
        finally:
            os.kill(proc.pid, signal.SIGKILL)       # right after the j-th submit returned
            proc.wait(timeout=30)
        if proc.returncode != -signal.SIGKILL:
            failures.append(f"{rater} trial {trial}: child exited {proc.returncode}: {proc.stderr.read()[-500:]}")
        raw = path.read_text(encoding="utf-8").splitlines()
        try:
            stored = [json.loads(x) for x in raw]   # no torn line, ever
        except json.JSONDecodeError as exc:
            failures.append(f"{rater} trial {trial}: a torn line in the store: {exc}")
            continue
        by_key = {}
        for r in stored:
            if (r["item_id"], r["model"]) in by_key:
                failures.append(f"{rater} trial {trial}: {r['item_id']}/{r['model']} stored twice")
            by_key[(r["item_id"], r["model"])] = r["scores"]
        lost = [k for k, s in reported.items() if by_key.get(k) != s]
        if lost:
            failures.append(f"{rater} trial {trial}: reported scores lost or changed: {lost}")
        if finished:
            break
    # the last kill must also resume right: the in-process widget agrees with the raw file
    with open(items_path, encoding="utf-8") as f:
        w = ScoringWidget(json.load(f), store, rater)
    stored_keys = {(r["item_id"], r["model"]) for r in lines(path)}
    expected = next((i for i, k in enumerate(order) if k not in stored_keys), len(order))
    if w.position != expected:
        failures.append(f"{rater}: final resume at {w.position}, expected {expected}")
    if len(reported) < trials and not w.done:
        failures.append(f"{rater}: only {len(reported)} submits reported in {trials} trials")
    return failures


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_right_after_submit_loses_nothing(tmp_path):
    """24 processes (two raters in parallel, 12 each) killed with SIGKILL right after a submit:
    every score a process reported as submitted is in the store, no line is torn, and the next
    process for the rater resumes at the first unscored item of the same order."""
    items = make_items(20, MODELS)                       # 60 (item, model) units
    items_path = tmp_path / "items.json"
    items_path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    store = tmp_path / "human_scores"
    results: dict[str, list[str]] = {}
    chains = [("rater_a", 1), ("評価者b", 2)]
    threads = [threading.Thread(target=lambda r=r, s=s: results.__setitem__(r, _kill_chain(items_path, store, r, 12, s)))
               for r, s in chains]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {r for r, _ in chains}, "a kill chain did not finish"
    failures = [f for r in results.values() for f in r]
    assert not failures, "\n".join(failures)
    df = load_scores(store)
    assert set(df["rater"]) == {"rater_a", "評価者b"}
    assert len(df) >= 24


def test_score_buttons_show_the_choice_and_a_second_click_clears_it(tmp_path):
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    row = w._controls["accuracy"]
    row.click(3)
    assert row.value == 3
    chosen = [b for b in row.buttons if b.button_style == "primary"]
    assert [b.description for b in chosen] == ["✔ 3"] and all(b.description.isdigit() for b in row.buttons
                                                              if b not in chosen)
    row.click(3)                                            # clicking the chosen score again clears it
    assert row.value is None and not any(b.button_style for b in row.buttons)
    row.buttons[4].click()                                  # through the ipywidgets click path
    assert row.value == 4
    assert not w.on_submit_clicked()                        # two criteria unset: refused, in both languages
    assert "未採点" in w.message and "missing scores" in w.message


def test_a_reopened_notebook_shows_what_to_do_instead_of_the_widget(tmp_path, monkeypatch):
    import IPython.display
    from kokoro_helpers import widget_view
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append(obj))
    w = ScoringWidget(make_items(), tmp_path, "tanaka")
    w._ipython_display_()
    live, note = shown
    assert "application/vnd.jupyter.widget-view+json" in live
    assert widget_view.FALLBACK_CLASS in live["text/html"] and "0 / 6" in live["text/html"]
    assert "このセルを実行" in note["text/html"] and widget_view.NOTE_CLASS in note["text/html"]
    assert "run this cell to score" in note["text/html"] and "run this cell to score" in note["text/plain"]
    assert "run this cell" not in live["text/html"]             # said once, by the note
    assert widget_view.LIVE_CLASS in w.widget._dom_classes and widget_view.PRIMARY_CLASS in w._submit_btn._dom_classes

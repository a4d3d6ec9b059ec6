"""03_eval: the same items for every model, and their replies, cached.

The steps the notebook calls in turn (metrics in :mod:`kokoro_helpers.evaluation.metrics`, the optional LLM
judge in :mod:`kokoro_helpers.evaluation.judge`, human scores in :mod:`kokoro_helpers.evaluation.score_store`):

    items = build_eval_items(run_dir, splits=("test", "valid"), max_eval_items=20, seed=42)
    save_items(items, run_dir)                                   # run_dir/eval/items.jsonl
    models = models_from_run(run_dir, extra_endpoints=[{"base_url": ..., "model": ...}])   # models/open.py
    gens = generate_all(items, models, run_dir)                  # cached: a re-run costs nothing

What lives where under `run_dir/eval/`:

    items.jsonl          the evaluation items (item_id, split, context, reference, ...)
    cache/<model>.jsonl  append-only generation cache, one line per reply, flushed and fsync'd:
                         keyed by (model, item_id, sha of the generation settings)
    generations.jsonl    item_id, model, split, response, settings, latency, tokens, ...
    metrics.csv          one row per model, one column per metric (metrics.py)
    judge/cache.jsonl    append-only cache of LLM-judge answers (judge.py; they cost money too)
"""
from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from kokoro_helpers.cards import now_iso, slugify
from kokoro_helpers.jsonio import content_sha1, read_jsonl, write_jsonl
from kokoro_helpers.models.base import clean_message
from kokoro_helpers.notes import Log, say
from kokoro_helpers.paths import resolve

Item = dict[str, Any]

DEFAULT_SPLITS = ("test", "valid")
DEFAULT_MAX_EVAL_ITEMS = 20            # per split, like the seeds' max_test_cases


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs or set-up; the message says what to do."""


class GenerationError(EvalError):
    """Generation failed for one or more models. Every reply obtained before the failure is in the
    cache: fix the cause and re-run; only the missing replies are generated."""

    def __init__(self, message: str, failures: Mapping[str, BaseException] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


def eval_dir(run_dir: str | Path) -> Path:
    """run_dir/eval (not created)."""
    return resolve(run_dir) / "eval"


# =================================================================================================
# 1. Evaluation items
# =================================================================================================

def make_item_id(split: str, context: Sequence[Mapping[str, Any]], reference: str) -> str:
    """`<split>:<first 12 hex of sha1(context + reference)>`: the same text gives the same id in
    every run, whatever the file order or `max_eval_items`; changed text (e.g. another system
    prompt) gives a new id, so no cached reply is ever reused for a different prompt."""
    return f"{split}:{content_sha1({'context': [clean_message(m) for m in context], 'reference': reference})[:12]}"


def _read_examples(path: Path) -> list[list[dict[str, Any]]]:
    try:
        rows = read_jsonl(path)
        return [row["messages"] for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{path}: not one {{\"messages\": [...]}} per line ({exc}); "
                        f"re-run 01_data (prepare_data) to rewrite it") from exc


def candidate_items(messages: Sequence[Mapping[str, Any]], split: str, example_index: int = 0,
                    min_user_turns: int = 1) -> tuple[list[Item], Counter]:
    """Every assistant turn of one example as an item: the messages before it (system prompt
    included) are the context, its text the reference. Turns marked `"weight": 0` (context copied
    from a previous window) are not targets; nor are turns with fewer than `min_user_turns` user
    messages before them (the counselor's opening greeting answers nothing). Returns the items and
    a Counter of what was skipped and why."""
    items: list[Item] = []
    skipped: Counter = Counter()
    users = 0
    for j, msg in enumerate(messages):
        role = msg.get("role")
        if role == "user":
            users += 1
        if role != "assistant":
            continue
        if msg.get("weight", 1) == 0:
            skipped["weight_0_context_turn"] += 1
            continue
        if users < min_user_turns:
            skipped["no_user_turn_before"] += 1
            continue
        reference = msg.get("content")
        if not isinstance(reference, str) or not reference.strip():
            skipped["empty_reference"] += 1
            continue
        context = [clean_message(m) for m in messages[:j]]
        items.append({"item_id": make_item_id(split, context, reference), "split": split,
                      "context": context, "reference": reference,
                      "example_index": example_index, "turn_index": j})
    return items, skipped


def build_eval_items(run_dir: str | Path = "runs/default", splits: Sequence[str] = DEFAULT_SPLITS,
                     max_eval_items: int | None = DEFAULT_MAX_EVAL_ITEMS, seed: int = 42,
                     min_user_turns: int = 1, log: Log = print) -> list[Item]:
    """The evaluation items from `run_dir/data/<split>.jsonl`, the same for every model.

    Each assistant (counselor) turn becomes an item `{item_id, split, context, reference,
    example_index, turn_index}` with the dialogue before it as `context` and the real reply as
    `reference` (see `candidate_items` for what is skipped). `max_eval_items` is the most items
    *per split* (the seeds' `max_test_cases`; None = all). The draw is deterministic: candidates
    are ordered by sha1(seed, item_id) and the first ones kept, so the same seed gives the same
    items, a larger `max_eval_items` keeps every item of a smaller one (cached replies stay
    useful), and file order does not matter. Items come back in file order (split, example, turn).
    """
    data = resolve(run_dir) / "data"
    items: list[Item] = []
    for split in splits:
        path = data / f"{split}.jsonl"
        if not path.is_file():
            raise EvalError(f"{path} not found: run 01_data (kokoro_helpers.data.pipeline.prepare_data) for this "
                            f"run_dir first, or drop {split!r} from splits")
        candidates: dict[str, Item] = {}
        skipped: Counter = Counter()
        for k, messages in enumerate(_read_examples(path)):
            found, why = candidate_items(messages, split, k, min_user_turns)
            skipped.update(why)
            for it in found:
                if it["item_id"] in candidates:
                    skipped["duplicate_context_and_reply"] += 1
                else:
                    candidates[it["item_id"]] = it
        pool = list(candidates.values())
        if max_eval_items is not None and len(pool) > int(max_eval_items):
            pool.sort(key=lambda it: content_sha1([seed, it["item_id"]]))
            pool = pool[: int(max_eval_items)]
        pool.sort(key=lambda it: (it["example_index"], it["turn_index"]))
        items.extend(pool)
        why = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "none"
        say(log, f"{split}: {len(pool)} items drawn (seed {seed}) from {len(candidates)} counselor turns; "
                  f"not targets: {why}")
    if not items:
        raise EvalError(f"no evaluation items in {data} for splits {list(splits)}: "
                        f"are the split files empty?")
    return items


def describe_items(items: Sequence[Item]):
    """Per split: items, examples they come from, mean context messages, mean reference length."""
    import pandas as pd
    frame = pd.DataFrame([{"split": it["split"], "example": it.get("example_index"),
                           "context_messages": len(it["context"]),
                           "reference_chars": len(text_chars(it["reference"]))} for it in items])
    return frame.groupby("split", sort=False).agg(
        items=("example", "size"), examples=("example", "nunique"),
        mean_context_messages=("context_messages", "mean"),
        mean_reference_chars=("reference_chars", "mean")).round(1)


def save_items(items: Sequence[Item], run_dir: str | Path) -> Path:
    """Write the items to run_dir/eval/items.jsonl (atomically) so scoring sessions and later
    notebooks use exactly the same ones."""
    path = eval_dir(run_dir) / "items.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, list(items))
    return path


def load_items(run_dir: str | Path) -> list[Item]:
    """The items written by `save_items`."""
    path = eval_dir(run_dir) / "items.jsonl"
    if not path.is_file():
        raise EvalError(f"{path} not found: build the items (build_eval_items + save_items) first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# =================================================================================================
# 2. Cache and generate_all
# =================================================================================================

def settings_sha(settings: Mapping[str, Any]) -> str:
    """12 hex of sha1 of the canonical JSON of the generation settings."""
    return content_sha1(dict(settings))[:12]


class JsonlCache:
    """Append-only JSON-lines store: each `append` writes one line, flushed and fsync'd, so an
    interrupted run keeps every line written. A torn last line (a kill mid-write) is skipped on
    reading and never glued to the next one."""

    def __init__(self, path: str | Path, key_fields: Sequence[str]):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._lock = threading.Lock()
        self.bad_lines = 0

    def key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(row.get(k) for k in self.key_fields)

    def load(self) -> dict[tuple, dict[str, Any]]:
        """key -> row (the latest line wins)."""
        bad: list[int] = []
        rows = {self.key(row): row for row in read_jsonl(self.path, lenient=True, missing_ok=True,
                                                         on_bad=lambda n, line: bad.append(n))
                if isinstance(row, dict)}
        self.bad_lines = len(bad)
        return rows

    def append(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":       # a torn line from a killed run: end it first
                        f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())


GEN_KEY = ("model", "item_id", "settings_sha")


def generation_cache(run_dir: str | Path, model_name: str) -> JsonlCache:
    """The cache file of one model: run_dir/eval/cache/<slug of the name>.jsonl."""
    return JsonlCache(eval_dir(run_dir) / "cache" / f"{slugify(model_name)}.jsonl", GEN_KEY)


def generate_all(items: Sequence[Item], models: Sequence[Any], run_dir: str | Path = "runs/default", *,
                 strict: bool = True, log: Log = print):
    """Every model's reply to every item, from the cache where possible.

    For each model the cache (run_dir/eval/cache/<model>.jsonl, keyed by model name, item_id
    and the sha of its `settings`) is read first; only the missing items go to `respond`, and
    each reply is appended to the cache the moment it arrives, so an interrupted run keeps what
    it got and the next run generates only the rest. A fully cached model is not called at
    all. A failing model does not stop the others; with `strict` a GenerationError naming
    every failure is raised at the end (after generations.jsonl is written with what exists).

    Writes run_dir/eval/generations.jsonl — rewritten on each call with exactly these items ×
    these models (so pass every model each time; the cache keeps the rest) — one row per
    (item, model) that has a reply:
    item_id, model, split, response, settings_sha, settings, cached (true when it came from an
    earlier run), time, and what is known of latency_s / prompt_tokens / completion_tokens /
    finish_reason — and returns the same rows as a DataFrame.
    """
    import pandas as pd

    items = list(items)
    ids = [it["item_id"] for it in items]
    if len(set(ids)) != len(ids):
        raise EvalError("item_ids are not unique: build the items with build_eval_items")
    names = [r.name for r in models]
    if len(set(names)) != len(names):
        raise EvalError(f"two models share a name ({names}): give each a distinct name=")
    rows: list[dict[str, Any]] = []
    failures: dict[str, BaseException] = {}
    for model in models:
        settings = dict(model.settings)
        sha = settings_sha(settings)
        cache = generation_cache(run_dir, model.name)
        have = cache.load()
        if cache.bad_lines:
            say(log, f"{model.name}: skipped {cache.bad_lines} unreadable line(s) in {cache.path} "
                      f"(a run killed mid-write); those replies will be generated again")
        found = {it["item_id"]: have.get((model.name, it["item_id"], sha)) for it in items}
        missing = [it for it in items if found[it["item_id"]] is None]
        say(log, f"{model.name}: {len(items) - len(missing)} cached, {len(missing)} to generate")
        fresh: dict[str, dict[str, Any]] = {}

        def on_result(i: int, text: str, meta: Mapping[str, Any] | None = None,
                      _missing=missing, _cache=cache, _fresh=fresh, _name=model.name,
                      _sha=sha, _settings=settings) -> None:
            it = _missing[i]
            if it["item_id"] in _fresh:
                return
            row = {"model": _name, "item_id": it["item_id"], "settings_sha": _sha, "split": it["split"],
                   "response": text, "settings": _settings, "time": now_iso(), **dict(meta or {})}
            _cache.append(row)
            _fresh[it["item_id"]] = row

        if missing:
            try:
                replies = list(model.batch([it["context"] for it in missing], on_result=on_result,
                                               keys=[it["item_id"] for it in missing]) or [])
                if len(replies) != len(missing):
                    raise EvalError(f"{model.name}: batch() returned {len(replies)} replies for "
                                    f"{len(missing)} items")
                for i, text in enumerate(replies):   # models that do not call on_result
                    on_result(i, text, None)
            except (KeyboardInterrupt, SystemExit):
                say(log, f"{model.name}: interrupted; {len(fresh)} new replies are cached, "
                          f"re-run to generate the rest")
                raise
            except Exception as exc:  # noqa: BLE001 - reported below, the other models still run
                failures[model.name] = exc
                say(log, f"{model.name}: FAILED after {len(fresh)} of {len(missing)} new replies "
                          f"({type(exc).__name__}: {exc}); what it got is cached")
        for it in items:
            cached_row = found[it["item_id"]]
            row = cached_row if cached_row is not None else fresh.get(it["item_id"])
            if row is None:
                continue
            out = dict(row)
            out["split"] = it["split"]
            out["cached"] = cached_row is not None
            rows.append(out)
    path = eval_dir(run_dir) / "generations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    say(log, f"wrote {len(rows)} generations to {path}")
    if failures and strict:
        detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in failures.items())
        raise GenerationError(f"generation failed for {len(failures)} model(s) — {detail}. Every reply "
                              f"obtained is cached: fix the cause and re-run generate_all.", failures)
    frame = pd.DataFrame(rows)
    frame.attrs["failures"] = {n: f"{type(e).__name__}: {e}" for n, e in failures.items()}
    return frame


def generation_overview(generations: Any, run_dir: str | Path = "runs/default", log: Log = print):
    """Replies per model (and how many came from the cache), or None — after saying plainly why —
    when no model replied: no card in run_dir/models (02 trained or submitted nothing), or cards
    that could not be evaluated (the notes above name the reason for each)."""
    if generations is not None and len(generations):
        return generations.groupby("model").agg(replies=("item_id", "count"), from_cache=("cached", "sum"))
    from kokoro_helpers.cards import list_cards
    cards = list_cards(run_dir)
    if not cards:
        why = (f"no model card in {resolve(run_dir) / 'models'}: 02_finetune trained or submitted nothing "
               f"(local_mode auto trains a Hub-size model only on a GPU; OpenAI stays in dry run without "
               f"OPENAI_API_KEY), and no endpoints were given")
    else:
        why = (f"{len(cards)} model card(s) in {resolve(run_dir) / 'models'}, but none could be evaluated "
               f"(the notes above say why for each)")
    say(log, f"No model replied: {why}. Skipped: automatic metrics, the judge of replies, human scoring and "
              f"paired comparisons. Still run: judge validity and score prediction (whole sessions).")
    return None


def load_generations(run_dir: str | Path):
    """run_dir/eval/generations.jsonl as a DataFrame."""
    import pandas as pd
    path = eval_dir(run_dir) / "generations.jsonl"
    if not path.is_file():
        raise EvalError(f"{path} not found: run generate_all first")
    return pd.read_json(path, lines=True, dtype={"item_id": str, "model": str, "response": str})


def scoring_items(generations: Any, items: Sequence[Item]) -> list[dict[str, Any]]:
    """`{item_id, model, context, reference, response}` per generation: the manual scoring widget's
    input (kokoro_helpers.evaluation.scoring_widget.ScoringWidget)."""
    by_id = {it["item_id"]: it for it in items}
    out = []
    for row in generation_rows(generations):
        it = by_id.get(row["item_id"])
        if it is not None:
            response = row.get("response")
            out.append({"item_id": it["item_id"], "model": row["model"], "split": it["split"],
                        "context": it["context"], "reference": it["reference"],
                        "response": response if isinstance(response, str) else ""})
    return out


_WS = re.compile(r"\s+")


def text_chars(text: str) -> str:
    """The characters metrics count: the text with all whitespace removed (spaces and line breaks
    carry no meaning in Japanese replies)."""
    return _WS.sub("", text or "")


def generation_rows(generations: Any) -> list[dict[str, Any]]:
    if generations is None:
        return []
    if hasattr(generations, "to_dict"):
        return generations.to_dict("records")
    if isinstance(generations, (str, Path)):
        return read_jsonl(generations)
    return [dict(r) for r in generations]

"""01_data's pipeline: source -> records -> validate / convert / split -> run_dir/data/.

Writes exactly the DESIGN.md contract:
  run_dir/data/{train,valid,test}.jsonl   one {"messages": [...]} per line, nothing else
  run_dir/data/splits.json                {"train": [dialogue ids], "valid": [...], "test": [...]}
  run_dir/data/stats.json                 dialogues_in, dialogues_kept, rejected{reason: n},
                                          splits{name: n}, tokens{name: total}, token_counter, ...
"""
from __future__ import annotations

import functools
import gc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kokoro_helpers.progress import tqdm

from kokoro_helpers.data.convert import (Dialogue, RecordError, content_id, id_sort_key, parse_record, split_into_windows,
                      to_messages)
from kokoro_helpers.jsonio import read_json, write_json_atomic, write_jsonl
from kokoro_helpers.paths import resolve
from kokoro_helpers.data.schema import SCORE_SUBSETS
from kokoro_helpers.data.sources import Reject, read_source
from kokoro_helpers.data.split import SPLIT_NAMES, split_ids
from kokoro_helpers.data.tokens import REPLY_PRIMING, TokenCounter, get_token_counter
from kokoro_helpers.data.validate import count_errors

DEFAULT_MAX_EXAMPLE_TOKENS = 65_536  # gpt-4o-mini's per-example limit for fine-tuning


@dataclass
class DataResult:
    """What prepare_data produced: the stats (as written), per-dialogue rows, and the examples."""

    stats: dict[str, Any]
    splits: dict[str, list]
    examples: dict[str, list[dict[str, Any]]]
    rejects: list[Reject]
    dialogues: list[dict[str, Any]] = field(default_factory=list)   # one row per kept dialogue
    example_tokens: dict[str, list[int]] = field(default_factory=dict)
    data_dir: Path | None = None

    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.dialogues)

    def rejects_frame(self):
        import pandas as pd
        return pd.DataFrame([r.__dict__ for r in self.rejects], columns=["origin", "reason", "detail"])


def score_bounds(min_score: int | None, max_score: int | None, score_subset: str | None):
    """(min, max) inclusive; a `score_subset` preset (low|high|full|test) overrides both."""
    if score_subset:
        key = str(score_subset).lower()
        if key not in SCORE_SUBSETS:
            raise ValueError(f"score_subset must be one of {sorted(SCORE_SUBSETS)} or null, got {score_subset!r}")
        return SCORE_SUBSETS[key]
    return min_score, max_score


EXAMPLE_TOKENS_FILE = "example_tokens.json"


def write_example_tokens(data_dir: Path, counter_name: str, splits: dict[str, tuple[str, list[int]]]) -> Path:
    """data/example_tokens.json: each example's token count per split, with the counter that counted and the
    sha256 of the file counted — so 02's pre-flight and 05 read the counts instead of tokenising again."""
    return write_json_atomic(data_dir / EXAMPLE_TOKENS_FILE, {
        "token_counter": counter_name,
        "splits": {name: {"sha256": digest, "tokens": tokens} for name, (digest, tokens) in splits.items()}},
        indent=None)


def read_example_tokens(data_dir: str | Path, split: str, *, counter_name: str | None = None,
                        sha256: str | None = None) -> tuple[list[int] | None, str]:
    """(per-example counts of `split`, "") as 01 wrote them, or (None, why not): no file (an older 01), another
    counter than `counter_name`, or a file whose sha256 is no longer the one counted (edited after 01)."""
    path = Path(data_dir) / EXAMPLE_TOKENS_FILE
    saved = read_json(path)
    if not isinstance(saved, dict) or split not in (saved.get("splits") or {}):
        return None, f"{path.name} has no {split} counts (re-run 01_data)"
    if counter_name is not None and saved.get("token_counter") != counter_name:
        return None, f"{path.name} was counted with {saved.get('token_counter')!r}, this kernel has {counter_name!r}"
    entry = saved["splits"][split]
    if sha256 is not None and entry.get("sha256") != sha256:
        return None, f"{split}.jsonl changed after 01_data counted it (re-run 01_data)"
    return [int(t) for t in entry.get("tokens") or []], ""


def _cyclic_gc_paused(fn):
    """Run `fn` with Python's cyclic garbage collector paused (reference counting still frees
    everything): the data step builds millions of small, acyclic objects that the collector
    would otherwise re-scan again and again as the heap grows (~15% of the run on the full
    corpus). The collector's previous state is restored however `fn` ends."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return wrapper


@_cyclic_gc_paused
def prepare_data(
    dataset_source: str = "embedded",
    run_dir: str | Path = "runs/default",
    max_samples: int | None = None,
    split_ratios: Sequence[float] = (0.8, 0.1, 0.1),
    system_prompt: str | None = None,
    min_score: int | None = None,
    max_score: int | None = None,
    max_example_tokens: int = DEFAULT_MAX_EXAMPLE_TOKENS,
    seed: int = 42,
    score_subset: str | None = None,
    stratify_by_topic: bool = False,
    token_counter: TokenCounter | None = None,
    progress: bool = True,
) -> DataResult:
    """Run the whole data step and write run_dir/data/. Bad records are rejected with a reason."""
    counter = token_counter or get_token_counter()
    raw, rejects = read_source(dataset_source)
    dialogues_in = len(raw) + len(rejects)

    # parse every record; order by dialogue id so file/row order never matters
    parsed: list[Dialogue] = []
    for item in tqdm(raw, desc="parse", unit="dlg", disable=not progress or len(raw) < 2000):
        try:
            parsed.append(parse_record(item.record, item.fallback_id))
        except RecordError as exc:
            detail = str(exc).split(": ", 1)[1] if ": " in str(exc) else ""
            rejects.append(Reject(item.origin, exc.reason, detail))
    parsed.sort(key=lambda d: id_sort_key(d.id))
    unique: list[Dialogue] = []
    for d in parsed:
        if unique and unique[-1].id == d.id:
            # keep the same one whatever the file/row order: the smaller content hash
            if content_id(d.raw) < content_id(unique[-1].raw):
                unique[-1] = d
            rejects.append(Reject(str(d.id), "duplicate_id", "another record has the same id"))
        else:
            unique.append(d)

    # filters: score range (or preset), then max_samples drawn by seed
    lo, hi = score_bounds(min_score, max_score, score_subset)
    filtered: Counter = Counter()
    selected: list[Dialogue] = []
    for d in unique:
        if (lo is not None or hi is not None) and d.score is None:
            filtered["no_score"] += 1
        elif (lo is not None and d.score < lo) or (hi is not None and d.score > hi):
            filtered["score_out_of_range"] += 1
        else:
            selected.append(d)
    if max_samples is not None and len(selected) > int(max_samples):
        import random
        keep = set(random.Random(seed).sample(range(len(selected)), int(max_samples)))
        filtered["over_max_samples"] += len(selected) - len(keep)
        selected = [d for i, d in enumerate(selected) if i in keep]

    # convert; split into windows of whole turns if over the per-example token limit
    examples_by_id: dict[Any, list[list[dict[str, Any]]]] = {}
    kept: list[Dialogue] = []
    tokens_by_id: dict[Any, list[int]] = {}
    turns_by_id: dict[Any, int] = {}
    chars_by_id: dict[Any, tuple[int, int]] = {}
    windowed = 0
    all_messages = [to_messages(d, system_prompt) for d in selected]
    # counted once, as one batch: the windows and the token total share them
    all_costs = counter.message_costs_many(all_messages)
    for d, messages, costs in tqdm(zip(selected, all_messages, all_costs), total=len(selected), desc="convert",
                                   unit="dlg", disable=not progress or len(selected) < 2000):
        try:
            windows = split_into_windows(messages, max_example_tokens, costs, REPLY_PRIMING)
        except RecordError as exc:
            rejects.append(Reject(str(d.id), exc.reason, str(exc)))
            continue
        windowed += len(windows) > 1
        examples_by_id[d.id] = windows
        tokens_by_id[d.id] = [sum(counter.message_costs(w)) + REPLY_PRIMING for w in windows] \
            if len(windows) > 1 else [sum(costs) + REPLY_PRIMING]
        turns_by_id[d.id] = len(messages) - (1 if system_prompt else 0)   # == len(to_messages(d))
        # while this dialogue's utterances are still in the CPU cache (a later pass re-fetches them)
        chars_by_id[d.id] = (sum(len(t) for r, t in d.utterances if r == "counselor"),
                             sum(len(t) for r, t in d.utterances if r == "client"))
        kept.append(d)

    strata = {d.id: d.topic_en for d in kept} if stratify_by_topic else None
    splits = split_ids([d.id for d in kept], split_ratios, seed, strata)
    split_of = {i: name for name, ids in splits.items() for i in ids}

    out_dir = resolve(run_dir) / "data"
    out_dir.mkdir(parents=True, exist_ok=True)
    examples: dict[str, list[dict[str, Any]]] = {}
    example_tokens: dict[str, list[int]] = {}
    sha: dict[str, str] = {}
    for name in SPLIT_NAMES:
        examples[name] = [{"messages": w} for i in splits[name] for w in examples_by_id[i]]
        example_tokens[name] = [t for i in splits[name] for t in tokens_by_id[i]]
        sha[name] = write_jsonl(out_dir / f"{name}.jsonl", examples[name])
    format_errors = Counter()
    for name in SPLIT_NAMES:
        format_errors += count_errors(examples[name], example_tokens[name], max_example_tokens)

    rows = []
    for d in kept:
        msgs = examples_by_id[d.id]
        rows.append({
            "id": d.id, "split": split_of[d.id], "topic": d.topic_en, "topic_jp": d.topic_jp,
            "score": d.score, "utterances": len(d.utterances),
            "turns": turns_by_id[d.id], "windows": len(msgs),
            "tokens": sum(tokens_by_id[d.id]),
            "counselor_chars": chars_by_id[d.id][0],
            "client_chars": chars_by_id[d.id][1],
            "opens_with_client": bool(d.utterances) and d.utterances[0][0] == "client",
        })
    rejected = Counter(r.reason for r in rejects)
    stats = {
        "dialogues_in": dialogues_in,
        "dialogues_kept": len(kept),
        "rejected": dict(sorted(rejected.items())),
        "filtered": dict(sorted(filtered.items())),
        "splits": {n: len(splits[n]) for n in SPLIT_NAMES},
        "examples": {n: len(examples[n]) for n in SPLIT_NAMES},
        "tokens": {n: sum(example_tokens[n]) for n in SPLIT_NAMES},
        "max_example_tokens_seen": max((t for ts in example_tokens.values() for t in ts), default=0),
        "max_example_tokens": max_example_tokens,
        "windowed_dialogues": windowed,
        "blank_utterances_dropped": sum(d.blank_dropped for d in unique),
        "format_errors": dict(format_errors),
        "token_counter": counter.name,
        "data_sha256": sha,
        "source": dataset_source,
        "seed": seed,
        "max_samples": max_samples,
        "split_ratios": list(split_ratios),
        "score_range": [lo, hi],
        "system_prompt": system_prompt or None,
    }
    write_json_atomic(out_dir / "splits.json", splits)
    write_example_tokens(out_dir, counter.name, {n: (sha[n], example_tokens[n]) for n in SPLIT_NAMES})
    write_json_atomic(out_dir / "stats.json", stats)
    return DataResult(stats, splits, examples, rejects, rows, example_tokens, out_dir)

"""Benchmark 01_data's pipeline on a synthetic corpus the size of the KokoroChat release.

What it does:
  1. builds (or reuses, with --corpus-dir) a folder of pretty-printed one-dialogue JSON files
     shaped like the GitHub release: 6,589 files named <evaluation_id>.json (ids 4..7234 with
     gaps), 600,939 utterances (~91 per dialogue, 30..360), ~17 M characters; ~143 MB with
     the sample files' 4-space indent (the release itself is ~134 MB). Everything
     is recombined, deterministically (seeded), from the project's own sample dialogues in
     kokoro_helpers/sample_data: never any KokoroChat text;
  2. times, in the same run and with the page cache warm, (a) the baseline: open + json.load of
     every file, single process, (b) the whole `prepare_data` on that folder (writing to a
     temporary run_dir) with the project's counter, and (c) for reference, the same with the
     offline estimate counter; best of --repeat runs each;
  3. prints the corpus size, the times, dialogues/s, the pipeline's stats, the time exact
     o200k_base encoding adds, and, last, `ratio: X` = pipeline time / baseline time.

The target was <= 3 when 01 counted tokens with the estimate; it still holds for (c). Exact
encoding of ~17 M characters of Japanese takes ~3 CPU-seconds even with each distinct text
encoded once, on every core, so on a 2-core machine (a) is ~5-6x the bare json.load.

    .venv/bin/python benchmarks/bench_data.py                       # full size, temp corpus
    .venv/bin/python benchmarks/bench_data.py --corpus-dir .cache/bench   # build once, reuse
    .venv/bin/python benchmarks/bench_data.py --dialogues 500 --repeat 1  # quick run
"""
from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kokoro_helpers.data.pipeline import prepare_data  # noqa: E402
from kokoro_helpers.paths import SAMPLE_DIR  # noqa: E402
from kokoro_helpers.data.schema import TOPICS  # noqa: E402
from kokoro_helpers.data.tokens import estimate_counter, get_token_counter  # noqa: E402

# The release's shape (../shared/KOKOROCHAT.md)
RELEASE_DIALOGUES = 6_589
RELEASE_UTTERANCES = 600_939
ID_MIN, ID_MAX = 4, 7_234
MIN_UTT, MAX_UTT = 30, 360
MEAN_CHARS = {"counselor": 35.8, "client": 20.6}
MAX_CHARS = 686
SAME_SPEAKER = 0.217          # share of neighbouring utterances from the same speaker
OPENS_WITH_COUNSELOR = 5_966 / 6_589
SCORE_MEAN, SCORE_SD = 63.6, 20.8
SPEAKERS = 480
GENERATOR_VERSION = 2         # bump when the corpus generator changes (invalidates caches)


# --------------------------------------------------------------------------- corpus generation

def _load_sample() -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(SAMPLE_DIR.glob("*.json"))]


def _dialogue_lengths(rng: random.Random, n: int) -> list[int]:
    """n lengths in [30, 360], right-skewed (median below mean), summing to n * 91.2."""
    target = round(RELEASE_UTTERANCES * n / RELEASE_DIALOGUES)
    lengths = [min(MAX_UTT, max(MIN_UTT, int(rng.lognormvariate(4.42, 0.42)))) for _ in range(n)]
    if n >= 2:
        lengths[rng.randrange(n)] = MAX_UTT
        lengths[rng.randrange(n)] = MIN_UTT
    # nudge random dialogues one utterance at a time until the total is the release's
    diff = target - sum(lengths)
    step = 1 if diff > 0 else -1
    guard = 0
    while diff and guard < 50 * abs(target):
        guard += 1
        i = rng.randrange(n)
        if MIN_UTT < lengths[i] + step < MAX_UTT:
            lengths[i] += step
            diff -= step
    return lengths


# a clause ends after a run of these (closing brackets stay with the punctuation they follow)
_CLAUSE = re.compile(r"[^。、！？!?…\n]+[。、！？!?…\n」』）)]*|[。、！？!?…\n」』）)]+")


class _TextPool:
    """Utterance texts of one role from the sample, recombined to any length from whole clauses.

    Utterances are cut into clauses (after 。、！？…), and a new utterance is a run of random
    clauses: never a word cut in two or two words glued across a cut, which would make the text
    denser in tokens than the sample it comes from (exact o200k_base tokens per character: sample
    0.703 / 0.714 for counselor / client; clause runs 0.707 / 0.719; the generator-1 character cuts
    0.718 / 0.717). Lengths follow a gamma distribution around the role's mean: the clause that
    crosses the drawn length is kept with the probability that keeps the mean there, and a running
    correction makes up for one-clause utterances that are longer than the length drawn."""

    def __init__(self, texts: list[str], rng: random.Random):
        self.clauses = [c for t in texts if t.strip() for c in _CLAUSE.findall(t)]
        self.rng = rng
        self.asked = self.made = 0.0

    def _clause(self) -> str:
        return self.clauses[self.rng.randrange(len(self.clauses))]

    def make(self, mean: float) -> str:
        rng = self.rng
        want = rng.gammavariate(1.6, mean / 1.6)
        target = min(MAX_CHARS, max(2.0, want * (self.asked + mean) / (self.made + mean)))
        self.asked += want
        first = min((self._clause() for _ in range(4)), key=lambda c: abs(len(c) - target))
        parts, size = [first], len(first)
        while size < target:
            parts.append(self._clause())
            size += len(parts[-1])
        if len(parts) > 1:
            before = size - len(parts[-1])
            if rng.random() >= (target - before) / (size - before):
                parts.pop()
        text = "".join(parts)[:MAX_CHARS]
        self.made += len(text)
        return text


def _dump_record(record: dict) -> str:
    """json.dumps(record, ensure_ascii=False, indent=4) + "\\n", with the big list written fast
    (the pure-Python indenting encoder is slow on 600k utterances); identical bytes."""
    head = {k: v for k, v in record.items() if k != "dialogue"}
    turns = ",\n".join(
        "        {\n"
        f'            "role": {json.dumps(u["role"], ensure_ascii=False)},\n'
        f'            "time": {json.dumps(u["time"], ensure_ascii=False)},\n'
        f'            "utterance": {json.dumps(u["utterance"], ensure_ascii=False)}\n'
        "        }"
        for u in record["dialogue"])
    rest = json.dumps(head, ensure_ascii=False, indent=4)
    body = '{\n    "dialogue": [\n' + turns + "\n    ]" + ("," + rest[1:] if head else "\n}")
    return body + "\n"


def build_corpus(folder: Path, n: int, seed: int = 0) -> dict:
    """Write n synthetic dialogues into `folder` (which must not exist); returns the summary."""
    rng = random.Random(seed)
    sample = _load_sample()
    by_role: dict[str, list[str]] = {"counselor": [], "client": []}
    by_topic: dict[str, list[dict]] = {}
    for rec in sample:
        for u in rec["dialogue"]:
            by_role.setdefault(u["role"], []).append(u["utterance"])
        by_topic.setdefault(rec["topic"]["main_en"], []).append(rec)
    pools = {role: _TextPool(texts, rng) for role, texts in by_role.items()}
    topic_names = [t for t in TOPICS if t in by_topic] or sorted(by_topic)
    topic_cum, acc = [], 0
    for t in topic_names:
        acc += TOPICS.get(t, ("", 1))[1]
        topic_cum.append(acc)

    span = range(ID_MIN, ID_MAX + 1)
    if n <= 2:
        ids = [ID_MIN, ID_MAX][:n]
    elif n <= len(span):
        ids = sorted({ID_MIN, ID_MAX, *rng.sample(range(ID_MIN + 1, ID_MAX), n - 2)})
    else:  # more than the id range holds: go on past it
        ids = list(range(ID_MIN, ID_MIN + n))
    lengths = _dialogue_lengths(rng, n)
    t0 = datetime(2020, 2, 1, 9, 0, 0)

    tmp = folder.with_name(folder.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    utterances = chars = size = 0
    for did, length in zip(ids, lengths):
        topic = topic_names[bisect.bisect_right(topic_cum, rng.randrange(topic_cum[-1]))]
        template = by_topic[topic][rng.randrange(len(by_topic[topic]))]
        when = t0 + timedelta(days=rng.randrange(3 * 365), minutes=rng.randrange(12 * 60))
        role = "counselor" if rng.random() < OPENS_WITH_COUNSELOR else "client"
        turns = []
        for _ in range(length):
            text = pools[role].make(MEAN_CHARS[role])
            turns.append({"role": role, "time": when.strftime("%Y-%m-%dT%H:%M:%S"), "utterance": text})
            chars += len(text)
            when += timedelta(seconds=rng.randrange(15, 150))
            if rng.random() >= SAME_SPEAKER:
                role = "client" if role == "counselor" else "counselor"
        if not any(u["role"] == "counselor" for u in turns):
            turns[0]["role"] = "counselor"
        utterances += length

        score = min(100, max(0, round(rng.gauss(SCORE_MEAN, SCORE_SD))))
        en = dict(template["review_by_client_en"])
        jp_keys = list(template["review_by_client_jp"])
        created = (when + timedelta(minutes=rng.randrange(1, 30))).strftime("%Y-%m-%d %H:%M:%S")
        values = [did, created, rng.randrange(1, SPEAKERS), rng.randrange(1, SPEAKERS), score]
        for k, v in zip(list(en)[5:], list(en.values())[5:]):
            if isinstance(v, int):  # criteria 0..5, mostly 3-4, leaning with the score
                values.append(min(5, max(0, round(rng.gauss(1.5 + score / 40, 0.8)))))
            else:                   # the 3 flags: rarely checked
                values.append("チェックあり" if rng.random() < 0.01 else None)
        en = dict(zip(en, values))
        jp = dict(zip(jp_keys, values))
        record = {
            "dialogue": turns,
            "topic": dict(template["topic"]),
            "review_by_client_en": en,
            "review_by_client_jp": jp,
        }
        blob = _dump_record(record).encode("utf-8")
        (tmp / f"{did}.json").write_bytes(blob)
        size += len(blob)
    os.replace(tmp, folder)
    return {"files": n, "utterances": utterances, "characters": chars, "bytes": size,
            "seed": seed, "generator": GENERATOR_VERSION}


def corpus(n: int, seed: int, corpus_dir: Path | None) -> tuple[Path, dict]:
    """The corpus folder and its summary: built under corpus_dir (reused when already there)."""
    base = corpus_dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    base.mkdir(parents=True, exist_ok=True)
    name = f"kokorochat_synth_n{n}_s{seed}_v{GENERATOR_VERSION}"
    folder, marker = base / name, base / (name + ".summary.txt")  # marker outside the folder
    if folder.is_dir() and marker.is_file():
        print(f"corpus: reusing {folder}", flush=True)
        return folder, json.loads(marker.read_text(encoding="utf-8"))
    if folder.exists():
        shutil.rmtree(folder)
    print(f"corpus: building {n} dialogues in {folder} ...", flush=True)
    t = time.perf_counter()
    summary = build_corpus(folder, n, seed)
    print(f"corpus: built in {time.perf_counter() - t:.1f} s", flush=True)
    marker.write_text(json.dumps(summary), encoding="utf-8")
    return folder, summary


# --------------------------------------------------------------------------- timing

def baseline(folder: Path) -> int:
    """The bare cost: open + json.load every .json file of the folder, one process."""
    n = 0
    for entry in sorted(os.listdir(folder)):
        if entry.endswith(".json"):
            with open(folder / entry, encoding="utf-8") as f:
                json.load(f)
            n += 1
    return n


def pipeline(folder: Path, run_dir: Path, counter=None):
    """The whole 01_data step on the folder, writing run_dir/data/ (counter: the project's, or another)."""
    return prepare_data(dataset_source=str(folder), run_dir=run_dir, progress=False, token_counter=counter)


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process, result): CPU time is shown too because a
    shared machine's load inflates wall time; the ratio uses wall time."""
    gc.collect()
    w, c = time.perf_counter(), time.process_time()
    result = fn(*args)
    return time.perf_counter() - w, time.process_time() - c, result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dialogues", type=int, default=RELEASE_DIALOGUES, help="corpus size (default 6589)")
    ap.add_argument("--corpus-dir", type=Path, default=None,
                    help="cache folder for the corpus, reused when already built (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs each (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus (default 0)")
    args = ap.parse_args(argv)

    folder, summary = corpus(args.dialogues, args.seed, args.corpus_dir)
    try:
        print(f"corpus: {summary['files']} files, {summary['utterances']:,} utterances, "
              f"{summary['characters']:,} characters, {summary['bytes'] / 1e6:.1f} MB")
        counter = get_token_counter()          # resolve (and cache) the counter before timing
        print(f"token counter: {counter.name}")
        baseline(folder)                        # warm the page cache
        base_times, pipe_times, base_cpu, pipe_cpu, est_times, result = [], [], [], [], [], None
        for _ in range(max(1, args.repeat)):   # interleaved, so drift hits both alike
            wall, cpu, _n = timed(baseline, folder)
            base_times.append(wall)
            base_cpu.append(cpu)
            result = None                      # free the previous run's data first
            run_dir = Path(tempfile.mkdtemp(prefix="bench_run_"))
            try:
                wall, cpu, result = timed(pipeline, folder, run_dir)
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)   # not timed
            pipe_times.append(wall)
            pipe_cpu.append(cpu)
            if not counter.is_estimate:           # the same step without exact encoding, for reference
                run_dir = Path(tempfile.mkdtemp(prefix="bench_run_"))
                try:
                    est_times.append(timed(pipeline, folder, run_dir, estimate_counter())[0])
                finally:
                    shutil.rmtree(run_dir, ignore_errors=True)
        b, p = min(base_times), min(pipe_times)
        stats = result.stats
        print(f"baseline (open + json.load, {summary['files']} files, 1 process): best {b:.3f} s "
              f"of {[round(x, 3) for x in base_times]}  (CPU best {min(base_cpu):.3f} s)")
        print(f"pipeline (prepare_data): best {p:.3f} s of {[round(x, 3) for x in pipe_times]}  "
              f"(CPU best {min(pipe_cpu):.3f} s)")
        print(f"dialogues/s: baseline {summary['files'] / b:,.0f}, pipeline {summary['files'] / p:,.0f}")
        print(f"dialogues_in {stats['dialogues_in']}, dialogues_kept {stats['dialogues_kept']}, "
              f"rejected {stats['rejected']}, format_errors {stats['format_errors']}")
        splits = stats["splits"]
        expect = "" if args.dialogues != RELEASE_DIALOGUES else (
            "  (ok: 5271/659/659)" if (splits["train"], splits["valid"], splits["test"]) == (5271, 659, 659)
            else "  (MISMATCH: expected 5271/659/659)")
        print(f"splits {splits}{expect}")
        print(f"tokens {stats['tokens']}, windowed_dialogues {stats['windowed_dialogues']}")
        print(f"token_counter {stats['token_counter']}")
        print(f"cpu ratio: {min(pipe_cpu) / min(base_cpu):.2f}  (pipeline CPU / baseline CPU, for reference)")
        if est_times:
            e = min(est_times)
            print(f"the same pipeline with the offline estimate instead of exact o200k_base encoding: best {e:.3f} s "
                  f"(ratio {e / b:.2f}); exact encoding of {summary['characters']:,} characters adds {p - e:.2f} s "
                  f"on {os.cpu_count()} core(s)")
        print(f"ratio: {p / b:.2f}")
    finally:
        if args.corpus_dir is None:
            shutil.rmtree(folder.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

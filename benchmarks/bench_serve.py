"""Benchmark the server's prompt fitting: linear time, outside the model lock.

What it does, on the embedded tiny model (its tokenizer and chat template):
  1. fits conversations of --sizes messages into a 300-token budget with the old algorithm (drop
     the oldest message, re-encode the whole conversation, repeat: quadratic) and with
     ``prompts.fit_messages`` (token counts once, one cut, one check: linear); prints both times;
  2. serves the model (``ServerThread`` on a free loopback port, --max-messages raised) and
     sends a --big-message request (answered 400 context_length_exceeded, and once more with
     ``"truncation": "auto"``: a fitted reply), and while each is in flight a normal request;
     prints how long each took and whether the normal one finished first;
  3. prints, last, ``ratio: X`` = old fitting time / new fitting time at the largest size.

    .venv/bin/python benchmarks/bench_serve.py
    .venv/bin/python benchmarks/bench_serve.py --sizes 600 1200 2400 --big-messages 10000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kokoro_helpers.local import export, loading, prompts  # noqa: E402
from kokoro_helpers.local.tiny_model import build_tiny_model  # noqa: E402


def conversation(n: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "あなたは心理カウンセラーです。"}]
    for i in range(n // 2):
        msgs += [{"role": "user", "content": f"相談{i}です。"}, {"role": "assistant", "content": f"返答{i}です。"}]
    return msgs + [{"role": "user", "content": "最後の相談です。"}]


def old_fit(tokenizer, messages, room):
    """The previous fit_prompt: re-encode after each dropped message (quadratic)."""
    msgs = prompts.clean_messages(messages)
    ids = prompts.encode_prompt(tokenizer, msgs)
    while len(ids) > room:
        body = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        if len(body) <= 1:
            return ids[-room:]
        del msgs[body[0]]
        body = [i for i, m in enumerate(msgs) if m["role"] != "system"]
        if len(body) > 1 and msgs[body[0]]["role"] == "assistant":
            del msgs[body[0]]
        ids = prompts.encode_prompt(tokenizer, msgs)
    return ids


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[600, 1200, 2400])
    ap.add_argument("--budget", type=int, default=300, help="prompt tokens to fit into")
    ap.add_argument("--big-messages", type=int, default=10_000)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(build_tiny_model(progress=False)))
    old_s = new_s = 0.0
    for n in args.sizes:
        msgs = conversation(n)
        new_s, fitted = timed(prompts.fit_messages, tokenizer, msgs, args.budget)
        old_s, old_ids = timed(old_fit, tokenizer, msgs, args.budget)
        print(f"fit {n:>6} messages: old {old_s:8.3f} s   new {new_s:8.4f} s   "
              f"(kept {len(fitted.ids)} vs {len(old_ids)} tokens)")

    import httpx

    from kokoro_helpers.local.serve import ServerThread
    from kokoro_helpers.local.serve_app import create_app
    from kokoro_helpers.local.serve_protocol import Limits
    with tempfile.TemporaryDirectory() as tmp:
        lm = loading.load(export.init_adapter(Path(tmp) / "lora-bench", seed=1), device="cpu")
        app = create_app(lm, max_tokens=8, temperature=0.0, limits=Limits(max_messages=args.big_messages + 10))
        with ServerThread(app) as srv:
            url = f"{srv.url}/v1/chat/completions"
            small = {"model": "lora-bench", "messages": conversation(2)}
            httpx.post(url, json=small, timeout=60)                         # warm-up
            for extra in ({}, {"truncation": "auto"}):
                big = {"model": "lora-bench", "messages": conversation(args.big_messages), **extra}
                done: dict[str, float] = {}

                def send_big():
                    t, r = timed(httpx.post, url, json=big, timeout=600)
                    done["big"], done["big_status"] = t, r.status_code
                    done.setdefault("order", "big first")

                thread = threading.Thread(target=send_big)
                thread.start()
                time.sleep(0.05)
                t_small, r = timed(httpx.post, url, json=small, timeout=600)
                if "big" not in done:
                    done["order"] = "normal first"
                thread.join()
                print(f"{args.big_messages} messages {extra or ''}: HTTP {done['big_status']} in {done['big']:.3f} s; "
                      f"a normal request sent meanwhile: HTTP {r.status_code} in {t_small:.3f} s ({done['order']})")
    print(f"ratio: {old_s / new_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

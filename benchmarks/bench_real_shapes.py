"""LoRA training at real model shapes (random weights built from configs, nothing downloaded).

Shapes: the Qwen2.5-0.5B shape (24 layers, hidden 896, intermediate 4864, 14 heads / 2 KV heads,
vocabulary 151,936, tied embeddings) and a Llama-3 shape (Llama-3.2-1B: hidden 2048, intermediate
8192, 32 heads / 8 KV heads, vocabulary 128,256) cut to a few layers. Each setting (shape, length,
batch, gradient checkpointing; liger / flash-attention where installed on a GPU) runs in its own
process — the peak memory of one is not inherited by the next — through the project's trainer
(:class:`kokoro_helpers.local.train_callbacks.KokoroSFTTrainer`, SFTConfig from
:func:`kokoro_helpers.local.sft_config.build_sft_config`, LoRA r=16 on all linear layers) on
synthetic sequences whose second half is labelled (like a counselor's reply after its context).

Per setting it prints: parameters, tokens/s (real tokens over the timed steps, after one warm-up
step), the resident memory after loading, the peak (CPU: the process's max RSS; GPU: torch's peak
allocated), one fp32 logits tensor of the batch, peak / (after-load + logits) — the issue's
target is at most 1.3 on the 24-layer shape at 1,024 tokens with checkpointing — and the memory
plan's estimate; on a GPU also MFU against the GPU's bf16 peak (``--peak-tflops``).

Last line: ``ratio: X`` = peak memory without / with gradient checkpointing of the first shape
at the longest length (what checkpointing saves, measured in the same run); with one
``--checkpointing`` setting only, that setting's peak / (after load + fp32 logits).

    .venv/bin/python benchmarks/bench_real_shapes.py                    # CPU: a few minutes, ~4 GiB
    .venv/bin/python benchmarks/bench_real_shapes.py --quick            # 2-layer Qwen shape, 128 tokens (tests)
    .venv/bin/python benchmarks/bench_real_shapes.py --shapes qwen2.5-0.5b --lengths 1024 --steps 1 --checkpointing on
                                            # the memory target: last line is peak / (after load + fp32 logits)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "qwen2.5-0.5b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama3-1b-2layers": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              tie_word_embeddings=True),
}
GiB = 2 ** 30


def _rss_gib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / GiB


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB     # Linux: KiB


def child(spec: dict) -> dict:
    """One setting, in this (fresh) process."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config
    from tokenizers import Tokenizer, models

    from kokoro_helpers.local.memory_plan import estimate, return_freed_memory
    from kokoro_helpers.local.sft_config import LoraTrainConfig, build_sft_config
    from kokoro_helpers.local.train_callbacks import KokoroSFTTrainer, StepTimer

    return_freed_memory()                  # as kokoro_helpers.local.train_lora does
    cuda = torch.cuda.is_available()
    shape = dict(SHAPES[spec["shape"]])
    if spec.get("layers"):
        shape["num_hidden_layers"] = spec["layers"]
    arch = shape.pop("arch")
    conf = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**shape, max_position_embeddings=4096,
                                                              pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation=spec["attn"])
        if cuda:
            model = model.cuda()
        model.config.use_cache = False
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, "<pad>")),
                                      pad_token="<pad>", eos_token="<eos>")
        L, B, steps = spec["length"], spec["batch"], spec["steps"]
        g = torch.Generator().manual_seed(1)
        rows = []
        for _ in range(B * (steps + 1)):
            ids = torch.randint(2, conf.vocab_size, (L,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": [-100] * (L // 2) + ids[L // 2:]})
        cfg = LoraTrainConfig(lora_r=16, lora_alpha=32, local_batch_size=B, max_length=L, local_epochs=1,
                              gradient_checkpointing=spec["ckpt"], learning_rate=1e-4, warmup_ratio=0.0,
                              save_checkpoints=False, heldout_eval=False, use_liger_kernel=spec["liger"],
                              attn_implementation=spec["attn"], lr_scheduler="constant")
        plan = estimate(conf, cfg, "cuda" if cuda else "cpu", "bf16" if cuda else "fp32")
        after_load = (torch.cuda.memory_allocated() / GiB) if cuda else _rss_gib()
        args = build_sft_config(cfg, output_dir=tmp, device="cuda" if cuda else "cpu",
                                precision="bf16" if cuda else "fp32", has_eval=False, liger=spec["liger"])
        ref: dict = {}
        trainer = KokoroSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                   processing_class=tok, callbacks=[StepTimer(ref)],
                                   peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                          task_type="CAUSAL_LM"))
        ref["trainer"] = trainer
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        times = [e["step_time_s"] for e in trainer.state.log_history if "step_time_s" in e]
        timed = times[1:] or times
        tps = B * L * len(timed) / sum(timed)
        peak = (torch.cuda.max_memory_allocated() / GiB) if cuda else _peak_rss_gib()
        params = sum(p.numel() for p in model.parameters())
        logits = B * L * conf.vocab_size * 4 / GiB
        out = {**spec, "params_m": params / 1e6, "tokens_per_s": tps, "after_load_gib": after_load,
               "peak_gib": peak, "logits_fp32_gib": logits, "peak_ratio": peak / (after_load + logits),
               "plan_gib": plan.total_gib + (0 if cuda else 0.0)}
        if cuda and spec.get("peak_tflops"):
            flops_per_token = 6 * params * 2 / 3 + 12 * conf.num_hidden_layers * conf.hidden_size * L  # LoRA: no weight grads
            out["mfu"] = tps * flops_per_token / (spec["peak_tflops"] * 1e12)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--layers", type=int, help="override the number of layers of every shape")
    ap.add_argument("--quick", action="store_true", help="the Qwen shape with 2 layers at 128 tokens, 1 step")
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak, for MFU")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.quick:
        args.shapes, args.lengths, args.layers, args.steps = ["qwen2.5-0.5b"], [128], 2, 1

    import torch
    from kokoro_helpers.local.train_plan import installed

    cuda = torch.cuda.is_available()
    variants = [("sdpa", False)]
    if cuda and installed("flash_attn"):
        variants.append(("flash_attention_2", False))
    if cuda and installed("liger_kernel"):
        variants.append(("sdpa", True))
    results = []
    for shape in args.shapes:
        for length in args.lengths:
            for ckpt in {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]:
                for attn, liger in variants:
                    spec = dict(shape=shape, layers=args.layers, length=length, batch=args.batch, steps=args.steps,
                                ckpt=ckpt, attn=attn, liger=liger, peak_tflops=args.peak_tflops)
                    t0 = time.perf_counter()
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT,
                                          capture_output=True, text=True, timeout=3600)
                    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        print(f"{shape} L={length} ckpt={ckpt}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                        return 1
                    r = json.loads(line[7:])
                    results.append(r)
                    print(f"{shape}{f' ({args.layers} layers)' if args.layers else ''}: {r['params_m']:,.0f} M params, "
                          f"length {length} x batch {args.batch}, checkpointing {'on ' if ckpt else 'off'}, {attn}"
                          f"{', liger' if liger else ''}: {r['tokens_per_s']:,.0f} tokens/s, after load "
                          f"{r['after_load_gib']:.2f} GiB, peak {r['peak_gib']:.2f} GiB, fp32 logits "
                          f"{r['logits_fp32_gib']:.2f} GiB, peak/(load+logits) {r['peak_ratio']:.2f}, plan "
                          f"{r['plan_gib']:.2f} GiB" + (f", MFU {r['mfu']:.1%}" if 'mfu' in r else "")
                          + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    first = [r for r in results if r["shape"] == args.shapes[0] and r["length"] == max(args.lengths)
             and r["attn"] == "sdpa" and not r["liger"]]
    off = next((r for r in first if not r["ckpt"]), None)
    on = next((r for r in first if r["ckpt"]), None)
    if off is None or on is None:           # one setting only: its peak against after-load + logits
        print(f"ratio: {first[0]['peak_ratio']:.2f}")
        return 0
    print(f"peak memory of {args.shapes[0]} at {max(args.lengths)} tokens: {off['peak_gib']:.2f} GiB without "
          f"checkpointing, {on['peak_gib']:.2f} GiB with")
    print(f"ratio: {off['peak_gib'] / on['peak_gib']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Local LoRA training throughput: the trainer vs the seeds' fixed-length padding, in one run.

Both runs use the same trainer (TRL's SFTTrainer through kokoro_helpers.local.train_lora), base model, data (the embedded default's train split, made
by 01_data into a temporary folder), LoRA settings, seed, number of optimizer steps and loss
masking (assistant tokens only). They differ only in batching:

- trainer:  batches grouped by length over the whole split, each right-padded to its own longest
            sequence; TRL's fused LM head scores only the labelled (assistant) positions;
- padding:  random batches, every sequence padded to ``max_length`` (SFTConfig
            ``pad_to_multiple_of=max_length``), no packing, and the trainer's own loss: what
            padding alone costs;
- seeds:    the seeds' pipeline — the same fixed-length padding, and the loss transformers'
            ``Trainer.compute_loss`` computes (the model's full-vocabulary logits at every position,
            padding included, then cross-entropy over the labelled ones). The loss value is the
            same; only the work differs.

Throughput counts real (non-padding) tokens per second of training-step time; all runs train
exactly the same real tokens and labels, so each ratio is the time a baseline wastes.
Each configuration runs ``--repeats`` times, alternating; as the batches are identical from
repeat to repeat (same seed), the time of each optimizer step is taken as its fastest repeat —
a shared CPU's bursts of load from other jobs then do not decide the result (the per-run
figures are printed too). Prints the padding fractions, tokens/s, the ratio against padding
alone, and ``ratio: X`` (trainer / seeds' pipeline) last.

    .venv/bin/python benchmarks/bench_train.py                      # embedded default, CPU
    .venv/bin/python benchmarks/bench_train.py --random-init qwen2-0.5b   # on a GPU: real-size model
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the trainer does; before torch loads
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Trainer  # noqa: E402

from kokoro_helpers.data.pipeline import prepare_data                       # noqa: E402
from kokoro_helpers.params import load_params                      # noqa: E402
from kokoro_helpers.local.sft_config import LoraTrainConfig  # noqa: E402
from kokoro_helpers.local.train_lora import train_lora  # noqa: E402
from kokoro_helpers.local.train_callbacks import KokoroSFTTrainer  # noqa: E402

# Qwen2.5-0.5B's shape (random weights: throughput only, nothing is downloaded)
SHAPES = {"qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                             tie_word_embeddings=True, max_position_embeddings=32768)}


def random_init_base(shape: str, folder: Path, layers: int | None = None) -> str:
    """Save a randomly initialised Qwen2-shaped model with the tiny model's tokenizer and template."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from kokoro_helpers.local.tiny_model import build_tiny_model, portable_tokenizer_files

    tok = AutoTokenizer.from_pretrained(build_tiny_model(progress=False))
    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    config = Qwen2Config(**kw, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    portable_tokenizer_files(folder)
    return str(folder)


@contextlib.contextmanager
def seeds_loss():
    """While open, the trainer computes its loss as transformers' Trainer does by default (the
    seeds' pipeline): ``model(**inputs)`` with the labels, i.e. the full logits at every position."""
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs, use_cache=False)
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    with mock.patch.object(KokoroSFTTrainer, "compute_loss", compute_loss):
        yield


RUNS = (("trainer", "grouped", contextlib.nullcontext), ("padding", "max_length", contextlib.nullcontext),
        ("seeds", "max_length", seeds_loss))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/default.yaml", help="parameter file (01 and Part B names)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the train split for each run")
    ap.add_argument("--max-length", type=int, help="override max_length (the baseline pads to it)")
    ap.add_argument("--batch-size", type=int, help="override local_batch_size")
    ap.add_argument("--random-init", choices=sorted(SHAPES), help="a real-size random model instead of the base")
    ap.add_argument("--layers", type=int, help="with --random-init: fewer layers (a quick smoke run)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of each, alternating; the best tokens/s of each counts (a shared CPU is noisy)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    data_args = {k: v for k, v in params.items() if k in inspect.signature(prepare_data).parameters
                 and k not in ("run_dir", "progress", "token_counter")}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run_dir = Path(tmp) / "run"
        os.environ.setdefault("KOKORO_TIKTOKEN_OFFLINE", "1")   # the counts 01 writes do not matter here
        prepare_data(run_dir=str(run_dir), progress=False, **data_args)
        overrides = dict(run_dir=str(run_dir), local_epochs=args.epochs, progress=False, resume="never",
                         save_checkpoints=False, heldout_eval=False, max_steps=None)
        if args.max_length:
            overrides["max_length"] = args.max_length
        if args.batch_size:
            overrides["local_batch_size"] = args.batch_size
        if args.random_init:
            overrides["local_base_model"] = random_init_base(args.random_init, Path(tmp) / "base", args.layers)
            overrides["local_mode"] = "train"
        base_cfg = LoraTrainConfig.from_params(params, **overrides)
        # build (or find) the base once, outside both measurements
        from kokoro_helpers.local.tiny_model import resolve_base_model
        resolve_base_model(base_cfg.local_base_model, progress=True)

        results: dict[str, dict] = {}
        step_times: dict[str, list[list[float]]] = {label: [] for label, _, _ in RUNS}
        for rep in range(max(1, args.repeats)):
            for label, batching, loss in RUNS:
                cfg = LoraTrainConfig.from_params(params, **overrides, batching=batching,
                                                  local_run_name=f"bench-{label}")
                t0 = time.perf_counter()
                with loss():
                    res = train_lora(cfg)
                m = res.metrics
                print(f"{label:8s} run {rep + 1}: batching={batching:10s} steps={m['global_step']:4d} "
                      f"real tokens={m['train_tokens']:,} padding fraction={m['padding_fraction']:.3f} "
                      f"train time={m['train_time_s']:.2f} s tokens/s={m['train_tokens_per_s']:,.0f} "
                      f"final loss={res.history['train'][-1]['loss']:.4f} "
                      f"(whole run {time.perf_counter() - t0:.1f} s)", flush=True)
                step_times[label].append([r["time_s"] for r in res.history["train"]])
                results[label] = dict(m, final_loss=res.history["train"][-1]["loss"])
        for label, runs in step_times.items():       # fastest repeat of each (identical) step
            best = sum(min(times) for times in zip(*runs))
            results[label] = dict(results[label], train_time_s=best,
                                  train_tokens_per_s=results[label]["train_tokens"] / best)
        a, b, c = results["trainer"], results["padding"], results["seeds"]
        if len({(r["train_tokens"], r["global_step"], r["trained_label_tokens"]) for r in (a, b, c)}) != 1:
            print("error: the runs did not train the same tokens, labels and steps", file=sys.stderr)
            return 1
        if abs(b["final_loss"] - c["final_loss"]) > 1e-3 * max(1.0, abs(b["final_loss"])):
            print(f"error: the seeds' loss ({c['final_loss']:.5f}) is not the trainer's loss on the same batches "
                  f"({b['final_loss']:.5f})", file=sys.stderr)
            return 1
        print(f"model: {base_cfg.local_base_model}{' (random init)' if args.random_init else ''}; "
              f"max_length {base_cfg.max_length}, batch {base_cfg.local_batch_size}, "
              f"{args.epochs} epoch(s), LoRA r={base_cfg.lora_r} on {base_cfg.target_modules}, "
              f"each step timed as its fastest of {max(1, args.repeats)} repeat(s)")
        print(f"padding fraction: trainer {a['padding_fraction']:.3f} vs fixed-length {b['padding_fraction']:.3f}")
        print(f"training-step time for the same {a['train_tokens']:,} real tokens: trainer {a['train_time_s']:.2f} s, "
              f"padding alone {b['train_time_s']:.2f} s, seeds' pipeline {c['train_time_s']:.2f} s")
        pa, pb = (r["train_tokens"] / (1 - r["padding_fraction"]) for r in (a, b))
        print(f"batch positions (real + padding): trainer {pa:,.0f} vs fixed-length {pb:,.0f} (x{pb / pa:.2f}, the "
              f"ratio against padding alone if a step's time were proportional to its positions); time per position: "
              f"trainer {a['train_time_s'] / pa * 1e6:.0f} us, padding alone {b['train_time_s'] / pb * 1e6:.0f} us "
              f"(both score {a['trained_label_tokens']:,} labelled tokens), seeds' pipeline "
              f"{c['train_time_s'] / pb * 1e6:.0f} us (logits at all {pb:,.0f} positions)")
        print(f"tokens/s: trainer {a['train_tokens_per_s']:,.0f}, padding alone {b['train_tokens_per_s']:,.0f}, "
              f"seeds' pipeline {c['train_tokens_per_s']:,.0f}")
        print(f"ratio against padding alone (same loss): {a['train_tokens_per_s'] / b['train_tokens_per_s']:.2f}")
        print(f"ratio: {a['train_tokens_per_s'] / c['train_tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

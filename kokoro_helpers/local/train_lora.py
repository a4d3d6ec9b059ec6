"""Local LoRA fine-tuning with TRL's SFTTrainer: the 02_finetune Part B trainer and its CLI.

The training itself is TRL's ``SFTTrainer`` (``SFTConfig`` + peft ``LoraConfig``): its
scheduler, gradient accumulation (the loss normalised by the trained tokens of the whole
accumulated batch, over every process), checkpoints and resume, DDP / FSDP / DeepSpeed through
accelerate, TRL's fused LM head (the loss never builds the full logits). Around it, this module
ties together what the project's runs show and write:

- data: 01_data's ``run_dir/data/{train,valid}.jsonl`` through the base tokenizer's chat
  template (:class:`kokoro_helpers.local.chat_encoding.ChatEncoder`: labels on assistant tokens
  only; :mod:`kokoro_helpers.local.windows`: long dialogues split into windows of whole turns)
  into a ``datasets.Dataset`` of ``input_ids`` + ``labels`` that SFTTrainer uses as is; batches
  grouped by length;
- before anything heavy loads: the plan (:mod:`kokoro_helpers.local.train_plan`: train or skip,
  and why), clear errors (a trainer setting SFTConfig does not have, quantization without CUDA,
  no chat template, a missing folder, ``target_modules`` the model lacks) and a memory plan
  against the device's memory;
- around training: the base's held-out loss (adapter off), the valid loss per epoch, a progress
  bar with the resource monitor's 90% alerts, resume after a killed kernel from the Trainer's
  checkpoints (:mod:`kokoro_helpers.local.train_resume`: same run name, same base content, data
  and settings);
- outputs (:mod:`kokoro_helpers.local.train_outputs`): the adapter folder (weights, tokenizer
  with its chat template, README model card, history.json, data_report.json) and the registry
  card ``run_dir/models/<name>.json``.

Command line (same code as the notebook)::

    python -m kokoro_helpers.train_lora --params params/kokorochat.yaml [--run-dir R] [--set k=v]
    torchrun --standalone --nproc_per_node 2 -m kokoro_helpers.train_lora --params params/default.yaml   # 2 processes (gloo on a CPU)
    accelerate launch --config_file configs/accelerate/ddp.yaml -m kokoro_helpers.train_lora --params params/kokorochat.yaml

A run that trains nothing (``local_mode`` off, or auto on a CPU with a Hub-size base) exits
with status 3 and says "nothing trained" on stderr, so a batch job can tell.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers import cards
from kokoro_helpers.jsonio import file_sha256, read_jsonl
from kokoro_helpers.local.chat_encoding import ChatEncoder, ChatTemplateError, EncodedExample
from kokoro_helpers.local.memory_plan import return_freed_memory
from kokoro_helpers.local.precision import torch_dtype
from kokoro_helpers.local.sft_config import LoraTrainConfig
from kokoro_helpers.local.tiny_model import EMBEDDED_TINY, quiet_transformers
from kokoro_helpers.local.train_outputs import TrainResult, adapter_card, loss_history, save_adapter
from kokoro_helpers.local.train_plan import check_base_exists, installed, make_plan
from kokoro_helpers.local.train_resume import Checkpoints
from kokoro_helpers.local.windows import DataReport, encode_examples
from kokoro_helpers.paths import portable, resolve
from kokoro_helpers.resources import prefer_passive_openmp

prefer_passive_openmp()

SKIPPED_EXIT = 3          # the CLI's status when nothing was trained

__all__ = ["LoraRun", "train_lora", "main", "SKIPPED_EXIT"]


# =============================================================================== the run

class LoraRun:
    """One local LoRA run: ``plan`` (no loading), ``prepare()`` (checks, model, data, trainer), ``train()``.

    >>> run = LoraRun(LoraTrainConfig(run_dir="runs/default"))
    >>> print(run.plan.describe())
    >>> result = run.train()          # prepares first if needed; returns a TrainResult
    """

    def __init__(self, config: LoraTrainConfig):
        config.validate()
        self.cfg = config
        self.plan = make_plan(config)
        self.prepared = False
        self.checked = False
        self.run_dir = resolve(config.run_dir)
        slug = cards.slugify(config.name)
        self.adapter_dir = cards.models_dir(self.run_dir) / slug
        self.card_file = cards.card_path(self.run_dir, config.name)
        self.checkpoint_root = self.run_dir / "checkpoints" / slug
        self.checkpoints = Checkpoints(self.checkpoint_root, is_main=self.is_main, log=self._log, barrier=self._barrier)
        self.memory = None

    @property
    def will_train(self) -> bool:
        return self.plan.action == "train"

    @property
    def is_main(self) -> bool:
        return int(os.environ.get("RANK", "0") or 0) == 0

    def _log(self, message: str) -> None:
        if self.is_main:
            from kokoro_helpers.progress import tqdm
            tqdm.write(message)

    # ----------------------------------------------------------------- checks (light)
    def check(self) -> "LoraRun":
        """Everything that can fail before a weight is loaded: data files, the base folder, its
        tokenizer and chat template, target_modules against the model's layers (a weightless
        ``meta`` copy built from its config), and the memory plan. Idempotent."""
        if self.checked or not self.will_train:
            return self
        from transformers import AutoConfig, AutoTokenizer

        from kokoro_helpers.local.memory_plan import device_memory_gib, estimate, lora_targets, meta_model
        from kokoro_helpers.local.tiny_model import resolve_base_model

        cfg = self.cfg
        data_dir = self.run_dir / "data"
        self.paths = {s: data_dir / f"{s}.jsonl" for s in ("train", "valid")}
        if not self.paths["train"].is_file():
            raise FileNotFoundError(
                f"{self.paths['train']} not found: run 01_data first (notebooks/01_data.ipynb, or "
                f".venv/bin/python -c \"from kokoro_helpers.data.pipeline import prepare_data; "
                f"prepare_data(run_dir='{cfg.run_dir}')\")")
        check_base_exists(cfg.local_base_model)
        self.base_path = resolve_base_model(cfg.local_base_model, progress=cfg.progress and self.is_main)
        local = Path(self.base_path).is_dir()
        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
                self.model_config = AutoConfig.from_pretrained(self.base_path)
        except (OSError, ValueError) as exc:
            if local:
                raise OSError(f"{self.base_path} is not a loadable model folder ({exc}): it needs config.json, the "
                              "weights and the tokenizer files (save_pretrained writes them)") from exc
            raise OSError(
                f"could not load the base model {cfg.local_base_model!r} ({exc}). Without network it must be in the "
                "Hugging Face cache (HF_HOME): run `huggingface-cli download "
                f"{cfg.local_base_model}` where the Hub is reachable and copy the cache over, or set "
                f"local_base_model to a local folder (or '{EMBEDDED_TINY}' for the offline smoke model).") from exc
        self.encoder = ChatEncoder(self.tokenizer, system_prompt_mode=cfg.system_prompt_mode)  # no template -> ChatTemplateError
        meta = meta_model(self.model_config)
        try:
            self.lora_layers = lora_targets(meta, cfg.target_modules)
        except ValueError as exc:
            raise ValueError(f"target_modules={cfg.target_modules!r} does not fit {cfg.local_base_model}: {exc}") from exc
        self.memory = estimate(self.model_config, cfg, self.plan.device, self.plan.precision,
                               device_memory_gib(self.plan.device, cfg.device_map), model=meta)
        del meta
        if self.memory.total_gib >= 1.0:     # a real base: freed activations go back to the system (see there)
            return_freed_memory()
        if not self.memory.fits and cfg.check_memory:
            raise MemoryError(self.memory.describe() + "\n(set check_memory: false to try anyway)")
        self.checked = True
        return self

    # ----------------------------------------------------------------- preparation (heavy)
    def prepare(self) -> "LoraRun":
        """Checks, then data, base model, LoRA and the SFTTrainer. Idempotent."""
        if self.prepared or not self.will_train:
            return self
        self.check()
        import datasets
        from peft import LoraConfig
        from transformers.utils import logging as hf_logging

        from kokoro_helpers.local.base_fingerprint import base_fingerprint
        from kokoro_helpers.resources import ResourceMonitor
        from kokoro_helpers.local.sft_config import build_sft_config
        from kokoro_helpers.local.train_callbacks import KokoroSFTTrainer, ProgressCallback, StepTimer, StopAfter

        cfg = self.cfg
        t0 = time.perf_counter()
        datasets.disable_progress_bars()          # its map/filter bars are noise next to ours
        self.data_sha256 = {s: file_sha256(p) for s, p in self.paths.items() if p.is_file()}
        raw = {s: read_jsonl(p) if p.is_file() else [] for s, p in self.paths.items()}
        if not raw["train"]:
            raise ValueError(f"{self.paths['train']} holds no examples: check 01_data's filters (stats.json)")
        self.items: dict[str, list[EncodedExample]] = {}
        self.reports: dict[str, DataReport] = {}
        for split in ("train", "valid"):
            items, report = encode_examples(raw[split], self.encoder, cfg.max_length, split,
                                            progress=cfg.progress and self.is_main)
            self.items[split], self.reports[split] = items, report
        if not self.items["train"]:
            raise ValueError("no training sequence has an assistant token to learn: every exchange was "
                             f"dropped as longer than max_length={cfg.max_length}; raise max_length")
        for split in ("train", "valid"):
            if self.reports[split].dropped:
                self._log("WARNING: " + self.reports[split].summary())
        self.datasets = {s: datasets.Dataset.from_dict({"input_ids": [e.input_ids for e in it],
                                                        "labels": [e.labels for e in it]})
                         for s, it in self.items.items()}
        has_eval = cfg.heldout_eval and len(self.datasets["valid"]) > 0
        self.base_fingerprint = base_fingerprint(cfg.local_base_model, self.base_path)

        padding_free = cfg.attn_implementation.startswith("flash_attention") and not cfg.packing
        liger = cfg.use_liger_kernel is True or (cfg.use_liger_kernel == "auto" and self.plan.device == "cuda"
                                                 and installed("liger_kernel"))
        if cfg.use_liger_kernel is True and not installed("liger_kernel"):
            raise ValueError("use_liger_kernel: true needs the liger-kernel package (pip install liger-kernel), "
                             "or set it to 'auto'")
        self.args = build_sft_config(cfg, output_dir=str(self.checkpoint_root), device=self.plan.device,
                                     precision=self.plan.precision, has_eval=has_eval,
                                     padding_free=padding_free and cfg.batching == "grouped", liger=liger)
        self.world_size = self.args.world_size
        self.plan.world_size = self.world_size

        model = self._load_base()
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
        self.monitor = ResourceMonitor(self.run_dir, warn_cpu=self.plan.device != "cpu")
        self._ref: dict[str, Any] = {}
        self._base_ref: dict[str, Any] = {}
        callbacks = [StepTimer(self._ref), StopAfter(cfg.max_steps, cfg.save_checkpoints),
                     ProgressCallback(cfg.name, self.monitor, show=cfg.progress and self.is_main, log=self._log,
                                      base_loss_ref=self._base_ref)]
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                warnings.filterwarnings("ignore", message=".*use_liger_kernel.*", category=FutureWarning)
                self.trainer = KokoroSFTTrainer(
                    model=model, args=self.args, train_dataset=self.datasets["train"],
                    eval_dataset=self.datasets["valid"] if has_eval else None, processing_class=self.tokenizer,
                    peft_config=lora, callbacks=callbacks)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.trainer.remove_callback(__import__("transformers").trainer_callback.PrinterCallback)
        self._ref["trainer"] = self.trainer
        self.model = self.trainer.model
        self.trainable_params, self.total_params = (int(x) for x in self.model.get_nb_trainable_parameters())
        n_batches = len(self.trainer.get_train_dataloader())
        self.steps_per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
        self.total_steps = self.steps_per_epoch * cfg.local_epochs
        self.fingerprint = self._fingerprint()
        self.prepare_s = time.perf_counter() - t0
        self.prepared = True
        return self

    def _load_base(self):
        import torch
        from transformers import AutoModelForCausalLM

        cfg = self.cfg
        dtype = torch_dtype(self.plan.precision)
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
        if cfg.quantization:
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
                if cfg.quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        if self.plan.device == "cuda":
            if cfg.device_map not in (None, "", {}):
                kwargs["device_map"] = cfg.device_map
            else:
                kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0") or 0)}
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(self.base_path, **kwargs)
        model.config.use_cache = False
        if cfg.quantization:
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _fingerprint(self) -> str:
        keep = self.cfg.training_params()
        for k in ("max_steps", "progress", "report_to", "heldout_eval"):
            keep.pop(k, None)
        blob = json.dumps({"config": keep, "base": self.base_fingerprint, "data": self.data_sha256,
                           "precision": self.plan.precision, "world_size": self.world_size},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ----------------------------------------------------------------- views
    def data_table(self):
        """Per split: examples, sequences (windows), tokens, trained tokens, longest, dropped exchanges."""
        import pandas as pd

        if not self.prepared:
            return pd.DataFrame()
        return pd.DataFrame([r.as_dict() for r in self.reports.values()]).set_index("split")

    def memory_table(self):
        """The memory plan (estimate) next to the device's memory; empty before check()."""
        import pandas as pd
        return self.memory.table() if self.memory is not None else pd.DataFrame()

    def epoch_padding_fraction(self) -> float:
        """Padding share of the batch positions of one epoch, as the trainer's sampler orders it."""
        if self.cfg.packing:
            return 0.0
        lengths = [len(e) for e in self.items["train"]]
        order = list(self.trainer._get_train_sampler(self.datasets["train"]) or range(len(lengths)))
        bs = self.cfg.local_batch_size
        real = padded = 0
        for k in range(0, len(order), bs):
            batch = [lengths[i] for i in order[k:k + bs]]
            width = self.cfg.max_length if self.cfg.batching == "max_length" else max(batch)
            real += sum(batch)
            padded += width * len(batch)
        return 1 - real / padded if padded else 0.0

    def describe(self) -> str:
        """What will be trained, on what: the plan, the base, the data, the trainable fraction, memory."""
        lines = [self.plan.describe()]
        if self.prepared:
            cfg = self.cfg
            lines.append(f"base: {cfg.local_base_model} ({portable(Path(self.base_path)) if Path(self.base_path).exists() else self.base_path}; "
                         f"{self.base_fingerprint}); turns end with {self.encoder.end_of_turn!r}")
            lines += [r.summary() for r in self.reports.values()]
            lines.append(f"LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha} on {cfg.target_modules}: "
                         f"{self.trainable_params:,} trainable of {self.total_params:,} parameters "
                         f"({self.trainable_params / self.total_params:.2%})")
            lines.append(f"trl.SFTTrainer: {self.total_steps} optimizer steps ({self.steps_per_epoch} per epoch x "
                         f"{cfg.local_epochs}), batch {cfg.local_batch_size} x grad_accum {cfg.grad_accum}"
                         f"{f' x {self.world_size} processes' if self.world_size > 1 else ''}; "
                         + ("packed rows (bfd)" if cfg.packing else
                            f"padding {self.epoch_padding_fraction():.1%} of batch positions ({cfg.batching} batching)")
                         + f"; held-out batch {cfg.eval_batch}" + ("" if cfg.heldout_eval else " (held-out eval off)"))
        if self.memory is not None:
            lines.append(self.memory.describe())
        return "\n".join(lines)

    def _barrier(self) -> None:
        if self.world_size > 1:
            self.trainer.accelerator.wait_for_everyone()

    # ----------------------------------------------------------------- training
    def train(self) -> TrainResult:
        """Train (resuming when a matching checkpoint exists), evaluate, write adapter and card."""
        if not self.will_train:
            self._log(self.plan.describe())
            return TrainResult(skipped=self.plan.reason, name=self.cfg.name)
        self.prepare()
        cfg, trainer = self.cfg, self.trainer
        session_t0 = time.perf_counter()
        checkpoints = self.checkpoints
        resume_from = checkpoints.find(cfg.resume, self.fingerprint)
        base_loss = None
        prior_wall = 0.0
        if resume_from is not None:
            saved = checkpoints.state(required=True)
            base_loss = saved.get("base_valid_loss")
            prior_wall = float(saved.get("wall_s", 0.0) or 0.0)
            self._log(f"resuming from {portable(resume_from)}")
        elif cfg.heldout_eval and cfg.evaluate_base and trainer.eval_dataset is not None:
            base_loss = trainer.heldout_loss(adapter=False)
        self._base_ref["base_valid_loss"] = base_loss
        checkpoints.start(self.fingerprint, base_loss, self.base_fingerprint, resuming=resume_from is not None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*", category=UserWarning)
            trainer.train(resume_from_checkpoint=resume_from)
        state = trainer.state
        history = loss_history(trainer.state.log_history, base_loss)
        finished = state.global_step >= state.max_steps
        adapter_loss = None
        if cfg.heldout_eval and trainer.eval_dataset is not None:
            # decided the same way on every process (heldout_loss is collective); only the main one writes
            evaluated_last = finished and str(getattr(self.args.eval_strategy, "value", self.args.eval_strategy)) == "epoch"
            valid = history["valid"]
            if evaluated_last and valid and valid[-1]["step"] == state.global_step:
                adapter_loss = valid[-1]["loss"]
            elif evaluated_last and not self.is_main:
                adapter_loss = None
            else:
                adapter_loss = trainer.heldout_loss()
        wall = prior_wall + time.perf_counter() - session_t0
        checkpoints.update(wall_s=wall)
        resumed = checkpoints.resumed_from() + ([Path(resume_from).name] if resume_from else [])
        return self._write_outputs(history, adapter_loss, finished, wall, resumed)

    # ----------------------------------------------------------------- outputs
    def metrics(self, history: dict[str, Any], adapter_loss: float | None, wall: float,
                resumed: list[str]) -> dict[str, Any]:
        st, c = self.trainer.state, self.trainer.counters
        tokens, positions, t = st.num_input_tokens_seen, c["positions_seen"], c["train_time_s"]
        return {
            "base_valid_loss": history["base_valid_loss"],
            "adapter_valid_loss": adapter_loss,
            "train_tokens_per_s": round(tokens / t, 1) if t else None,
            "padding_fraction": round(1 - tokens / positions, 4) if positions else None,
            "wall_s": round(wall, 2),
            "train_time_s": round(t, 2),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_fraction": self.trainable_params / self.total_params if self.total_params else None,
            "train_tokens": int(tokens),
            "trained_label_tokens": int(c["label_tokens_seen"]),
            "global_step": st.global_step,
            "total_steps": st.max_steps,
            "epochs": round(float(st.epoch or 0), 4),
            "finished": st.global_step >= st.max_steps,
            "resumed_from": resumed,
        }

    def _write_outputs(self, history, adapter_loss, finished, wall, resumed) -> TrainResult:
        cfg = self.cfg
        metrics = self.metrics(history, adapter_loss, wall, resumed)
        data = {"train_sha256": self.data_sha256.get("train"), "valid_sha256": self.data_sha256.get("valid"),
                "data_dir": portable(self.run_dir / "data"),
                "train": self.reports["train"].as_dict(), "valid": self.reports["valid"].as_dict(),
                "dropped": [dataclasses.asdict(d) for r in self.reports.values() for d in r.dropped]}
        result = TrainResult(name=cfg.name, adapter_dir=self.adapter_dir, card_path=self.card_file,
                             metrics=metrics, history=history, data=data)
        if self.is_main:
            if resumed:
                self.checkpoints.update(resumed_from=resumed)
            card = adapter_card(cfg, self.plan, adapter_dir=self.adapter_dir, checkpoint_root=self.checkpoint_root,
                                base_path=self.base_path, base_fingerprint=self.base_fingerprint, encoder=self.encoder,
                                world_size=self.world_size, device_name=self._device_name(), metrics=metrics,
                                history=history, data=data, finished=finished)
            save_adapter(self.adapter_dir, self.trainer.accelerator.unwrap_model(self.model), self.tokenizer,
                         self.encoder.system_prompt_mode, history, data, card)
            cards.save_card(self.card_file, card)
            result.card = card
            if not finished:
                self._log(f"stopped at step {metrics['global_step']}/{metrics['total_steps']} (max_steps): the adapter "
                          "is a partial result; run again to resume from the checkpoint")
        self._barrier()
        return result

    def _device_name(self) -> str | None:
        """The GPU's name (cost estimates quote it); None on the CPU."""
        if self.plan.device != "cuda":
            return None
        import torch
        return torch.cuda.get_device_name(self.args.device)


def train_lora(config: LoraTrainConfig | Mapping[str, Any], **overrides: Any) -> TrainResult:
    """Plan, prepare and train in one call (the CLI's and the benchmark's entry point)."""
    cfg = config if isinstance(config, LoraTrainConfig) else LoraTrainConfig.from_params(config, **overrides)
    if isinstance(config, LoraTrainConfig) and overrides:
        cfg = dataclasses.replace(config, **overrides)
    run = LoraRun(cfg)
    if run.is_main and cfg.progress and run.will_train:     # train() itself reports a skip
        print(run.plan.describe(), flush=True)
    return run.train()


# =============================================================================== CLI

def main(argv: list[str] | None = None) -> int:
    from kokoro_helpers.params import load_params, parse_overrides

    ap = argparse.ArgumentParser(
        prog="python -m kokoro_helpers.train_lora",
        description="Train a local LoRA adapter (TRL SFTTrainer) on 01_data's files, with a params/*.yaml file "
                    "(the same names as 02_finetune's parameters). Runs under torchrun / accelerate launch unchanged. "
                    f"Exit status: 0 trained, 1 failed, 2 bad settings, {SKIPPED_EXIT} nothing trained (skipped).")
    ap.add_argument("--params", required=True, help="parameter file, e.g. params/kokorochat.yaml")
    ap.add_argument("--run-dir", help="override run_dir (where data/ is read and models/ written)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override any setting, e.g. --set local_epochs=1 --set max_length=2048")
    ap.add_argument("--resume", help="auto (default) | never | latest | a checkpoint folder")
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resumable)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs, batch jobs)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        ap.error(str(exc))
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.resume:
        overrides["resume"] = args.resume
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.no_progress:
        overrides["progress"] = False
    try:
        cfg = LoraTrainConfig.from_params(params, **overrides)
        run = LoraRun(cfg)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not run.will_train:
        print(f"nothing trained: {run.plan.describe()}", file=sys.stderr)
        return SKIPPED_EXIT
    try:
        if run.is_main and cfg.progress:
            print(run.plan.describe(), flush=True)
        result = run.train()
    except (OSError, ChatTemplateError, ValueError, MemoryError) as exc:   # missing data/base, template, fit
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if run.is_main:
        print(result.summary())
        if result.card_path:
            print(f"card: {portable(result.card_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

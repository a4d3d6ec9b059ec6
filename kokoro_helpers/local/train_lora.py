"""Local LoRA fine-tuning with TRL's SFTTrainer: the 02_finetune Part B trainer and its CLI.

The training itself is TRL's ``SFTTrainer`` (``SFTConfig`` + peft ``LoraConfig``): its
scheduler, gradient accumulation (the loss normalised by the trained tokens of the whole
accumulated batch, over every process), checkpoints and resume, DDP / FSDP / DeepSpeed through
accelerate, TRL's fused LM head (the loss never builds the full logits). Around it, this module
keeps what the project's runs show and write:

- data: 01_data's ``run_dir/data/{train,valid}.jsonl`` through the base tokenizer's chat
  template (:class:`kokoro_helpers.local.lora_data.ChatEncoder`: labels on assistant tokens only,
  long dialogues split into windows of whole turns) into a ``datasets.Dataset`` of
  ``input_ids`` + ``labels`` that SFTTrainer uses as is; batches grouped by length;
- before anything heavy loads: the plan (train or skip, and why), clear errors (a trainer
  setting SFTConfig does not have, quantization without CUDA, no chat template, a missing
  folder, ``target_modules`` the model lacks) and a memory plan against the device's memory;
- around training: the base's held-out loss (adapter off), the valid loss per epoch, a progress
  bar with the resource monitor's 90% alerts, resume after a killed kernel from the Trainer's
  checkpoints (same run name, same base content, data and settings);
- outputs: the adapter folder (weights, tokenizer with its chat template, README model card,
  history.json, data_report.json) and the registry card ``run_dir/models/<name>.json``.

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
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers import cards
from kokoro_helpers.jsonio import file_sha256, read_jsonl
from kokoro_helpers.local.lora_data import (SYSTEM_PROMPT_MODE_KEY, ChatEncoder, ChatTemplateError, DataReport, EncodedExample,
                        encode_examples)
from kokoro_helpers.paths import portable, resolve
from kokoro_helpers.local.memory_plan import return_freed_memory
from kokoro_helpers.resources import prefer_passive_openmp
from kokoro_helpers.local.sft_config import LoraTrainConfig
from kokoro_helpers.local.tiny_model import EMBEDDED_TINY, is_embedded, portable_tokenizer_files, quiet_transformers
from kokoro_helpers.local.precision import choose_precision, torch_dtype

prefer_passive_openmp()

SKIPPED_EXIT = 3          # the CLI's status when nothing was trained

__all__ = ["LoraTrainConfig", "LoraRun", "Plan", "TrainResult", "make_plan", "train_lora", "plot_loss_curves",
           "main", "SKIPPED_EXIT"]


# =============================================================================== plan

@dataclass
class Plan:
    """What a run will do on this machine, decided before anything is loaded."""

    action: str            # "train" | "skip"
    reason: str
    device: str            # "cuda" | "cpu"
    precision: str         # "fp32" | "bf16" | "fp16"
    world_size: int = 1

    def describe(self) -> str:
        if self.action == "skip":
            return f"local LoRA: SKIPPED (nothing trained) - {self.reason}"
        return (f"local LoRA: training on {self.device} ({self.precision}"
                f"{f', {self.world_size} processes' if self.world_size > 1 else ''}) - {self.reason}")


def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def make_plan(cfg: LoraTrainConfig) -> Plan:
    """Decide train/skip, device and precision from local_mode, the base and the hardware.
    Raises ValueError for hardware settings this machine cannot run (quantization without CUDA)."""
    cuda = _cuda_available()
    device = "cuda" if cuda else "cpu"
    precision = choose_precision(device, cfg.precision)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    base = cfg.local_base_model
    if cfg.local_mode == "off":
        return Plan("skip", "local_mode is 'off'", device, precision, world)
    if cfg.quantization and not cuda:
        raise ValueError(f"quantization={cfg.quantization!r} needs a CUDA GPU (bitsandbytes), and this machine has "
                         "none: set quantization: null here, or train on a GPU machine")
    if cfg.quantization and not _installed("bitsandbytes"):
        raise ValueError(f"quantization={cfg.quantization!r} needs bitsandbytes: pip install bitsandbytes")
    if cfg.attn_implementation.startswith("flash_attention") and not (cuda and _installed("flash_attn")):
        raise ValueError(f"attn_implementation={cfg.attn_implementation!r} needs a CUDA GPU and the flash-attn "
                         "package: use attn_implementation: sdpa")
    if cfg.device_map == "auto" and world > 1:
        raise ValueError("device_map: auto spreads one model over this machine's GPUs and cannot be combined with "
                         "several processes (torchrun / accelerate launch): use one or the other")
    if cfg.local_mode == "train":
        why = "local_mode is 'train'"
        if not cuda and not is_embedded(base):
            why += " (on the CPU: fine for a small model, slow for a Hub-size one such as a 0.5B base)"
        return Plan("train", why, device, precision, world)
    if cuda:
        return Plan("train", "local_mode 'auto' with a GPU", device, precision, world)
    if is_embedded(base):
        return Plan("train", f"local_mode 'auto': the embedded tiny model ({base}) trains on the CPU", device,
                    precision, world)
    return Plan("skip", (
        f"local_mode 'auto' does not train {base!r}{_size_note(base)} on a CPU-only machine: only the embedded smoke "
        "model trains on a CPU by default, as a real base would take hours there. Run `python -m kokoro_helpers.train_lora --params "
        "<your params>.yaml` on a GPU machine (torchrun / accelerate launch for several GPUs), set "
        f"local_mode='train' to force a (slow) CPU run, or local_base_model='{EMBEDDED_TINY}' for the offline smoke "
        "model"), device, precision, world)


def _size_note(base: str) -> str:
    """' (Qwen2ForCausalLM, 0.1 M parameters)' for a local model folder, from its config.json alone (meta
    device, no weights read); '' for a Hub id or a folder whose config cannot be read."""
    folder = resolve(base)
    if not (folder / "config.json").is_file():
        return ""
    try:
        from transformers import AutoConfig

        from kokoro_helpers.local.memory_plan import meta_model
        config = AutoConfig.from_pretrained(folder)
        n = sum(p.numel() for p in meta_model(config).parameters())
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    except Exception:                                 # the plan's reason must not fail; loading reports it
        return ""
    return f" ({arch}, {n / 1e6:.1f} M parameters)"


def _looks_like_path(name: str) -> bool:
    """A local folder rather than a Hub id ('org/name'): absolute, ./ ../ ~, a trailing slash, or deeper."""
    n = str(name)
    return (n.startswith(("/", "./", "../", "~", ".\\")) or n.endswith(("/", "\\")) or n.count("/") >= 2
            or "\\" in n or (len(n) > 1 and n[1] == ":"))


def check_base_exists(name: str) -> None:
    """A base given as a folder must exist (no Hub-download advice for a mistyped path)."""
    if is_embedded(name):
        return
    if _looks_like_path(name) and not resolve(name).is_dir():
        raise FileNotFoundError(
            f"local_base_model {name!r} looks like a folder, and there is no such folder ({resolve(name)}): check the "
            "path (relative paths start at the project root) or the folder's name")
    if resolve(name).exists() and not resolve(name).is_dir():
        raise FileNotFoundError(f"local_base_model {name!r} is a file, not a model folder")


# =============================================================================== result

@dataclass
class TrainResult:
    """What a run produced (or why it was skipped), with the views the notebook shows."""

    skipped: str | None = None
    name: str = ""
    adapter_dir: Path | None = None
    card_path: Path | None = None
    card: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return self.skipped is None

    def loss_table(self):
        """Base vs adapter held-out loss (mean cross-entropy per assistant token) and perplexity."""
        import pandas as pd

        rows = []
        for label, key in (("base (adapter off)", "base_valid_loss"), ("base + LoRA adapter", "adapter_valid_loss")):
            loss = self.metrics.get(key)
            rows.append({"model": label, "valid_loss": loss,
                         "valid_perplexity": math.exp(loss) if loss is not None and loss < 50 else None})
        return pd.DataFrame(rows).set_index("model")

    def compare(self) -> str:
        """One line: is the adapter's held-out loss below the base's? (printed, never asserted)"""
        if self.skipped:
            return f"no comparison: {self.skipped}"
        base, ada = self.metrics.get("base_valid_loss"), self.metrics.get("adapter_valid_loss")
        if base is None or ada is None:
            return "no comparison: the valid split is empty (or evaluate_base was off)"
        if ada < base:
            return (f"adapter valid loss {ada:.4f} < base {base:.4f} (-{base - ada:.4f} nats per assistant "
                    f"token, perplexity x{math.exp(ada - base):.2f}): the adapter is better on held-out dialogues")
        return (f"WARNING: adapter valid loss {ada:.4f} is NOT below the base's {base:.4f}: training did not help "
                "on held-out dialogues (try more epochs, another learning_rate, or more data)")

    def card_view(self) -> dict[str, Any]:
        """The registry card without its long loss history (the curves are plotted instead)."""
        return {k: v for k, v in self.card.items() if k not in ("loss_history",)}

    def speed_table(self):
        import pandas as pd

        keys = ("wall_s", "train_tokens_per_s", "padding_fraction", "trainable_params", "total_params",
                "trainable_fraction", "global_step", "epochs")
        return pd.DataFrame([{k: self.metrics.get(k) for k in keys}], index=[self.name])

    def files(self):
        """The files written for this model: path and size."""
        import pandas as pd

        rows = []
        if self.adapter_dir and self.adapter_dir.is_dir():
            for p in sorted(self.adapter_dir.iterdir()):
                if p.is_file():
                    rows.append({"file": portable(p), "bytes": p.stat().st_size})
        if self.card_path and self.card_path.is_file():
            rows.append({"file": portable(self.card_path), "bytes": self.card_path.stat().st_size})
        return pd.DataFrame(rows, columns=["file", "bytes"])

    def summary(self) -> str:
        if self.skipped:
            return f"local LoRA skipped: {self.skipped}"
        m = self.metrics
        base, ada = m.get("base_valid_loss"), m.get("adapter_valid_loss")
        loss = (f"valid loss base {base:.4f} -> adapter {ada:.4f}" if base is not None and ada is not None
                else "no valid examples: no held-out loss")
        return (f"{self.name}: {loss}; {m.get('train_tokens_per_s', 0):,.0f} tokens/s, padding "
                f"{m.get('padding_fraction', 0):.1%}, {m.get('wall_s', 0):.1f} s, step {m.get('global_step')} -> "
                f"{portable(self.adapter_dir) if self.adapter_dir else '?'}")


def plot_loss_curves(result: TrainResult | Mapping[str, Any], ax=None):
    """Train loss per optimizer step, valid loss per epoch, and the base's valid loss (dashed)."""
    import matplotlib.pyplot as plt

    history = result.history if isinstance(result, TrainResult) else result
    if isinstance(result, TrainResult) and result.skipped:
        print(f"no curves: {result.skipped}")
        return None
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    train = history.get("train", [])
    valid = history.get("valid", [])
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train (per step)")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid (per epoch)")
    if history.get("base_valid_loss") is not None:
        ax.axhline(history["base_valid_loss"], ls="--", color="gray", label="base model, valid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_title("local LoRA: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


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
                                                 and _installed("liger_kernel"))
        if cfg.use_liger_kernel is True and not _installed("liger_kernel"):
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

    # ----------------------------------------------------------------- resume
    def _state_file(self) -> Path:
        return self.checkpoint_root / "kokoro_run.json"

    def _find_resume(self) -> str | None:
        resume = self.cfg.resume
        root = self.checkpoint_root
        last = self._last_complete_checkpoint() if root.is_dir() else None
        recorded = None
        if self._state_file().is_file():
            recorded = json.loads(self._state_file().read_text(encoding="utf-8")).get("fingerprint")
        if resume in (False, None, "never", "no", "false"):
            self._clear_checkpoints()
            return None
        if resume not in (True, "auto", "latest", "true"):
            path = resolve(str(resume))
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"resume={resume!r}: {path} is not a checkpoint folder (no trainer_state.json)")
            return str(path)
        if last is None:
            if resume in (True, "latest", "true"):
                raise FileNotFoundError(f"resume={resume!r} but there is no checkpoint in {root}")
            return None
        if recorded != self.fingerprint:
            message = (f"checkpoint {portable(last)} was written by a run with another base (by content), data or "
                       f"settings (fingerprint {recorded} != {self.fingerprint})")
            if resume != "auto":
                raise ValueError(message + "; set resume='never' to start over")
            self._log(f"not resuming: {message}. Starting over; the old checkpoints are removed.")
            self._clear_checkpoints()
            return None
        return last

    def _last_complete_checkpoint(self) -> str | None:
        """The newest checkpoint the Trainer finished writing (trainer_state.json is written last):
        a kill in the middle of a save leaves a newer, partial folder, which is removed."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        def step(p: Path) -> int:
            tail = p.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
            return int(tail) if tail.isdigit() else -1

        folders = sorted((p for p in self.checkpoint_root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                          if p.is_dir() and step(p) >= 0), key=step, reverse=True)
        for folder in folders:
            try:
                json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                if self.is_main:
                    self._log(f"removing {portable(folder)}: its save was interrupted")
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            return str(folder)
        return None

    def _clear_checkpoints(self) -> None:
        if self.is_main and self.checkpoint_root.exists():
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.world_size > 1:
            self.trainer.accelerator.wait_for_everyone()

    def _write_state(self, base_loss: float | None, resuming: bool) -> None:
        if self.is_main:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            old = (json.loads(self._state_file().read_text(encoding="utf-8"))
                   if resuming and self._state_file().is_file() else {})
            self._state_file().write_text(json.dumps(dict(old, fingerprint=self.fingerprint, base_valid_loss=base_loss,
                                                          base_fingerprint=self.base_fingerprint), indent=1) + "\n",
                                          encoding="utf-8")
        self._barrier()

    # ----------------------------------------------------------------- training
    def train(self) -> TrainResult:
        """Train (resuming when a matching checkpoint exists), evaluate, write adapter and card."""
        if not self.will_train:
            self._log(self.plan.describe())
            return TrainResult(skipped=self.plan.reason, name=self.cfg.name)
        self.prepare()
        cfg, trainer = self.cfg, self.trainer
        session_t0 = time.perf_counter()
        resume_from = self._find_resume()
        base_loss = None
        prior_wall = 0.0
        if resume_from is not None:
            saved = json.loads(self._state_file().read_text(encoding="utf-8"))
            base_loss = saved.get("base_valid_loss")
            prior_wall = float(saved.get("wall_s", 0.0) or 0.0)
            self._log(f"resuming from {portable(resume_from)}")
        elif cfg.heldout_eval and cfg.evaluate_base and trainer.eval_dataset is not None:
            base_loss = trainer.heldout_loss(adapter=False)
        self._base_ref["base_valid_loss"] = base_loss
        self._write_state(base_loss, resume_from is not None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*", category=UserWarning)
            trainer.train(resume_from_checkpoint=resume_from)
        state = trainer.state
        history = self._history(base_loss)
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
        if self.is_main:
            saved = json.loads(self._state_file().read_text(encoding="utf-8")) if self._state_file().is_file() else {}
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            self._state_file().write_text(json.dumps(dict(saved, wall_s=wall), indent=1) + "\n", encoding="utf-8")
        resumed = list(self._resumed_from()) + ([Path(resume_from).name] if resume_from else [])
        return self._write_outputs(history, adapter_loss, finished, wall, resumed)

    def _resumed_from(self) -> list[str]:
        try:
            saved = json.loads(self._state_file().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return list(saved.get("resumed_from", []))

    def _history(self, base_loss: float | None) -> dict[str, Any]:
        train, valid = [], []
        for e in self.trainer.state.log_history:
            if "loss" in e and "step" in e:
                gn = e.get("grad_norm")
                train.append({"step": e["step"], "epoch": round(float(e.get("epoch", 0)), 4),
                              "loss": round(float(e["loss"]), 5), "lr": e.get("learning_rate"),
                              "time_s": e.get("step_time_s"),
                              "grad_norm": round(float(gn), 4) if gn is not None and math.isfinite(gn) else None})
            elif "eval_loss" in e:
                ep = float(e.get("epoch", 0))
                valid.append({"step": e["step"], "epoch": int(round(ep)) if abs(ep - round(ep)) < 1e-6 else ep,
                              "loss": float(e["eval_loss"])})
        # a resumed run can log a step twice (the checkpoint's history, then the session's): keep the last
        train = list({r["step"]: r for r in train}.values())
        valid = list({r["step"]: r for r in valid}.values())
        return {"train": train, "valid": valid, "base_valid_loss": base_loss}

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
                saved = json.loads(self._state_file().read_text(encoding="utf-8"))
                self._state_file().write_text(json.dumps(dict(saved, resumed_from=resumed), indent=1) + "\n",
                                              encoding="utf-8")
            tmp = self.adapter_dir.with_name(self.adapter_dir.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with quiet_transformers():
                self.trainer.accelerator.unwrap_model(self.model).save_pretrained(tmp)
                # generation must give the template the messages as training did (prompts.render_prompt)
                self.tokenizer.init_kwargs[SYSTEM_PROMPT_MODE_KEY] = self.encoder.system_prompt_mode
                self.tokenizer.save_pretrained(tmp)
            portable_tokenizer_files(tmp)
            (tmp / "history.json").write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
            (tmp / "data_report.json").write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n",
                                                  encoding="utf-8")
            card = self._card(metrics, history, data, finished)
            (tmp / "README.md").write_text(self._readme(card), encoding="utf-8")
            if self.adapter_dir.exists():
                shutil.rmtree(self.adapter_dir)
            os.replace(tmp, self.adapter_dir)
            cards.save_card(self.card_file, card)
            result.card = card
            if not finished:
                self._log(f"stopped at step {metrics['global_step']}/{metrics['total_steps']} (max_steps): the adapter "
                          "is a partial result; run again to resume from the checkpoint")
        self._barrier()
        return result

    def _card(self, metrics: dict[str, Any], history: dict[str, Any], data: dict[str, Any],
              finished: bool) -> dict[str, Any]:
        import trl

        cfg = self.cfg
        adapter = portable(self.adapter_dir)
        usage = (
            f"Local LoRA adapter in {adapter} (peft). Load it with kokoro_helpers (04_local_lora_inference) or: "
            f"tok = AutoTokenizer.from_pretrained('{adapter}'); base = AutoModelForCausalLM.from_pretrained(<base>); "
            f"model = PeftModel.from_pretrained(base, '{adapter}'). Prompt with tok.apply_chat_template(messages, "
            f"add_generation_prompt=True); generation ends at {self.encoder.end_of_turn}. Base: "
            f"{cfg.local_base_model}" + (" (built by kokoro_helpers.local.tiny_model; a smoke model whose replies mean "
                                         "nothing)" if is_embedded(cfg.local_base_model) else "") + ".")
        training_params = dict(cfg.training_params(), system_prompt_mode_used=self.encoder.system_prompt_mode,
                               precision=self.plan.precision, device=self.plan.device,
                               device_name=self._device_name(), world_size=self.world_size,
                               trainer=f"trl.SFTTrainer {trl.__version__}")
        return cards.new_card(
            kind="local_lora", model_id=cfg.name, base_model=cfg.local_base_model,
            training_params=training_params, usage_instructions=usage,
            adapter_path=adapter, base_model_path=portable(Path(self.base_path))
            if Path(self.base_path).exists() else self.base_path, base_fingerprint=self.base_fingerprint,
            training_metrics=metrics, loss_history=history, training_data=data,
            end_of_turn_token=self.encoder.end_of_turn, finished=finished,
            checkpoints=portable(self.checkpoint_root), smoke_model=is_embedded(cfg.local_base_model))

    def _device_name(self) -> str | None:
        """The GPU's name (cost estimates quote it); None on the CPU."""
        if self.plan.device != "cuda":
            return None
        import torch
        return torch.cuda.get_device_name(self.args.device)


    def _readme(self, card: dict[str, Any]) -> str:
        m, d, p = card["training_metrics"], card["training_data"], card["training_params"]

        def f(x, spec=".4f"):
            return "n/a" if x is None else format(x, spec)

        smoke = ("\n> **Smoke model.** The base is the package's embedded tiny model: the adapter exists to test "
                 "the pipeline, and its replies mean nothing.\n" if card.get("smoke_model") else "")
        params = "\n".join(f"| {k} | {v} |" for k, v in p.items())
        return f"""# {card['model_id']} — local LoRA adapter
{smoke}
- **Base model:** `{card['base_model']}` (loaded from `{card['base_model_path']}`)
- **Kind:** local_lora (peft LoRA adapter; `adapter_model.safetensors`, `adapter_config.json`)
- **Tokenizer:** the base's, saved here with its chat template; turns end with `{card['end_of_turn_token']}`
- **Trained:** {card['timestamp']}{'' if card['finished'] else ' — PARTIAL (stopped by max_steps)'}

## Data
- train.jsonl sha256 `{d['train_sha256']}`
- valid.jsonl sha256 `{d['valid_sha256']}`
- train: {d['train']['examples']} examples -> {d['train']['sequences']} sequences, {d['train']['tokens']:,} tokens
  ({d['train']['trained_tokens']:,} on assistant turns); dropped exchanges: {d['train']['dropped_exchanges']}
- valid: {d['valid']['examples']} examples -> {d['valid']['sequences']} sequences, {d['valid']['tokens']:,} tokens

## Metrics
| metric | value |
|---|---|
| valid loss, base (adapter off) | {f(m['base_valid_loss'])} |
| valid loss, with adapter | {f(m['adapter_valid_loss'])} |
| train tokens/s (non-padding) | {f(m['train_tokens_per_s'], ',.0f')} |
| padding fraction | {f(m['padding_fraction'], '.1%')} |
| wall time (s) | {f(m['wall_s'], '.1f')} |
| trainable / total parameters | {m['trainable_params']:,} / {m['total_params']:,} ({f(m['trainable_fraction'], '.2%')}) |
| optimizer steps | {m['global_step']} / {m['total_steps']} |

Valid loss is the mean cross-entropy per assistant token (content and end-of-turn), on
the held-out split written by 01_data.

## Training parameters
| parameter | value |
|---|---|
{params}

## Use
{card['usage_instructions']}
"""


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

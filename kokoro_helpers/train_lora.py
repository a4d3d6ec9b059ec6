"""Local LoRA fine-tuning (transformers + peft): the 02_finetune Part B trainer and its CLI.

One small training loop, written out rather than hidden in a framework, because the rules of
this project are easier to see (and test) that way:

- data: 01_data's ``run_dir/data/{train,valid}.jsonl`` through the base tokenizer's chat
  template, labels on assistant tokens only (see :mod:`kokoro_helpers.lora_data`), long
  dialogues split into windows of whole turns, batches grouped by length (little padding);
- optimisation: AdamW on the LoRA weights, linear warm-up then cosine (or linear) decay,
  gradient clipping, gradient accumulation with the loss normalised by the number of trained
  tokens in the whole accumulated batch (not averaged per micro-batch);
- every epoch: valid loss; a checkpoint (adapter, optimizer, scheduler, RNG, state) that a
  later run resumes from, continuing the step count; ``seed`` fixes init, order and dropout;
- hardware: fp32 on CPU; bf16 (or fp16 where bf16 is missing) with ``device_map`` on GPU, chosen
  automatically; the same file runs under ``accelerate launch`` for several GPUs (DDP).

Outputs, as the seeds lay them out::

    run_dir/models/<name>/            adapter_model.safetensors, adapter_config.json, tokenizer
                                      files (chat template included), README.md (model card),
                                      history.json (loss curves), data_report.json
    run_dir/models/<name>.json        registry card: kind "local_lora", training_metrics, ...
    run_dir/checkpoints/<name>/       checkpoint-<step>/ (the last ``save_total_limit``)

Command line (same code as the notebook)::

    python -m kokoro_helpers.train_lora --params params/kokorochat.yaml [--run-dir R]
    accelerate launch --multi_gpu --num_processes 4 -m kokoro_helpers.train_lora --params params/kokorochat.yaml
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import cards
from .lora_data import (IGNORE_INDEX, SYSTEM_PROMPT_MODES, ChatEncoder, ChatTemplateError, DataReport, EncodedExample, collate, encode_examples,
                        length_grouped_batches, random_batches, sorted_batches)
from .jsonio import file_sha256, read_jsonl
from .paths import portable, resolve
from .resources import prefer_passive_openmp
from .tiny_model import EMBEDDED_TINY, is_embedded, portable_tokenizer_files, quiet_transformers

prefer_passive_openmp()

MODES = ("auto", "off", "train")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BATCHING = ("grouped", "max_length")
SCHEDULERS = ("cosine", "linear", "constant")


# =============================================================================== config

@dataclass
class LoraTrainConfig:
    """Every setting of a local LoRA run, with its default, in one place.

    The first block has the names of 02_finetune's ``parameters`` cell and of the parameter
    files (params/*.yaml); the second block are trainer settings a parameter file may also set.
    """

    # --- the notebook's Part B parameters (and the shared run_dir / seed)
    run_dir: str = "runs/default"
    seed: int = 42
    local_mode: str = "auto"              # auto | off | train
    local_base_model: str = EMBEDDED_TINY  # Hub id, local folder, or embedded:tiny
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Any = "all-linear"    # "all-linear", a list of module names, or "q_proj,v_proj"
    local_epochs: int = 3
    local_batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 5e-3
    max_length: int = 1024
    local_run_name: str = "lora-tiny"
    system_prompt_mode: str = "keep"      # keep | merge_into_first_user | drop | auto (lora_data.apply_system_prompt_mode)
    # --- trainer settings
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05            # share of the optimizer steps with a linear lr ramp
    lr_scheduler: str = "cosine"          # cosine | linear | constant (after the warm-up)
    max_grad_norm: float = 1.0
    precision: str = "auto"               # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16
    device_map: Any = None                # None: the whole model on this process's device; "auto" shards (1 process only)
    gradient_checkpointing: bool = False  # trade compute for memory on long sequences / big bases
    batching: str = "grouped"             # grouped: by length, pad to batch max | max_length: the seeds' baseline
    eval_batch_size: int | None = None    # default: 2 x local_batch_size
    eval_each_epoch: bool = True
    evaluate_base: bool = True            # held-out loss of the base (adapter disabled) before training
    save_checkpoints: bool = True         # at the end of each epoch (and every save_steps)
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: Any = "auto"                  # auto: latest matching checkpoint | never | latest | a checkpoint path
    max_steps: int | None = None          # stop after this many optimizer steps (the schedule still spans all epochs)
    progress: bool = True

    NOTEBOOK_NAMES = ("run_dir", "seed", "local_mode", "local_base_model", "lora_r", "lora_alpha",
                      "lora_dropout", "target_modules", "local_epochs", "local_batch_size", "grad_accum",
                      "learning_rate", "max_length", "local_run_name", "system_prompt_mode")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> "LoraTrainConfig":
        """Build from a parameter mapping (a params/*.yaml dict, or a notebook's ``globals()``):
        known names are taken, everything else ignored; ``overrides`` win. Values are coerced
        to the field's type (YAML reads ``2e-3`` as a string)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(params).items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None or k in ("max_steps",)})
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown LoRA settings {sorted(unknown)}; known: {sorted(names)}")
        cfg = cls(**values)
        cfg._coerce()
        cfg.validate()
        return cfg

    def _coerce(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            try:
                if value is None:
                    continue
                if kind.startswith("int") and not isinstance(value, bool):
                    if isinstance(value, str) or (isinstance(value, float) and value.is_integer()):
                        setattr(self, f.name, int(float(value)))
                elif kind == "float":
                    setattr(self, f.name, float(value))
                elif kind == "bool" and isinstance(value, str):
                    setattr(self, f.name, value.strip().lower() in ("1", "true", "yes", "on"))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{f.name}={value!r} is not a valid {kind}") from exc
        # YAML 1.1 reads unquoted off/no/on/yes as booleans
        if isinstance(self.local_mode, bool):
            self.local_mode = "train" if self.local_mode else "off"
        if isinstance(self.resume, bool):
            self.resume = "latest" if self.resume else "never"
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def validate(self) -> None:
        """Raise ValueError naming the bad setting and its allowed values."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.local_mode in MODES, f"local_mode must be one of {MODES}, got {self.local_mode!r}")
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.batching in BATCHING, f"batching must be one of {BATCHING}, got {self.batching!r}")
        check(self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        for name in ("lora_r", "lora_alpha", "local_epochs", "local_batch_size", "grad_accum", "max_length"):
            check(int(getattr(self, name)) >= 1, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or null, got {self.max_steps}")
        check(bool(str(self.local_run_name).strip()), "local_run_name must not be empty")
        check(self.system_prompt_mode in SYSTEM_PROMPT_MODES,
              f"system_prompt_mode must be one of {SYSTEM_PROMPT_MODES}, got {self.system_prompt_mode!r}")
        check(bool(str(self.local_base_model).strip()), "local_base_model must not be empty")

    @classmethod
    def from_notebook(cls, namespace: Mapping[str, Any], **overrides: Any) -> "LoraTrainConfig":
        """From a notebook's globals(): only the parameter-cell names (NOTEBOOK_NAMES) are read, so an
        unrelated variable of another part of the notebook can never change a trainer setting."""
        return cls.from_params({k: namespace[k] for k in cls.NOTEBOOK_NAMES if k in namespace}, **overrides)

    @property
    def name(self) -> str:
        """The model's name: its card's model_id and (slugified) its folder's name."""
        return str(self.local_run_name)

    def training_params(self) -> dict[str, Any]:
        """The settings a card records (everything but bookkeeping switches)."""
        skip = {"run_dir", "progress", "resume", "eval_each_epoch", "evaluate_base", "save_checkpoints",
                "save_steps", "save_total_limit"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


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
            return f"local LoRA: SKIPPED - {self.reason}"
        return (f"local LoRA: training on {self.device} ({self.precision}"
                f"{f', {self.world_size} processes' if self.world_size > 1 else ''}) - {self.reason}")


def _cuda_available() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def make_plan(cfg: LoraTrainConfig) -> Plan:
    """Decide train/skip, device and precision from local_mode, the base and the hardware."""
    cuda = _cuda_available()
    device = "cuda" if cuda else "cpu"
    if cfg.precision != "auto":
        precision = cfg.precision
    elif cuda:
        import torch
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        precision = "fp32"
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    base = cfg.local_base_model
    if cfg.local_mode == "off":
        return Plan("skip", "local_mode is 'off'", device, precision, world)
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
        f"local_mode 'auto' does not train {base!r} on a CPU-only machine: a Hub-size model needs a GPU. "
        "Run `python -m kokoro_helpers.train_lora --params <your params>.yaml` on a GPU machine "
        "(`accelerate launch ... -m kokoro_helpers.train_lora` for several GPUs), set local_mode='train' to "
        f"force a (slow) CPU run, or local_base_model='{EMBEDDED_TINY}' for the offline smoke model"),
        device, precision, world)


# =============================================================================== helpers

def _loss_sum(logits, labels):
    """Sum of next-token cross-entropy over labelled positions, and their number (fp32 math)."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits[:, :-1, :][mask].float()
    return F.cross_entropy(picked, targets[mask], reduction="sum"), int(mask.sum())


def _label_tokens(items: Sequence[EncodedExample]) -> int:
    """Labelled next-token targets (position 0 is never a target)."""
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE_INDEX) for e in items)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - frac)
    return 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class TrainState:
    """Everything a checkpoint needs besides tensors; written as trainer_state.json."""

    global_step: int = 0
    epoch: int = 0                       # epochs completed
    step_in_epoch: int = 0               # optimizer steps done in the current epoch
    tokens_seen: int = 0                 # real (non-padding) input tokens, all processes
    positions_seen: int = 0              # batch positions incl. padding, all processes
    label_tokens_seen: int = 0
    train_time_s: float = 0.0            # time inside training steps (no eval, no checkpoints)
    wall_s: float = 0.0                  # whole training wall time, summed over resumed sessions
    base_valid_loss: float | None = None
    train_history: list[dict[str, float]] = field(default_factory=list)
    valid_history: list[dict[str, float]] = field(default_factory=list)
    fingerprint: str = ""
    total_steps: int = 0
    resumed_from: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
    """One local LoRA run: ``plan`` (no loading), ``prepare()`` (model, data), ``train()``.

    >>> run = LoraRun(LoraTrainConfig(run_dir="runs/default"))
    >>> print(run.plan.describe())
    >>> result = run.train()          # prepares first if needed; returns a TrainResult
    """

    def __init__(self, config: LoraTrainConfig):
        config.validate()
        self.cfg = config
        self.plan = make_plan(config)
        self.prepared = False
        self.run_dir = resolve(config.run_dir)
        slug = cards.slugify(config.name)
        self.adapter_dir = cards.models_dir(self.run_dir) / slug
        self.card_file = cards.card_path(self.run_dir, config.name)
        self.checkpoint_root = self.run_dir / "checkpoints" / slug

    @property
    def will_train(self) -> bool:
        return self.plan.action == "train"

    # ----------------------------------------------------------------- preparation
    def _log(self, message: str) -> None:
        if self.is_main:
            from tqdm.auto import tqdm
            tqdm.write(message)

    @property
    def is_main(self) -> bool:
        acc = getattr(self, "accelerator", None)
        return acc.is_main_process if acc is not None else int(os.environ.get("RANK", "0") or 0) == 0

    def prepare(self) -> "LoraRun":
        """Load data, tokenizer, base model, LoRA; encode the splits. Idempotent."""
        if self.prepared or not self.will_train:
            return self
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        t0 = time.perf_counter()
        data_dir = self.run_dir / "data"
        paths = {s: data_dir / f"{s}.jsonl" for s in ("train", "valid")}
        if not paths["train"].is_file():
            raise FileNotFoundError(
                f"{paths['train']} not found: run 01_data first (notebooks/01_data.ipynb, or "
                f".venv/bin/python -c \"from kokoro_helpers.data import prepare_data; "
                f"prepare_data(run_dir='{cfg.run_dir}')\")")
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[self.plan.precision]
        self.accelerator = Accelerator(mixed_precision=mixed, cpu=self.plan.device == "cpu")
        acc = self.accelerator
        self.plan.world_size = acc.num_processes
        set_seed(cfg.seed)

        self.data_sha256 = {s: file_sha256(p) for s, p in paths.items() if p.is_file()}
        raw = {s: read_jsonl(p) if p.is_file() else [] for s, p in paths.items()}
        if not raw["train"]:
            raise ValueError(f"{paths['train']} holds no examples: check 01_data's filters (stats.json)")

        from .tiny_model import resolve_base_model
        with acc.main_process_first():      # one process builds / downloads, the others then read
            self.base_path = resolve_base_model(cfg.local_base_model, progress=cfg.progress and self.is_main)
            self.tokenizer, self.base_model = self._load_base()
        self.encoder = ChatEncoder(self.tokenizer, system_prompt_mode=cfg.system_prompt_mode)
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

        from peft import LoraConfig, get_peft_model
        set_seed(cfg.seed)      # the LoRA init is the same whatever loading consumed
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():   # peft calls a transformers property deprecated in 5.x
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(self.base_model, lora)
        except ValueError as exc:
            raise ValueError(f"target_modules={cfg.target_modules!r} does not fit {cfg.local_base_model}: {exc}. "
                             "Use 'all-linear' or names of its Linear layers (e.g. q_proj,k_proj,v_proj,o_proj)") from exc
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        self.trainable_params, self.total_params = (int(x) for x in model.get_nb_trainable_parameters())
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.trainable = params
        self.steps_per_epoch = math.ceil(len(self._rank_batches(0)) / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.local_epochs
        warmup = int(self.total_steps * cfg.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer,
            lambda s: lr_factor(s, self.total_steps, warmup, cfg.lr_scheduler))
        self.fingerprint = self._fingerprint()
        self.prepare_s = time.perf_counter() - t0
        self.prepared = True
        return self

    def data_table(self):
        """Per split: examples, sequences (windows), tokens, trained tokens, longest, dropped exchanges."""
        import pandas as pd

        if not self.prepared:
            return pd.DataFrame()
        return pd.DataFrame([r.as_dict() for r in self.reports.values()]).set_index("split")

    def describe(self) -> str:
        """What will be trained, on what: the plan, the base, the data and the trainable fraction."""
        lines = [self.plan.describe()]
        if self.prepared:
            lines.append(f"base: {self.cfg.local_base_model} ({portable(Path(self.base_path)) if Path(self.base_path).exists() else self.base_path}); "
                         f"turns end with {self.encoder.end_of_turn!r}")
            lines += [r.summary() for r in self.reports.values()]
            lines.append(f"LoRA r={self.cfg.lora_r}, alpha={self.cfg.lora_alpha} on {self.cfg.target_modules}: "
                         f"{self.trainable_params:,} trainable of {self.total_params:,} parameters "
                         f"({self.trainable_params / self.total_params:.2%})")
            lines.append(f"{self.total_steps} optimizer steps ({self.steps_per_epoch} per epoch x {self.cfg.local_epochs}), "
                         f"batch {self.cfg.local_batch_size} x grad_accum {self.cfg.grad_accum}"
                         f"{f' x {self.accelerator.num_processes} processes' if self.accelerator.num_processes > 1 else ''}; "
                         f"padding {self.epoch_padding_fraction():.1%} of batch positions ({self.cfg.batching} batching)")
        return "\n".join(lines)

    def _load_base(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg, acc = self.cfg, self.accelerator
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.plan.precision]
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.plan.device == "cuda":
            if cfg.device_map not in (None, "", {}):
                if acc.num_processes > 1:
                    raise ValueError("device_map shards one model over GPUs and cannot be combined with DDP "
                                     "(accelerate launch): leave device_map unset")
                kwargs["device_map"] = cfg.device_map
            else:
                kwargs["device_map"] = {"": acc.device}
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(self.base_path)
                model = AutoModelForCausalLM.from_pretrained(self.base_path, **kwargs)
        except OSError as exc:
            raise OSError(
                f"could not load the base model {cfg.local_base_model!r} ({exc}). Without network it must be "
                "in the Hugging Face cache (HF_HOME) or a local folder: run `huggingface-cli download "
                f"{cfg.local_base_model}` where the Hub is reachable and copy the cache over, or set "
                f"local_base_model to the folder (or '{EMBEDDED_TINY}' for the offline smoke model).") from exc
        model.config.use_cache = False
        return tokenizer, model

    def _fingerprint(self) -> str:
        from .tiny_model import DEFAULT_RECIPE

        base_id = (f"{EMBEDDED_TINY}:{DEFAULT_RECIPE.fingerprint()}" if is_embedded(self.cfg.local_base_model)
                   else self.cfg.local_base_model)
        keep = self.cfg.training_params()
        keep.pop("max_steps", None)
        keep.pop("progress", None)
        blob = json.dumps({"config": keep, "base": base_id, "data": self.data_sha256,
                           "precision": self.plan.precision, "world_size": self.accelerator.num_processes},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ----------------------------------------------------------------- batches
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        lengths = [len(e) for e in self.items["train"]]
        if self.cfg.batching == "max_length":
            return random_batches(len(lengths), self.cfg.local_batch_size, self.cfg.seed, epoch)
        return length_grouped_batches(lengths, self.cfg.local_batch_size, self.cfg.seed, epoch)

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch: the global list, padded by cycling to a multiple of
        the number of processes (every process must take the same number of steps), then strided."""
        batches = self._epoch_batches(epoch)
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world > 1:
            extra = (-len(batches)) % world
            batches = batches + batches[:extra]
            batches = batches[rank::world]
        return batches

    def epoch_padding_fraction(self, epoch: int = 0) -> float:
        """Padding share of the batches of an epoch with this run's batching."""
        from .lora_data import padding_fraction

        lengths = [len(e) for e in self.items["train"]]
        pad_to = self.cfg.max_length if self.cfg.batching == "max_length" else None
        return padding_fraction(lengths, self._epoch_batches(epoch), pad_to)

    def _collate(self, idx: Sequence[int], split: str = "train"):
        items = [self.items[split][i] for i in idx]
        pad_to = self.cfg.max_length if (self.cfg.batching == "max_length" and split == "train") else None
        batch = collate(items, self.encoder.pad_id, pad_to)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}, items

    def _forward(self, model, batch):
        """Logits of a right-padded batch.

        With right padding a causal LM's real tokens only ever attend to earlier, real tokens, so
        the padding mask changes nothing that is trained or scored: it is left out, and attention
        runs its plain causal kernel (faster: no mask to build or apply; flash kernels on GPU).
        Padded positions get meaningless logits that carry label -100. The ``max_length``
        baseline passes the mask, as the seeds' pipeline did.
        """
        mask = batch["attention_mask"] if self.cfg.batching == "max_length" else None
        return model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False).logits

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "valid", adapter: bool = True) -> float | None:
        """Mean cross-entropy per labelled (assistant) token over a split; None if it is empty."""
        import torch

        acc = self.accelerator
        items = self.items.get(split, [])
        model = acc.unwrap_model(self.model)
        bs = self.cfg.eval_batch_size or 2 * self.cfg.local_batch_size
        batches = sorted_batches([len(e) for e in items], bs)[acc.process_index::acc.num_processes]
        total = torch.zeros(2, dtype=torch.float64, device=acc.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), (nullcontext() if adapter else model.disable_adapter()), acc.autocast():
                for idx in batches:
                    batch, _ = self._collate(idx, split)
                    logits = self._forward(model, batch)
                    s, n = _loss_sum(logits, batch["labels"])
                    total[0] += s.double()
                    total[1] += n
        finally:
            model.train(was_training)
        total = acc.reduce(total, reduction="sum") if acc.num_processes > 1 else total
        return float(total[0] / total[1]) if float(total[1]) > 0 else None

    # ----------------------------------------------------------------- checkpoints
    def _checkpoints(self) -> list[Path]:
        if not self.checkpoint_root.is_dir():
            return []
        found = [p for p in self.checkpoint_root.glob("checkpoint-*")
                 if p.is_dir() and (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def save_checkpoint(self, state: TrainState) -> Path:
        """Adapter, optimizer, scheduler, RNG (per process) and state: enough to continue exactly."""
        import torch

        acc = self.accelerator
        final = self.checkpoint_root / f"checkpoint-{state.global_step}"
        tmp = self.checkpoint_root / f".tmp-checkpoint-{state.global_step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            acc.unwrap_model(self.model).save_pretrained(tmp)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if getattr(acc, "scaler", None) is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        acc.wait_for_everyone()
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np
            rng["numpy"] = np.random.get_state()
        except ImportError:
            pass
        torch.save(rng, tmp / f"rng_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state.to_json(), indent=1) + "\n", encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._checkpoints()[:-max(1, self.cfg.save_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _find_resume(self) -> Path | None:
        resume = self.cfg.resume
        if resume in (False, None, "never", "no", "false"):
            return None
        if resume not in (True, "auto", "latest", "true"):
            path = resolve(str(resume))
            if not (path / "trainer_state.json").is_file():
                raise FileNotFoundError(f"resume={resume!r}: {path} is not a checkpoint folder (no trainer_state.json)")
            return path
        found = self._checkpoints()
        if not found:
            if resume in (True, "latest", "true"):
                raise FileNotFoundError(f"resume={resume!r} but there is no checkpoint in {self.checkpoint_root}")
            return None
        return found[-1]

    def load_checkpoint(self, path: Path) -> TrainState:
        """Restore adapter weights, optimizer, scheduler, RNG and state from ``path``."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        acc = self.accelerator
        state = TrainState.from_json(json.loads((path / "trainer_state.json").read_text(encoding="utf-8")))
        if state.fingerprint != self.fingerprint:
            raise ValueError(
                f"checkpoint {path} was written by a run with other settings, data or base model "
                f"(fingerprint {state.fingerprint} != {self.fingerprint}); set resume='never' to start over")
        weights = load_file(str(path / "adapter_model.safetensors"))      # small: copied onto the model below
        result = set_peft_model_state_dict(acc.unwrap_model(self.model), weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise ValueError(f"checkpoint {path} has adapter weights this model lacks: {missing[:3]}...")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        if getattr(acc, "scaler", None) is not None and (path / "scaler.pt").is_file():
            acc.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
        rng_file = path / f"rng_state_{acc.process_index}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=False)
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            if "numpy" in rng:
                import numpy as np
                np.random.set_state(rng["numpy"])
        state.resumed_from.append(path.name)
        return state

    # ----------------------------------------------------------------- training
    def train(self) -> TrainResult:
        """Train (resuming when a matching checkpoint exists), evaluate, write adapter and card."""
        if not self.will_train:
            self._log(self.plan.describe())
            return TrainResult(skipped=self.plan.reason, name=self.cfg.name)
        self.prepare()
        import torch
        from tqdm.auto import tqdm

        from .resources import ResourceMonitor

        cfg, acc = self.cfg, self.accelerator
        session_t0 = time.perf_counter()
        state = TrainState(fingerprint=self.fingerprint, total_steps=self.total_steps)
        resume_from = self._find_resume()
        if resume_from is not None:
            try:
                state = self.load_checkpoint(resume_from)
                self._log(f"resuming from {portable(resume_from)} at step {state.global_step}/{self.total_steps}")
            except ValueError as exc:
                if cfg.resume != "auto":
                    raise
                self._log(f"not resuming: {exc}. Starting over; old checkpoints in "
                          f"{portable(self.checkpoint_root)} are removed.")
                if acc.is_main_process:
                    shutil.rmtree(self.checkpoint_root, ignore_errors=True)
                acc.wait_for_everyone()
        else:
            torch.manual_seed(cfg.seed + 1000 * acc.process_index)   # dropout differs per process
        if cfg.evaluate_base and state.base_valid_loss is None and self.items["valid"]:
            state.base_valid_loss = self.evaluate("valid", adapter=False)

        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        monitor = ResourceMonitor(self.run_dir, warn_cpu=self.plan.device != "cpu")
        show = cfg.progress and acc.is_main_process
        bar = tqdm(total=self.total_steps, initial=state.global_step, desc=f"LoRA {cfg.name}", unit="step",
                   disable=not show, dynamic_ncols=True)
        model = self.model
        model.train()
        ga = cfg.grad_accum
        last_saved = state.global_step if resume_from is not None else -1
        while state.epoch < cfg.local_epochs and state.global_step < stop_at:
            epoch = state.epoch
            micro = self._rank_batches(epoch)
            windows = [micro[k:k + ga] for k in range(0, len(micro), ga)]
            for w in range(state.step_in_epoch, len(windows)):
                if state.global_step >= stop_at:
                    break
                t0 = time.perf_counter()
                batches = [self._collate(idx) for idx in windows[w]]
                n_local = sum(_label_tokens(items) for _, items in batches)
                counts = torch.tensor([n_local, sum(int(b["attention_mask"].sum()) for b, _ in batches),
                                       sum(b["input_ids"].numel() for b, _ in batches)],
                                      dtype=torch.float64, device=acc.device)
                if acc.num_processes > 1:
                    counts = acc.reduce(counts, reduction="sum")
                n_labels = max(1.0, float(counts[0]))
                loss_total = torch.zeros((), dtype=torch.float64, device=acc.device)
                for j, (batch, _) in enumerate(batches):
                    sync = j == len(batches) - 1
                    with (nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(model)):
                        logits = self._forward(model, batch)
                        loss_sum, _ = _loss_sum(logits, batch["labels"])
                        # DDP averages gradients over processes: scale so the result is sum/n_labels
                        acc.backward(loss_sum * (acc.num_processes / n_labels))
                    loss_total += loss_sum.detach().double()
                grad_norm = acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm) if cfg.max_grad_norm else None
                lr = self.scheduler.get_last_lr()[0]                  # the rate this step uses
                self.optimizer.step()
                if not getattr(self.optimizer, "step_was_skipped", False):
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if acc.num_processes > 1:
                    loss_total = acc.reduce(loss_total, reduction="sum")
                loss = float(loss_total) / n_labels
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the training loss is {loss} at step {state.global_step + 1}: lower learning_rate "
                        f"(now {cfg.learning_rate}), keep max_grad_norm on, or use precision='bf16'/'fp32' instead "
                        "of fp16; the last good checkpoint is in " + portable(self.checkpoint_root))
                if self.plan.device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                state.global_step += 1
                state.step_in_epoch = w + 1
                state.train_time_s += dt
                state.label_tokens_seen += int(counts[0])
                state.tokens_seen += int(counts[1])
                state.positions_seen += int(counts[2])
                gn = float(grad_norm) if grad_norm is not None else None
                state.train_history.append({
                    "step": state.global_step, "epoch": round(epoch + (w + 1) / len(windows), 4),
                    "loss": round(loss, 5), "lr": lr, "tokens": int(counts[1]), "time_s": round(dt, 4),
                    "grad_norm": round(gn, 4) if gn is not None and math.isfinite(gn) else None})
                bar.update(1)
                if show:
                    tps = state.tokens_seen / state.train_time_s if state.train_time_s else 0.0
                    bar.set_postfix({"loss": f"{loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{tps:,.0f}",
                                     **monitor.postfix()}, refresh=False)
                if acc.is_main_process:
                    for line in monitor.check():          # warnings also without a progress bar
                        self._log(line)
                if cfg.save_checkpoints and cfg.save_steps and state.global_step % cfg.save_steps == 0:
                    self._checkpoint(state, session_t0)
                    last_saved = state.global_step
            if state.step_in_epoch >= len(windows):                  # the epoch is complete
                state.epoch += 1
                state.step_in_epoch = 0
                if cfg.eval_each_epoch and self.items["valid"]:
                    vloss = self.evaluate("valid")
                    state.valid_history.append({"step": state.global_step, "epoch": state.epoch, "loss": vloss})
                    self._log(f"epoch {state.epoch}/{cfg.local_epochs}: valid loss {vloss:.4f}"
                              + (f" (base {state.base_valid_loss:.4f})" if state.base_valid_loss else ""))
                if cfg.save_checkpoints and last_saved != state.global_step:
                    self._checkpoint(state, session_t0)
                    last_saved = state.global_step
        bar.close()
        if cfg.save_checkpoints and last_saved != state.global_step and state.global_step < self.total_steps:
            self._checkpoint(state, session_t0)                      # stopped by max_steps: resumable
        finished = state.global_step >= self.total_steps
        if state.valid_history and state.valid_history[-1]["step"] == state.global_step:
            adapter_loss = state.valid_history[-1]["loss"]
        else:
            adapter_loss = self.evaluate("valid") if self.items["valid"] else None
        state.wall_s += time.perf_counter() - session_t0
        return self._write_outputs(state, adapter_loss, finished)

    def _checkpoint(self, state: TrainState, session_t0: float) -> None:
        wall = state.wall_s
        state.wall_s = wall + (time.perf_counter() - session_t0)     # as of this checkpoint
        self.save_checkpoint(state)
        state.wall_s = wall

    # ----------------------------------------------------------------- outputs
    def metrics(self, state: TrainState, adapter_loss: float | None) -> dict[str, Any]:
        return {
            "base_valid_loss": state.base_valid_loss,
            "adapter_valid_loss": adapter_loss,
            "train_tokens_per_s": round(state.tokens_seen / state.train_time_s, 1) if state.train_time_s else None,
            "padding_fraction": round(1 - state.tokens_seen / state.positions_seen, 4) if state.positions_seen else None,
            "wall_s": round(state.wall_s, 2),
            "train_time_s": round(state.train_time_s, 2),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_fraction": self.trainable_params / self.total_params if self.total_params else None,
            "train_tokens": state.tokens_seen,
            "trained_label_tokens": state.label_tokens_seen,
            "global_step": state.global_step,
            "total_steps": self.total_steps,
            "epochs": state.epoch + (state.step_in_epoch / self.steps_per_epoch if self.steps_per_epoch else 0),
            "finished": state.global_step >= self.total_steps,
            "resumed_from": state.resumed_from,
        }

    def _write_outputs(self, state: TrainState, adapter_loss: float | None, finished: bool) -> TrainResult:
        acc, cfg = self.accelerator, self.cfg
        metrics = self.metrics(state, adapter_loss)
        history = {"train": state.train_history, "valid": state.valid_history,
                   "base_valid_loss": state.base_valid_loss}
        data = {"train_sha256": self.data_sha256.get("train"), "valid_sha256": self.data_sha256.get("valid"),
                "data_dir": portable(self.run_dir / "data"),
                "train": self.reports["train"].as_dict(), "valid": self.reports["valid"].as_dict(),
                "dropped": [dataclasses.asdict(d) for r in self.reports.values() for d in r.dropped]}
        result = TrainResult(name=cfg.name, adapter_dir=self.adapter_dir, card_path=self.card_file,
                             metrics=metrics, history=history, data=data)
        if acc.is_main_process:
            tmp = self.adapter_dir.with_name(self.adapter_dir.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            with quiet_transformers():
                acc.unwrap_model(self.model).save_pretrained(tmp)
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
                self._log(f"stopped at step {state.global_step}/{self.total_steps} (max_steps): the adapter is a "
                          "partial result; run again to resume from the checkpoint")
        acc.wait_for_everyone()
        return result

    def _card(self, metrics: dict[str, Any], history: dict[str, Any], data: dict[str, Any],
              finished: bool) -> dict[str, Any]:
        cfg = self.cfg
        adapter = portable(self.adapter_dir)
        usage = (
            f"Local LoRA adapter in {adapter} (peft). Load it with kokoro_helpers (04_local_lora_inference) or: "
            f"tok = AutoTokenizer.from_pretrained('{adapter}'); base = AutoModelForCausalLM.from_pretrained(<base>); "
            f"model = PeftModel.from_pretrained(base, '{adapter}'). Prompt with tok.apply_chat_template(messages, "
            f"add_generation_prompt=True); generation ends at {self.encoder.end_of_turn}. Base: "
            f"{cfg.local_base_model}" + (" (built by kokoro_helpers.tiny_model; a smoke model whose replies mean "
                                         "nothing)" if is_embedded(cfg.local_base_model) else "") + ".")
        training_params = dict(cfg.training_params(), precision=self.plan.precision, device=self.plan.device,
                               device_name=self._device_name(), world_size=self.accelerator.num_processes)
        return cards.new_card(
            kind="local_lora", model_id=cfg.name, base_model=cfg.local_base_model,
            training_params=training_params, usage_instructions=usage,
            adapter_path=adapter, base_model_path=portable(Path(self.base_path))
            if Path(self.base_path).exists() else self.base_path,
            training_metrics=metrics, loss_history=history, training_data=data,
            end_of_turn_token=self.encoder.end_of_turn, finished=finished,
            checkpoints=portable(self.checkpoint_root), smoke_model=is_embedded(cfg.local_base_model))

    def _device_name(self) -> str | None:
        """The GPU's name (cost estimates quote it); None on the CPU."""
        if self.plan.device != "cuda":
            return None
        import torch
        return torch.cuda.get_device_name(self.accelerator.device)

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

def _parse_value(text: str) -> Any:
    import yaml
    return yaml.safe_load(text)


def main(argv: list[str] | None = None) -> int:
    from .params import load_params

    ap = argparse.ArgumentParser(
        prog="python -m kokoro_helpers.train_lora",
        description="Train a local LoRA adapter on 01_data's files, with a params/*.yaml file "
                    "(the same names as 02_finetune's parameters). Runs under `accelerate launch` unchanged.")
    ap.add_argument("--params", required=True, help="parameter file, e.g. params/kokorochat.yaml")
    ap.add_argument("--run-dir", help="override run_dir (where data/ is read and models/ written)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override any setting, e.g. --set local_epochs=1 --set max_length=2048")
    ap.add_argument("--resume", help="auto (default) | never | latest | a checkpoint folder")
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (resumable)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs, batch jobs)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    overrides: dict[str, Any] = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set needs NAME=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value)
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
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = train_lora(cfg)
    except (OSError, ChatTemplateError) as exc:     # missing data / base model, unusable template
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0") or 0) == 0 and result.trained:
        print(result.summary())
        if result.trained and result.card_path:
            print(f"card: {portable(result.card_path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The settings of a local LoRA run, and their translation into TRL's ``SFTConfig``.

One dataclass (:class:`LoraTrainConfig`) holds every setting with its default. Its first block
are 02_finetune's parameter-cell names (also the names of params/*.yaml); the second block are
trainer and hardware settings a parameter file may set; any other ``SFTConfig`` /
``TrainingArguments`` field goes under ``trainer_args:`` and is checked against SFTConfig's own
fields (a misspelt name is an error naming the closest field).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

from kokoro_helpers.local.chat_messages import SYSTEM_PROMPT_MODES
from kokoro_helpers.local.tiny_model import EMBEDDED_TINY

MODES = ("auto", "off", "train")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BATCHING = ("grouped", "max_length")
SCHEDULERS = ("cosine", "linear", "constant")
QUANTIZATIONS = (None, "4bit", "8bit")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
REPORT_TO = ("none", "tensorboard", "trackio", "wandb")

# SFTConfig fields this project sets from its own (parameter-file) names: under trainer_args they
# would silently fight the named setting, so they are refused with the name to use instead.
OWN_NAMES = {
    "per_device_train_batch_size": "local_batch_size", "per_device_eval_batch_size": "local_eval_batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "local_epochs",
    "learning_rate": "learning_rate", "max_length": "max_length", "seed": "seed", "output_dir": "run_dir",
    "weight_decay": "weight_decay", "warmup_steps": "warmup_ratio", "lr_scheduler_type": "lr_scheduler",
    "max_grad_norm": "max_grad_norm", "bf16": "precision", "fp16": "precision", "use_cpu": "precision",
    "gradient_checkpointing": "gradient_checkpointing", "activation_checkpointing": "gradient_checkpointing",
    "packing": "packing", "report_to": "report_to",
    "use_liger_kernel": "use_liger_kernel", "max_steps": "max_steps", "save_total_limit": "save_total_limit",
    "save_steps": "save_steps", "model_init_kwargs": "attn_implementation / quantization / device_map",
}


@dataclass
class LoraTrainConfig:
    """Every setting of a local LoRA run, with its default, in one place."""

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
    system_prompt_mode: str = "keep"      # keep | merge_into_first_user | drop | auto (chat_messages.apply_system_prompt_mode)
    # --- trainer settings
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05            # share of the optimizer steps with a linear lr ramp
    lr_scheduler: str = "cosine"          # cosine | linear | constant (after the warm-up)
    max_grad_norm: float = 1.0
    precision: str = "auto"               # auto: fp32 on CPU, bf16 on GPUs that have it, else fp16
    batching: str = "grouped"             # grouped: by length, pad to batch max | max_length: the seeds' baseline
    local_eval_batch_size: int | None = None  # the trainer's held-out batch (not 03's eval_batch_size); default: local_batch_size
    heldout_eval: bool = True             # False: no held-out loss at all (base, per epoch, final)
    eval_each_epoch: bool = True
    evaluate_base: bool = True            # held-out loss of the base (adapter disabled) before training
    save_checkpoints: bool = True         # at the end of each epoch (and every save_steps)
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: Any = "auto"                  # auto: latest matching checkpoint | never | latest | a checkpoint path
    max_steps: int | None = None          # stop after this many optimizer steps (the schedule still spans all epochs)
    progress: bool = True
    # --- hardware
    quantization: str | None = None       # null | 4bit | 8bit (bitsandbytes, CUDA only: QLoRA)
    gradient_checkpointing: bool = False  # trade compute for activation memory (long sequences, big bases)
    attn_implementation: str = "sdpa"     # sdpa | eager | flash_attention_2 (enables padding-free batches)
    use_liger_kernel: Any = False         # True / "auto" (where liger-kernel is installed, on CUDA)
    packing: bool = False                 # bfd packing into max_length rows, position ids keep sequences apart
    report_to: Any = "none"               # none | tensorboard | trackio | wandb (or a list)
    device_map: Any = None                # None: this process's device; "auto": one model over this machine's GPUs
    check_memory: bool = True             # refuse a run the memory plan says will not fit the device
    trainer_args: dict = field(default_factory=dict)   # any other SFTConfig / TrainingArguments field

    NOTEBOOK_NAMES = ("run_dir", "seed", "local_mode", "local_base_model", "lora_r", "lora_alpha",
                      "lora_dropout", "target_modules", "local_epochs", "local_batch_size", "grad_accum",
                      "learning_rate", "max_length", "local_run_name", "local_eval_batch_size", "heldout_eval",
                      "quantization", "gradient_checkpointing", "attn_implementation", "use_liger_kernel",
                      "packing", "report_to", "device_map", "trainer_args", "system_prompt_mode")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> "LoraTrainConfig":
        """Build from a parameter mapping (a params/*.yaml dict, or a notebook's ``globals()``):
        known names are taken, everything else ignored; ``overrides`` win. Values are coerced
        to the field's type (YAML reads ``2e-3`` as a string)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(params).items() if k in names}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown LoRA settings {sorted(unknown)}; known: {sorted(names)}")
        values.update({k: v for k, v in overrides.items() if v is not None or k in ("max_steps", "quantization")})
        cfg = cls(**values)
        cfg._coerce()
        cfg.validate()
        return cfg

    @classmethod
    def from_notebook(cls, namespace: Mapping[str, Any], **overrides: Any) -> "LoraTrainConfig":
        """From a notebook's globals(): only the parameter-cell names (NOTEBOOK_NAMES) are read, so an
        unrelated variable of another part of the notebook can never change a trainer setting."""
        return cls.from_params({k: namespace[k] for k in cls.NOTEBOOK_NAMES if k in namespace}, **overrides)

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
        if isinstance(self.quantization, str) and self.quantization.strip().lower() in ("", "none", "null", "no"):
            self.quantization = None
        if isinstance(self.quantization, (int, float)) and not isinstance(self.quantization, bool):
            self.quantization = f"{int(self.quantization)}bit"
        if self.quantization is False:
            self.quantization = None
        if self.report_to in (None, False, [], "", "null"):
            self.report_to = "none"
        if self.trainer_args is None:
            self.trainer_args = {}

    def validate(self) -> None:
        """Raise ValueError naming the bad setting and its allowed values."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.local_mode in MODES, f"local_mode must be one of {MODES}, got {self.local_mode!r}")
        check(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check(self.batching in BATCHING, f"batching must be one of {BATCHING}, got {self.batching!r}")
        check(self.lr_scheduler in SCHEDULERS, f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        check(self.quantization in QUANTIZATIONS,
              f"quantization must be null, '4bit' or '8bit', got {self.quantization!r}")
        check(self.attn_implementation in ATTENTION,
              f"attn_implementation must be one of {ATTENTION}, got {self.attn_implementation!r}")
        reports = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        for r in reports:
            check(r in REPORT_TO, f"report_to must be one (or a list) of {REPORT_TO}, got {r!r}")
        check(self.use_liger_kernel in (True, False, "auto"),
              f"use_liger_kernel must be true, false or 'auto', got {self.use_liger_kernel!r}")
        for name in ("lora_r", "lora_alpha", "local_epochs", "local_batch_size", "grad_accum", "max_length"):
            check(int(getattr(self, name)) >= 1, f"{name} must be a positive integer, got {getattr(self, name)!r}")
        check(self.local_eval_batch_size is None or 1 <= self.local_eval_batch_size <= self.local_batch_size,
              f"local_eval_batch_size must be between 1 and local_batch_size={self.local_batch_size} (a held-out "
              f"batch larger than the training batch only raises peak memory), got {self.local_eval_batch_size!r}")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or null, got {self.max_steps}")
        check(bool(str(self.local_run_name).strip()), "local_run_name must not be empty")
        check(self.system_prompt_mode in SYSTEM_PROMPT_MODES,
              f"system_prompt_mode must be one of {SYSTEM_PROMPT_MODES}, got {self.system_prompt_mode!r}")
        check(bool(str(self.local_base_model).strip()), "local_base_model must not be empty")
        check(not (self.packing and self.batching == "max_length"),
              "packing and batching='max_length' exclude each other: packing already fills max_length rows")
        check_trainer_args(self.trainer_args)

    @property
    def name(self) -> str:
        """The model's name: its card's model_id and (slugified) its folder's name."""
        return str(self.local_run_name)

    @property
    def eval_batch(self) -> int:
        """The trainer's held-out batch: local_eval_batch_size, else the training batch."""
        return int(self.local_eval_batch_size or self.local_batch_size)

    def training_params(self) -> dict[str, Any]:
        """The settings a card records (everything but bookkeeping switches)."""
        skip = {"run_dir", "progress", "resume", "eval_each_epoch", "evaluate_base", "save_checkpoints",
                "save_steps", "save_total_limit", "check_memory"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


# =============================================================================== SFTConfig

def sft_field_names() -> set[str]:
    from trl import SFTConfig
    return {f.name for f in dataclasses.fields(SFTConfig) if f.init}


def check_trainer_args(trainer_args: Any) -> None:
    """``trainer_args`` must be a mapping of SFTConfig field names; a misspelt one names the closest."""
    if not trainer_args:
        return
    if not isinstance(trainer_args, Mapping):
        raise ValueError(f"trainer_args must be a mapping of SFTConfig fields, got {type(trainer_args).__name__}")
    known = sft_field_names()
    for key in trainer_args:
        if key in OWN_NAMES:
            raise ValueError(f"trainer_args: {key!r} is set by this project's own setting {OWN_NAMES[key]!r}; "
                             "set that instead")
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else " (see trl.SFTConfig / transformers.TrainingArguments)"
            raise ValueError(f"trainer_args: unknown SFTConfig field {key!r}{hint}")


def sft_kwargs(cfg: LoraTrainConfig, *, output_dir: str, device: str, precision: str, has_eval: bool,
               padding_free: bool = False, liger: bool = False) -> dict[str, Any]:
    """The SFTConfig keyword arguments of a run (``trainer_args`` last: they win)."""
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    eval_epochs = cfg.heldout_eval and cfg.eval_each_epoch and has_eval
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.local_batch_size, per_device_eval_batch_size=cfg.eval_batch,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.local_epochs,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=schedule, max_grad_norm=cfg.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        max_length=cfg.max_length, packing=cfg.packing, packing_strategy="bfd", padding_free=padding_free,
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_liger_kernel=liger,
        train_sampling_strategy="group_by_length" if cfg.batching == "grouped" else "random",
        pad_to_multiple_of=cfg.max_length if cfg.batching == "max_length" else None,
        logging_steps=1, logging_first_step=True, disable_tqdm=True, report_to=cfg.report_to,
        eval_strategy="epoch" if eval_epochs else "no",
        save_strategy=("steps" if cfg.save_steps else "epoch") if cfg.save_checkpoints else "no",
        save_total_limit=max(1, cfg.save_total_limit), include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=device == "cuda", remove_unused_columns=True,
        ddp_find_unused_parameters=False,
    )
    if cfg.save_steps:
        kwargs["save_steps"] = cfg.save_steps
    kwargs.update(dict(cfg.trainer_args or {}))
    return kwargs


def build_sft_config(cfg: LoraTrainConfig, **kw: Any):
    from trl import SFTConfig
    return SFTConfig(**sft_kwargs(cfg, **kw))

"""The plan of a local LoRA run, decided before anything is loaded: train or skip (and why), the device and
its precision (:func:`kokoro_helpers.local.precision.choose_precision`), the number of processes, and the
settings this machine cannot run (quantization without CUDA, flash attention without flash-attn, a
mistyped base folder), refused with what to do instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from kokoro_helpers.local.precision import choose_precision
from kokoro_helpers.local.sft_config import LoraTrainConfig
from kokoro_helpers.local.tiny_model import EMBEDDED_TINY, is_embedded
from kokoro_helpers.paths import resolve

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


def installed(module: str) -> bool:
    """Whether an optional package (bitsandbytes, flash_attn, liger_kernel) can be imported."""
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
    if cfg.quantization and not installed("bitsandbytes"):
        raise ValueError(f"quantization={cfg.quantization!r} needs bitsandbytes: pip install bitsandbytes")
    if cfg.attn_implementation.startswith("flash_attention") and not (cuda and installed("flash_attn")):
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

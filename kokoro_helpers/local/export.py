"""Adapter folders written from code: a LoRA adapter merged into its base and saved as a standalone
model folder (:func:`merge_and_export`), and a freshly initialised, untrained adapter for demos and
tests (:func:`init_adapter`). Both folders are built all or nothing (:func:`kokoro_helpers.jsonio.atomic_dir`)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from kokoro_helpers import cards
from kokoro_helpers.jsonio import atomic_dir
from kokoro_helpers.local.precision import device_and_dtype
from kokoro_helpers.local.sources import (ADAPTER_CONFIG, is_tiny_build, resolve_base,
                                          resolve_source)
from kokoro_helpers.local.weights import load_adapted, load_full_model, load_tokenizer, quiet_loading
from kokoro_helpers.paths import DEFAULT_RUN_DIR, portable, resolve


def merge_and_export(source: Any, out_dir: str | Path, run_dir: str | Path = DEFAULT_RUN_DIR, *,
                     base_model: str | None = None, overwrite: bool = False, device: str | None = "cpu",
                     dtype: str | Any = "auto", allow_base_mismatch: bool = False) -> Path:
    """Merge a LoRA adapter into its base (peft ``merge_and_unload``) and save a standalone model
    folder: weights (safetensors), config, generation config, the adapter's tokenizer with its
    chat template, and a README naming the base and the adapter. Loads a fresh copy (on the CPU
    by default), so a model in use is untouched. The folder loads with ``load(out_dir)`` or
    ``AutoModelForCausalLM.from_pretrained`` alone, and is what vLLM serves without ``--enable-lora``.
    """
    from kokoro_helpers.local.tiny_model import portable_tokenizer_files, quiet_transformers

    out = Path(out_dir)
    if not out.is_absolute():
        out = resolve(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass overwrite=True or choose another folder")
    src = resolve_source(source, run_dir, base_model=base_model, allow_base_mismatch=allow_base_mismatch)
    for note in src.notes:
        warnings.warn(note, stacklevel=2)
    if src.kind != "adapter":
        raise ValueError(f"{source!r} is not an adapter: there is nothing to merge")
    device, torch_dtype = device_and_dtype(device, dtype)
    model, tokenizer = load_adapted(src, device, torch_dtype, src.name)
    with quiet_loading():
        merged = model.merge_and_unload()
    merged.eval()
    if dtype in (None, "auto"):      # merged in the loading precision (fp32 on a CPU), saved in the base's own
        import torch
        try:
            base_cfg = json.loads((Path(str(src.model_path)) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            base_cfg = {}
        name = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
        base_dtype = getattr(torch, str(name), None) if name else None
        if isinstance(base_dtype, torch.dtype) and base_dtype.is_floating_point and merged.dtype != base_dtype:
            merged = merged.to(base_dtype)
    with atomic_dir(out) as tmp:
        with quiet_transformers():
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        portable_tokenizer_files(tmp)
        card = src.card or {}
        (tmp / "README.md").write_text(
            f"# {src.name} (merged)\n\nThe LoRA adapter `{portable(src.adapter_dir)}` merged into its base "
            f"`{src.base_model or src.model_path}` with peft `merge_and_unload` by "
            "kokoro_helpers.local.export.merge_and_export: a standalone model folder (no peft needed).\n"
            + ("\n> **Smoke model.** The base is the package's embedded tiny model; replies mean nothing.\n"
               if card.get("smoke_model") or is_tiny_build(src.model_path) else ""),
            encoding="utf-8")
        (tmp / "merge_info.json").write_text(json.dumps({
            "adapter": portable(src.adapter_dir), "adapter_name": src.name,
            "base_model": src.base_model, "base_path": portable(src.model_path),
            "dtype": str(merged.dtype).replace("torch.", ""), "merged_at": cards.now_iso()}, indent=2) + "\n",
            encoding="utf-8")
    return out


def init_adapter(out_dir: str | Path, base_model: str = "embedded:tiny", *, r: int = 8, lora_alpha: int = 16,
                 target_modules: Any = "all-linear", seed: int = 0, random_init: bool = True,
                 overwrite: bool = True) -> Path:
    """A freshly initialised (UNTRAINED) LoRA adapter on ``base_model``, saved like 02 saves one
    (adapter files + the base's tokenizer + a README saying it is untrained). ``random_init``:
    both LoRA matrices random (the adapter changes the outputs: tests, benchmarks); else peft's
    default (B = 0: the same outputs as the base). For demos and tests when no trained adapter
    exists; its replies mean nothing."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kokoro_helpers.local.tiny_model import portable_tokenizer_files

    out = Path(out_dir)
    if not out.is_absolute():
        out = resolve(out)
    if (out / ADAPTER_CONFIG).is_file() and not overwrite:
        return out
    base_path = resolve_base(base_model)
    with atomic_dir(out) as tmp:
        with quiet_loading():
            tokenizer = load_tokenizer(base_path)
            model = load_full_model(base_path, "cpu", torch.float32, "the base model")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                peft_model = get_peft_model(model, LoraConfig(
                    r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0, bias="none",
                    task_type="CAUSAL_LM", init_lora_weights=not random_init))
            peft_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        portable_tokenizer_files(tmp)
        (tmp / "README.md").write_text(
            f"# Untrained LoRA adapter ({'random' if random_init else 'zero-effect'} initialisation)\n\n"
            f"Made by `kokoro_helpers.local.export.init_adapter` on `{base_model}` (r={r}, alpha={lora_alpha}, "
            f"seed={seed}) for demos and tests. **It was never trained: its replies mean nothing.** Train a real "
            "adapter with 02_finetune Part B or `python -m kokoro_helpers.train_lora --params params/default.yaml`.\n",
            encoding="utf-8")
    return out

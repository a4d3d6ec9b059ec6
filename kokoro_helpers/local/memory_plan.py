"""What a LoRA run will need in memory, before any weight is loaded (an estimate, labelled as one).

The model is built on PyTorch's ``meta`` device from its config (no weights, no memory), which
gives the exact parameter count and the exact shapes of the Linear layers LoRA will wrap. From
those and the run's settings:

- weights at the chosen precision, or 4/8-bit (bitsandbytes quantizes the decoder's Linear
  layers; embeddings, norms and the LM head stay in 16 bit);
- LoRA weights + their gradients + AdamW's two moments (fp32: 16 bytes per LoRA parameter);
- activations of one micro-batch (``local_batch_size`` x ``max_length`` tokens) kept for the
  backward pass, without and with gradient checkpointing (a per-token-per-layer estimate);
- the logits: a full fp32 ``tokens x vocabulary`` tensor is what a plain loss would build; the
  trainer's chunked loss (TRL's fused LM head) holds one ``4096 x 32768`` tile at a time instead.

It is compared with the device's memory (the GPU's, each GPU's share under ``device_map: auto``,
or the machine's available RAM on a CPU); when it does not fit, the plan names the settings that
would make it fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 2 ** 30
TILE_TOKENS, TILE_VOCAB = 4096, 32768     # TRL's chunked log-prob tile (trl.kernels.chunked_logprob)
HEADROOM = 0.9                            # plan for at most 90% of the device (the monitor's alert level)


def meta_model(config: Any):
    """The model of ``config`` on the meta device: real module tree and shapes, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every nn.Linear (the LM head included)."""
    import torch.nn as nn
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def lora_targets(model, target_modules: Any) -> dict[str, tuple[int, int]]:
    """The Linear layers LoRA wraps: peft's 'all-linear' (every Linear but the output head) or those
    whose name ends with one of ``target_modules``. Raises ValueError naming what the model has."""
    layers = linear_layers(model)
    head = model.get_output_embeddings()
    head_names = {n for n, m in model.named_modules() if m is head}
    if target_modules == "all-linear":
        return {n: s for n, s in layers.items() if n not in head_names}
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found = {n: s for n, s in layers.items() if any(n == t or n.endswith("." + t) for t in wanted)}
    have = sorted({n.rsplit(".", 1)[-1] for n in layers if n not in head_names})
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        raise ValueError(f"target_modules {missing} are not Linear layers of this model: it has {have}. "
                         "Use 'all-linear' or some of those names")
    return found


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """Make glibc's malloc serve every allocation above ``threshold`` bytes with its own mmap, and
    give it back to the system when freed.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    the activations a training step allocates and frees come from the heap, fragment it, and stay
    in the process: the 12-layer Qwen2.5-0.5B shape at 1,024 tokens with gradient checkpointing
    peaked at 4.4 GiB RSS with the default and 2.3 GiB with a fixed threshold (and steps were not
    slower). Linux/glibc only; elsewhere nothing happens (returns False)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1
        libc.mallopt(M_TRIM_THRESHOLD, int(threshold))
        return ok
    except (OSError, AttributeError):
        return False


def _bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass
class MemoryPlan:
    """The estimate, per item in GiB, next to the device's memory."""

    device: str
    device_gib: float | None
    rows: dict[str, float] = field(default_factory=dict)     # item -> GiB
    total_gib: float = 0.0
    fits: bool = True
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self):
        import pandas as pd

        rows = [{"item": k, "GiB (estimate)": round(v, 3)} for k, v in self.rows.items()]
        rows.append({"item": "total for this run", "GiB (estimate)": round(self.total_gib, 3)})
        if self.device_gib is not None:
            rows.append({"item": f"{self.device} memory available", "GiB (estimate)": round(self.device_gib, 3)})
        return pd.DataFrame(rows).set_index("item")

    def describe(self) -> str:
        head = (f"memory plan (estimate): about {self.total_gib:.2f} GiB needed"
                + (f" of {self.device_gib:.1f} GiB {self.device} memory available" if self.device_gib else ""))
        lines = [head + (": fits" if self.fits else ": WILL NOT FIT")]
        lines += [f"  {k}: {v:.3f} GiB" for k, v in self.rows.items()]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.fits:
            lines += [f"  would fit: {a}" for a in self.advice] or ["  no setting of this run makes it fit: "
                                                                   "use a smaller base or a larger device"]
        return "\n".join(lines)


def estimate(config: Any, cfg: Any, device: str, precision: str, device_gib: float | None = None,
             model=None) -> MemoryPlan:
    """Estimate one process's memory for the run ``cfg`` (a LoraTrainConfig) of the model ``config``."""
    model = model if model is not None else meta_model(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size"))
    inter = int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers"))
    vocab = int(getattr(text, "vocab_size"))
    params = {id(p): p.numel() for p in model.parameters()}
    total = sum(params.values())
    decoder_linear = sum(i * o for n, (i, o) in lora_targets(model, "all-linear").items())
    elt = _bytes(precision)
    q = cfg.quantization
    if q == "4bit":
        weights = decoder_linear * 0.53 + (total - decoder_linear) * 2    # nf4 + double-quant scales
    elif q == "8bit":
        weights = decoder_linear * 1.0 + (total - decoder_linear) * 2
    else:
        weights = total * elt
    targets = lora_targets(model, cfg.target_modules)
    lora = sum(cfg.lora_r * (i + o) for i, o in targets.values())
    tokens = cfg.local_batch_size * cfg.max_length
    act_elt = 2 if (q or precision != "fp32") else 4
    act_full = tokens * layers * (12 * hidden + 6 * inter) * act_elt
    act_ckpt = tokens * layers * hidden * act_elt + tokens * (12 * hidden + 6 * inter) * act_elt
    logits_full = tokens * vocab * 4
    tile = min(tokens, TILE_TOKENS) * min(vocab, TILE_VOCAB) * 4 * 2     # a tile and its gradient
    rows = {
        f"weights ({q or precision}, {total / 1e6:,.1f} M parameters)": weights / GiB,
        f"LoRA weights + grads + AdamW ({lora / 1e6:,.2f} M parameters, fp32)": lora * 16 / GiB,
        f"activations, {'with' if cfg.gradient_checkpointing else 'without'} gradient checkpointing "
        f"({cfg.local_batch_size} x {cfg.max_length} tokens)": (act_ckpt if cfg.gradient_checkpointing else act_full) / GiB,
        "loss: chunked log-prob tiles (full logits never built)": tile / GiB,
    }
    plan = MemoryPlan(device=device, device_gib=device_gib, rows=rows)
    plan.total_gib = sum(rows.values()) * 1.1      # allocator overhead, buffers
    plan.notes.append(f"activations {'without' if cfg.gradient_checkpointing else 'with'} gradient checkpointing "
                      f"would be {(act_full if cfg.gradient_checkpointing else act_ckpt) / GiB:.3f} GiB")
    plan.notes.append(f"a full fp32 logits tensor of this batch ({tokens:,} tokens x {vocab:,} vocabulary) would "
                      f"be {logits_full / GiB:.3f} GiB")
    if device_gib is not None:
        plan.fits = plan.total_gib <= device_gib * HEADROOM
        if not plan.fits:
            plan.advice = _advice(plan, rows, weights, act_full, act_ckpt, cfg, device, decoder_linear, total,
                                  device_gib)
    return plan


def _advice(plan, rows, weights, act_full, act_ckpt, cfg, device, decoder_linear, total, device_gib) -> list[str]:
    budget = device_gib * HEADROOM / 1.1 * GiB
    other = sum(rows.values()) * GiB
    act_now = act_ckpt if cfg.gradient_checkpointing else act_full
    out = []
    if not cfg.gradient_checkpointing and other - act_full + act_ckpt <= budget:
        out.append("gradient_checkpointing: true")
    if device == "cuda" and not cfg.quantization:
        w4 = decoder_linear * 0.53 + (total - decoder_linear) * 2
        if other - weights + w4 - act_now + act_ckpt <= budget:
            out.append("quantization: 4bit" + ("" if cfg.gradient_checkpointing else " with gradient_checkpointing: true"))
    for bs in range(cfg.local_batch_size - 1, 0, -1):
        if other - act_now + act_now * bs / cfg.local_batch_size <= budget:
            out.append(f"local_batch_size: {bs} (grad_accum x{-(-cfg.local_batch_size // bs)} keeps the batch)")
            break
    return out


def device_memory_gib(device: str, device_map: Any = None) -> float | None:
    """Free memory of this process's GPU (all GPUs with device_map 'auto'), or available RAM on a CPU."""
    try:
        if device == "cuda":
            import torch
            if device_map == "auto":
                return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())) / GiB
            return torch.cuda.mem_get_info()[0] / GiB
        import psutil
        return psutil.virtual_memory().available / GiB
    except Exception:
        return None

"""The one precision rule for every local model (training, generation, the server, the score regressor):
bf16 on a GPU that has it, else fp16 on a GPU, fp32 on the CPU — unless the user names one."""
from __future__ import annotations

from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def pick_device(device: str | None = None) -> str:
    """"cuda" when a GPU is visible and none is named; a named CUDA device without a GPU is an error."""
    import torch
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible: use device='cpu' (or None for automatic)")
    return device


def choose_precision(device: str, precision: str | None = "auto") -> str:
    """"fp32" | "bf16" | "fp16" for `device`; "auto" applies the rule above."""
    precision = _ALIASES.get(str(precision), precision) if precision is not None else "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        import torch
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def torch_dtype(precision: str) -> Any:
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[_ALIASES.get(precision, precision)]


def device_and_dtype(device: str | None = None, dtype: Any = "auto") -> tuple[str, Any]:
    """("cuda" | "cpu", torch dtype) by the rule above; `dtype` may also be a torch dtype, used as is."""
    device = pick_device(device)
    if dtype is not None and not isinstance(dtype, str):
        return device, dtype
    try:
        return device, torch_dtype(choose_precision(device, dtype))
    except ValueError:
        raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}") from None

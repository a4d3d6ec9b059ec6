"""One precision rule for training, generation, the server and the score regressor."""
import pytest
import torch

from kokoro_helpers.local.precision import choose_precision, device_and_dtype, torch_dtype


def test_auto_is_fp32_on_the_cpu_and_a_named_precision_is_kept():
    assert choose_precision("cpu") == "fp32"
    assert choose_precision("cpu", "bf16") == "bf16"
    assert choose_precision("cuda", "float16") == "fp16"
    assert torch_dtype("bf16") is torch.bfloat16


def test_auto_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("cuda") == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("cuda:1") == "bf16"


def test_bad_names_are_errors_that_list_the_choices():
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        choose_precision("cpu", "int8")
    with pytest.raises(ValueError, match="dtype must be auto, fp32, bf16 or fp16"):
        device_and_dtype("cpu", "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is visible"):
            device_and_dtype("cuda")
    assert device_and_dtype("cpu", torch.float16) == ("cpu", torch.float16)

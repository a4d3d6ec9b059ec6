"""Load the pieces of a local model from disk — tokenizer, full model, LoRA adapter — each failure
turned into a :class:`~kokoro_helpers.local.sources.ModelLoadError` that says what to do."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kokoro_helpers.local.sources import (ADAPTER_WEIGHTS, BaseModelMismatchError, CorruptAdapterError,
                                          ModelNotFoundError, ModelSource, read_adapter_config)


@contextmanager
def quiet_loading():
    """transformers' loading bars and a peft/transformers deprecation note are not news to the user."""
    from kokoro_helpers.local.tiny_model import quiet_transformers

    with quiet_transformers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_tokenizer(path: str | Path):
    """The tokenizer in ``path`` (a pad token set when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load a tokenizer from {path} ({exc}); the adapter folder should hold "
                                 "the tokenizer files 02_finetune saved with it") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token           # decoder-only models often ship without a pad token
    return tok


def load_full_model(path: str, device: str, dtype: Any, what: str):
    """A full causal LM (folder or Hub id) on ``device`` in ``dtype``, in eval mode; ``what`` names it in errors."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load {what} {path!r} ({exc}). Without network a Hub model must already be in the Hugging "
            "Face cache (HF_HOME): download it where the Hub is reachable (`hf download <id>`), or pass a local "
            "folder.") from exc
    if not device.startswith("cuda"):
        model.to(device)
    model.eval()
    return model


def check_adapter_files(folder: Path) -> Path:
    """The adapter's weights file, its header read (a corrupt or truncated file fails here)."""
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise ModelNotFoundError(f"{folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): the training "
                                 "run did not finish writing it; re-run 02_finetune Part B")
    if weights.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise CorruptAdapterError(f"{weights} is corrupt or truncated ({exc}): copy the adapter folder again "
                                      "or re-run 02_finetune Part B to write it") from exc
        if not keys:
            raise CorruptAdapterError(f"{weights} holds no tensors: re-run 02_finetune Part B")
    return weights


def attach_adapter(model, folder: Path, adapter_name: str, base_label: str):
    """PeftModel.from_pretrained / load_adapter with the failure modes turned into clear errors."""
    from peft import PeftModel

    read_adapter_config(folder)
    check_adapter_files(folder)
    try:
        with quiet_loading():
            if hasattr(model, "peft_config"):
                model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=False)
                return model
            return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        text = str(exc)
        detail = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln), text.splitlines()[0] if text else "")
        if "size mismatch" in text or "not found in the base model" in text or "Target module" in text \
                or "target_modules" in text:
            raise BaseModelMismatchError(
                f"the adapter {folder} does not fit the base {base_label}: {detail[:300].rstrip('.')}. It was "
                "trained on another base model: load it with the base recorded in its card / adapter_config.json "
                "(leave base_model unset)") from exc
        raise CorruptAdapterError(f"could not load the adapter {folder} ({text.splitlines()[0][:300] if text else exc!r}): "
                                  "copy the folder again or re-run 02_finetune Part B") from exc
    except Exception as exc:
        if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError", "EOFError"):
            raise CorruptAdapterError(f"the adapter {folder} is corrupt ({exc}): copy the folder again or re-run "
                                      "02_finetune Part B") from exc
        raise


def check_vocab(model, tokenizer, where: str) -> None:
    """A tokenizer with more entries than the model's embedding belongs to another base."""
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    if n is not None and len(tokenizer) > n:
        raise BaseModelMismatchError(
            f"the tokenizer of {where} has {len(tokenizer)} entries but the model's embedding only {n}: the tokenizer "
            "and the base model do not belong together (wrong base_model?)")


def put_adapter(model, src: ModelSource, adapter_name: str, base_label: str):
    """``(model with the adapter of src attached, in eval mode; the adapter's tokenizer)``."""
    tokenizer = load_tokenizer(src.tokenizer_dir)
    model = attach_adapter(model, src.adapter_dir, adapter_name, base_label)
    model.eval()
    check_vocab(model, tokenizer, str(src.adapter_dir))
    return model, tokenizer


def load_adapted(src: ModelSource, device: str, dtype: Any, adapter_name: str):
    """The base of an adapter source loaded with the adapter on it: ``(model, the adapter's tokenizer)``."""
    read_adapter_config(src.adapter_dir)          # fail on a broken adapter before loading a big base
    check_adapter_files(src.adapter_dir)
    model = load_full_model(src.model_path, device, dtype, "the base model")
    return put_adapter(model, src, adapter_name, src.model_path)

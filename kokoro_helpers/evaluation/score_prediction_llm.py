"""Score prediction with a fine-tuned LLM regressor: a causal LM's sequence-classification head
(one output per target: the overall score and the 20 criteria, each scaled to 0..1) trained with
LoRA (peft, task SEQ_CLS: the head itself is trained in full) by transformers' Trainer, MSE loss.

    plan = llm_plan("Qwen/Qwen2.5-0.5B-Instruct", mode="auto")     # train on a GPU; skip on a CPU
    pred = fit_llm_regressor(train_sessions, plan.base_model)
    report = score_prediction.evaluate_predictor(pred, sessions)     # the same figures as the baseline
    save_llm_predictor(pred, run_dir, report)                        # run_dir/eval/score_predictor_llm/

A session longer than `max_length` tokens keeps its **last** `max_length` tokens (left truncation:
the closing of a session says most about how it went); the number truncated is in `info`. On a
CPU only the embedded tiny model trains (a smoke test of the machinery, labelled as such).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kokoro_helpers.cards import now_iso
from kokoro_helpers.jsonio import write_json_atomic
from kokoro_helpers.paths import resolve
from kokoro_helpers.evaluation.score_prediction import RatesTexts
from kokoro_helpers.evaluation.sessions import SCORE_MAX, TARGETS, Session


@dataclass
class LLMPlan:
    action: str                 # train | skip
    base_model: str
    reason: str
    device: str = "cpu"

    def describe(self) -> str:
        return (f"LLM score regressor: SKIPPED - {self.reason}" if self.action == "skip"
                else f"LLM score regressor: training {self.base_model} on {self.device} - {self.reason}")


def llm_plan(base_model: str | None, mode: str = "auto") -> LLMPlan:
    """auto: train on a GPU; on a CPU only the embedded tiny model (a smoke test) | train | off."""
    from kokoro_helpers.local.tiny_model import is_embedded
    try:
        import torch
        gpu = bool(torch.cuda.is_available())
    except ImportError:
        gpu = False
    device = "cuda" if gpu else "cpu"
    if mode == "off" or not base_model:
        return LLMPlan("skip", str(base_model), "score_llm is off" if mode == "off" else "no base model named")
    if mode == "train":
        return LLMPlan("train", base_model, "asked for (score_llm: train)", device)
    if mode != "auto":
        raise ValueError(f"score_llm must be auto | train | off, got {mode!r}")
    if gpu:
        return LLMPlan("train", base_model, "a GPU is available", device)
    if is_embedded(base_model):
        return LLMPlan("train", base_model, "the embedded tiny model on the CPU: a smoke test, its figures mean nothing",
                       device)
    return LLMPlan("skip", base_model, f"{base_model} needs a GPU (none here); the TF-IDF baseline above stands. "
                                       f"Set score_llm: train to force it on the CPU", device)


@dataclass
class LLMScorePredictor(RatesTexts):
    model: Any
    tokenizer: Any
    targets: list[str]
    train_means: dict[str, float]
    max_length: int
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> dict[str, None]:          # the targets it predicts (as ScorePredictor.models)
        return {t: None for t in self.targets}

    def predict(self, texts: Sequence[str], batch_size: int = 8) -> dict[str, list[float]]:
        import torch
        self.model.eval()
        device = next(self.model.parameters()).device
        out: dict[str, list[float]] = {t: [] for t in self.targets}
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt").to(device)
                logits = self.model(**enc).logits.float().clamp(0, 1).cpu()
                for k, t in enumerate(self.targets):
                    out[t] += [float(v) * SCORE_MAX[t] for v in logits[:, k]]
        return out



class _Rows:
    def __init__(self, enc: Mapping[str, list], labels: list[list[float]]):
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def fit_llm_regressor(train: Sequence[Session], base_model: str, *, targets: Sequence[str] = TARGETS,
                      lora_r: int = 8, lora_alpha: int = 16, target_modules: Any = "all-linear",
                      epochs: float = 2, learning_rate: float = 2e-4, batch_size: int = 4, grad_accum: int = 1,
                      max_length: int = 2048, seed: int = 42, output_dir: str | Path | None = None,
                      progress: bool = False) -> LLMScorePredictor:
    """LoRA + a regression head on `base_model` (Hub id, local folder, or embedded:tiny), fitted on
    `train` sessions. Targets are scaled to 0..1; a missing rating is the train mean."""
    import tempfile

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from kokoro_helpers.local.tiny_model import quiet_transformers, resolve_base_model
    from kokoro_helpers.local.precision import choose_precision, torch_dtype

    train = list(train)
    targets = list(targets)
    if len(train) < 5:
        from kokoro_helpers.evaluation.score_prediction import PredictionError
        raise PredictionError(f"the LLM regressor needs at least 5 train sessions, got {len(train)}")
    set_seed(seed)
    source = resolve_base_model(base_model, progress=progress)
    tok = AutoTokenizer.from_pretrained(source)
    tok.truncation_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gpu = torch.cuda.is_available()
    # fp16 has no loss scaling in this plain Trainer set-up, so a GPU without bf16 trains in fp32
    precision = choose_precision("cuda" if gpu else "cpu")
    dtype = torch_dtype(precision if precision != "fp16" else "fp32")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(targets),
                                                                   problem_type="regression", dtype=dtype)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=lora_alpha,
                                             lora_dropout=0.0, target_modules=target_modules))
    means = {t: float(sum(s.ratings[t] for s in train if s.ratings.get(t) is not None)
                      / max(1, sum(1 for s in train if s.ratings.get(t) is not None))) for t in targets}
    labels = [[(s.ratings.get(t) if s.ratings.get(t) is not None else means[t]) / SCORE_MAX[t] for t in targets]
              for s in train]
    full = tok([s.text for s in train], truncation=False)["input_ids"]
    truncated = sum(1 for ids in full if len(ids) > max_length)
    enc = tok([s.text for s in train], truncation=True, max_length=max_length)
    workdir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="score-llm-"))
    args = TrainingArguments(output_dir=str(workdir), per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=grad_accum, num_train_epochs=epochs,
                             learning_rate=learning_rate, lr_scheduler_type="linear",
                             logging_strategy="epoch", save_strategy="no", report_to=[], seed=seed,
                             bf16=dtype == torch.bfloat16, use_cpu=not gpu, disable_tqdm=not progress,
                             remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(enc, labels),
                      data_collator=DataCollatorWithPadding(tok))
    with quiet_transformers():
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {"base_model": base_model, "train_sessions": len(train), "lora_r": lora_r, "lora_alpha": lora_alpha,
            "epochs": epochs, "learning_rate": learning_rate, "max_length": max_length,
            "truncated_sessions": truncated, "truncation": "left (the last max_length tokens are kept)",
            "train_loss": float(result.training_loss), "loss_per_epoch": losses,
            "device": "cuda" if gpu else "cpu", "dtype": str(dtype).replace("torch.", "")}
    name = f"lora-seqcls:{base_model}"
    return LLMScorePredictor(model, tok, targets, means, max_length, name, info)


def save_llm_predictor(pred: LLMScorePredictor, run_dir: str | Path, report: Mapping[str, Any] | None = None) -> Path:
    """run_dir/eval/score_predictor_llm/: the LoRA adapter and head (peft's save_pretrained), the
    tokenizer, and card.json with the training settings and the test figures."""
    folder = resolve(run_dir) / "eval" / "score_predictor_llm"
    folder.mkdir(parents=True, exist_ok=True)
    pred.model.save_pretrained(str(folder))
    pred.tokenizer.save_pretrained(str(folder))
    test = {t: by.get("test") for t, by in (report or {}).items() if by.get("test")}

    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, Mapping):
            return {k: clean(x) for k, x in v.items()}
        return v

    write_json_atomic(folder / "card.json", clean({
        "model_id": pred.name, "kind": "score_predictor_llm", "timestamp": now_iso(),
        "base_model": pred.info.get("base_model"), "targets": pred.targets, "train_means": pred.train_means,
        "target_scale": {t: SCORE_MAX[t] for t in pred.targets}, "training_params": pred.info,
        "evaluation_results": {"test": test},
        "usage_instructions": "peft.AutoPeftModelForSequenceClassification.from_pretrained(folder); outputs "
                              "are each target / its maximum (score 100, criteria 5), clipped to 0..1"}))
    return folder

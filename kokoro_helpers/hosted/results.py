"""What a finished OpenAI fine-tuning job shows: the result file's metrics (summarised for the card,
or as a table), the card's key facts, and the loss curve."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from kokoro_helpers import cards
from kokoro_helpers.hosted.errors import OpenAIFTError
from kokoro_helpers.hosted.preflight import fmt_usd
from kokoro_helpers.paths import resolve


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def summarize_metrics(path: str | Path) -> dict[str, Any]:
    """Steps and the last value of each loss column of a result CSV."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, Any] = {"steps": len(rows)}
    for col in ("train_loss", "valid_loss", "full_valid_loss", "train_mean_token_accuracy",
                "valid_mean_token_accuracy", "full_valid_mean_token_accuracy", "train_accuracy"):
        values = [v for v in (_float(r.get(col)) for r in rows) if v is not None]
        if values:
            out[f"final_{col}"] = values[-1]
    return out


def card_summary(card: dict[str, Any]):
    """The card's key facts as a one-column table (what the notebook shows after a job)."""
    import pandas as pd
    params = card.get("training_params") or {}
    metrics = card.get("training_metrics") or {}
    est, actual = card.get("estimate") or {}, card.get("actual_cost") or {}
    rows = {
        "model_id": card.get("model_id"), "job_id": card.get("job_id"), "status": card.get("status"),
        "base_model": card.get("base_model"), "epochs": params.get("epochs"), "batch_size": params.get("batch_size"),
        "learning_rate_multiplier": params.get("learning_rate_multiplier"),
        "trained_tokens": card.get("trained_tokens"),
        "estimated cost (USD)": f"{fmt_usd(est['usd'])} ({'estimate' if est.get('is_estimate') else 'computed'})"
        if "usd" in est else None,
        "actual cost (USD)": f"{fmt_usd(actual['usd'])} (trained_tokens × listed price)" if "usd" in actual else None,
        "provider": card.get("provider", "openai"),
        "final train loss": metrics.get("final_train_loss"),
        "final valid loss": metrics.get("final_valid_loss", metrics.get("final_full_valid_loss")),
        "checkpoints": len(card.get("checkpoints") or []),
    }
    return pd.DataFrame({"value": rows})


def _metrics_path(card_or_path: str | Path | dict[str, Any], run_dir: str | Path | None = None) -> Path:
    if isinstance(card_or_path, (str, Path)) and str(card_or_path).endswith(".csv"):
        return Path(card_or_path)
    if isinstance(card_or_path, dict):
        card, base = card_or_path, resolve(run_dir) if run_dir else None
    else:
        card, base = cards.load_card(card_or_path), Path(card_or_path).parent.parent
    rel = (card.get("training_metrics") or {}).get("metrics_file")
    if not rel or base is None:
        raise OpenAIFTError("no result-file metrics for this card yet (the job has not succeeded, "
                            "or pass run_dir=...)")
    return base / rel


def load_metrics(card_or_path: str | Path | dict[str, Any], run_dir: str | Path | None = None):
    """The result-file metrics as a DataFrame (step, train_loss, valid_loss, ...)."""
    import pandas as pd
    return pd.read_csv(_metrics_path(card_or_path, run_dir))


def plot_loss(card_or_path: str | Path | dict[str, Any], run_dir: str | Path | None = None, ax=None):
    """Training (and validation) loss per step from the job's result file; returns the figure."""
    import matplotlib.pyplot as plt
    df = load_metrics(card_or_path, run_dir)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    else:
        fig = ax.figure
    ax.plot(df["step"], df["train_loss"], label="train loss", lw=1, alpha=0.8)
    for col, style in (("valid_loss", "-"), ("full_valid_loss", "o")):
        if col in df and df[col].notna().any():
            d = df[df[col].notna()]
            ax.plot(d["step"], d[col], style, label=col.replace("_", " "), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("OpenAI fine-tuning: loss per step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

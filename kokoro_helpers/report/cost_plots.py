"""05_cost's figures (ASCII labels: no CJK font needed): training cost per base model beside the
local LoRA, the what-if lines by epochs and dataset size, and the cost of using a fine-tuned model."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import fmt_usd
from kokoro_helpers.report.inference_costs import DEFAULT_REPLIES


def plot_training(training: Mapping[str, costs.TrainingEstimate], local: Mapping[str, Any] | None = None):
    """Horizontal bars: training cost (USD) per priced base model at the chosen epochs, and the local
    LoRA's GPU cost for the same data and epochs when known. Returns the Figure."""
    import matplotlib.pyplot as plt
    names = list(training)
    values = [training[m].usd for m in names]
    colors = ["tab:blue"] * len(names)
    estimate = any(e.is_estimate for e in training.values())
    if local and local.get("available"):
        names.append(f"local LoRA ({local['device']})")
        values.append(local["usd"])
        colors.append("tab:green")
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.6))
    ax.barh(names, values, color=colors)
    for y, v in enumerate(values):
        ax.text(v, y, f" {fmt_usd(v)}", va="center", fontsize=9)
    ax.invert_yaxis()
    first = next(iter(training.values()))
    ax.set_xlabel(f"USD (prices as of {first.prices_as_of})")
    ax.set_title(f"Training cost at {first.epochs} epochs{' (estimate)' if estimate else ''}")
    ax.set_xlim(0, max(values) * 1.3 if values and max(values) > 0 else 1)
    fig.tight_layout()
    return fig


def plot_what_if(frame):
    """USD against epochs, one line per dataset size: OpenAI (solid) and local GPU (dashed). Log scale."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    numeric = frame[frame["epochs_setting"] != "auto"]
    for i, (name, group) in enumerate(numeric.groupby("dataset", sort=False)):
        color = f"C{i}"
        scaled = " (scaled)" if group["scaled"].iloc[0] else ""
        ax.plot(group["epochs"], group["openai_usd"], "o-", color=color, label=f"OpenAI, {name}{scaled}")
        if group["local_usd"].notna().any():
            ax.plot(group["epochs"], group["local_usd"], "s--", color=color, alpha=0.7, label=f"local GPU, {name}")
    ax.set_yscale("log")
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"USD (prices as of {frame.attrs.get('prices_as_of', '?')})")
    ax.set_title(f"Training cost by epochs and dataset size ({frame.attrs.get('base_model', '')}, estimate)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    return fig


def plot_inference(rows: Sequence[Mapping[str, Any]]):
    """Horizontal bars: USD per `replies` counseling replies, per fine-tuned model."""
    import matplotlib.pyplot as plt
    names = [r["model"] for r in rows]
    values = [r["per_replies"]["usd"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.6))
    ax.barh(names, values, color="tab:orange")
    for y, v in enumerate(values):
        ax.text(v, y, f" {fmt_usd(v)}", va="center", fontsize=9)
    ax.invert_yaxis()
    n = rows[0]["replies"] if rows else DEFAULT_REPLIES
    est = any(r["is_estimate"] for r in rows)
    ax.set_xlabel(f"USD per {n:,} replies (prices as of {rows[0]['prices_as_of'] if rows else '?'})")
    ax.set_title(f"Using a fine-tuned model{' (estimate)' if est else ''}")
    ax.set_xlim(0, max(values) * 1.3 if values and max(values) > 0 else 1)
    fig.tight_layout()
    return fig

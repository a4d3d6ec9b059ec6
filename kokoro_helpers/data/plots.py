"""The data step's figures (matplotlib). Labels in English so no CJK font is needed."""
from __future__ import annotations

from typing import Any

from kokoro_helpers.data.schema import TOPICS


def data_overview(frame, example_tokens: dict[str, list[int]], limit: int):
    """2×2: turns per dialogue, tokens per example (limit marked), topics, client scores."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    a = ax[0, 0]
    a.hist(frame["turns"], bins=20, color="#4c72b0")
    a.set(title="Speaker turns per dialogue (after merging)", xlabel="turns", ylabel="dialogues")
    a = ax[0, 1]
    tokens = [t for ts in example_tokens.values() for t in ts]
    a.hist(tokens, bins=20, color="#55a868")
    a.axvline(limit, color="#c44e52", linestyle="--", label=f"per-example limit {limit:,}")
    if max(tokens, default=0) < limit / 5:  # keep the bars readable; say where the limit is
        a.set_xlim(0, max(tokens, default=1) * 1.1)
        a.annotate(f"limit {limit:,} →", xy=(0.98, 0.92), xycoords="axes fraction", ha="right", color="#c44e52")
    a.set(title="Tokens per training example", xlabel="tokens", ylabel="examples")
    a.legend(loc="upper left")
    a = ax[1, 0]
    counts = frame["topic"].fillna("(none)").value_counts()
    order = [t for t in TOPICS if t in counts] + [t for t in counts.index if t not in TOPICS]
    a.barh(order[::-1], [counts[t] for t in order[::-1]], color="#8172b2")
    a.set(title="Main topic", xlabel="dialogues")
    a = ax[1, 1]
    scores = frame["score"].dropna()
    a.hist(scores, bins=range(0, 105, 5), color="#ccb974")
    a.axvline(70, color="gray", linestyle=":", label="High ≥70")
    a.axvline(99, color="#c44e52", linestyle=":", label="paper's test ≥99")
    a.set(title="Client's overall score", xlabel="score (0–100)", ylabel="dialogues")
    a.legend()
    fig.tight_layout()
    return fig


def split_table(result: Any):
    """Dialogues, examples and tokens per split as a DataFrame."""
    import pandas as pd
    s = result.stats
    label = "tokens (estimate)" if str(s["token_counter"]).startswith("estimate") else "tokens"
    return pd.DataFrame({"dialogues": s["splits"], "examples": s["examples"], label: s["tokens"]}).T

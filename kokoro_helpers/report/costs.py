"""Cost arithmetic shared by 02_finetune (pre-flight) and 05_cost: pure functions, no I/O.

OpenAI bills supervised fine-tuning by *trained tokens*: every training example's tokens, capped
at the per-example limit (longer examples are truncated), times the number of epochs. With
`n_epochs="auto"` OpenAI picks the epochs by its documented default heuristic (see
`auto_epochs`), so the epoch count is a prediction too. Results carry `is_estimate` and a label
that says why: a count from the token-count *estimate* (no o200k_base file offline) or an
"auto" epoch count is never presented as exact.

Prices are USD per 1M tokens (params/prices.yaml via kokoro_helpers.report.prices); JPY uses the dated
rate of that table.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

# OpenAI's default-epochs heuristic (its chat fine-tuning data-preparation guidance)
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100       # examples x epochs is raised to at least this
MAX_TARGET_EXAMPLES = 25_000    # ... and lowered to at most this
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25
PER_MILLION = 1_000_000


def is_auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def auto_epochs(n_examples: int) -> int:
    """OpenAI's default number of epochs for `n_examples` training examples: 3, raised so that
    examples x epochs >= 100 (ceil), lowered so that examples x epochs <= 25,000 (floor),
    bounded to 1..25. E.g. 10 -> 10, 40 -> 3, 9,000 -> 2, 20,000 -> 1, 3 -> 25.

    (The cookbook's snippet raises with a floor division, 100 // n, which can leave
    examples x epochs just under 100, e.g. 30 -> 3; this module uses the ceiling so the stated
    minimum holds: 30 -> 4. The two differ only for fewer than 34 examples.)"""
    n = int(n_examples)
    if n <= 0:
        raise ValueError("auto_epochs needs at least one training example")
    epochs = TARGET_EPOCHS
    if n * epochs < MIN_TARGET_EXAMPLES:
        epochs = min(MAX_DEFAULT_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / n))
    elif n * epochs > MAX_TARGET_EXAMPLES:
        epochs = max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n)
    return epochs


def resolve_epochs(n_epochs: Any, n_examples: int) -> tuple[int, bool]:
    """(epochs, from_heuristic): a given positive integer as is, or `auto_epochs` for "auto"/None."""
    if is_auto(n_epochs):
        return auto_epochs(n_examples), True
    if isinstance(n_epochs, bool) or not isinstance(n_epochs, (int, float)) or int(n_epochs) != n_epochs \
            or int(n_epochs) < 1:
        raise ValueError(f"n_epochs must be a positive integer or \"auto\", got {n_epochs!r}")
    return int(n_epochs), False


def capped_tokens(example_tokens: Iterable[int], limit: int | None) -> int:
    """Σ min(limit, tokens of each example): one epoch's billed tokens (no cap when limit is None)."""
    if limit is None:
        return sum(int(t) for t in example_tokens)
    return sum(min(int(limit), int(t)) for t in example_tokens)


def billed_tokens(example_tokens: Iterable[int], epochs: int, limit: int | None) -> int:
    """epochs × Σ min(limit, example tokens): what a training job is billed for."""
    return int(epochs) * capped_tokens(example_tokens, limit)


def usd(tokens: int | float, price_per_1m: float) -> float:
    """USD for `tokens` at `price_per_1m` USD per 1M tokens."""
    return float(tokens) * float(price_per_1m) / PER_MILLION


def to_jpy(usd_amount: float, jpy_per_usd: float) -> float:
    return float(usd_amount) * float(jpy_per_usd)


def _estimate_reasons(token_counter: str | None, epochs_from_heuristic: bool,
                      cap_unknown: bool = False) -> list[str]:
    reasons = []
    if token_counter and str(token_counter).startswith("estimate:"):
        reasons.append(f"token counts are an estimate ({token_counter})")
    if epochs_from_heuristic:
        reasons.append("epochs by OpenAI's 'auto' heuristic (OpenAI sets the actual number)")
    if cap_unknown:
        reasons.append("the per-example cap could not be applied exactly (only totals known, and an "
                       "example may exceed the limit): billed tokens are an upper bound")
    return reasons


@dataclass
class TrainingEstimate:
    """What a fine-tuning job will be billed, with where each number comes from."""

    base_model: str
    n_examples: int
    tokens_per_epoch: int            # Σ min(limit, example tokens)
    tokens_uncapped: int             # Σ example tokens
    capped_examples: int             # examples longer than the limit (truncated by OpenAI)
    max_tokens_per_example: int | None
    epochs: int
    epochs_from_heuristic: bool
    billed_tokens: int
    price_per_1m: float
    usd: float
    jpy_per_usd: float
    jpy: float
    token_counter: str | None = None
    prices_as_of: str | None = None
    fx_label: str | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def is_estimate(self) -> bool:
        return bool(self.reasons)

    @property
    def label(self) -> str:
        """"estimate (why)" or "computed (exact token counts, given epochs)"."""
        if self.is_estimate:
            return "estimate: " + "; ".join(self.reasons)
        return "computed from exact token counts and the given epochs (OpenAI bills its own trained_tokens)"

    @property
    def epochs_label(self) -> str:
        return f"{self.epochs} (auto: OpenAI's default heuristic)" if self.epochs_from_heuristic else str(self.epochs)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["is_estimate"] = self.is_estimate
        d["label"] = self.label
        return d


def estimate_training(example_tokens: Iterable[int], n_epochs: Any, price_per_1m: float,
                      jpy_per_usd: float, max_tokens_per_example: int | None = None,
                      base_model: str = "", token_counter: str | None = None,
                      prices_as_of: str | None = None, fx_label: str | None = None) -> TrainingEstimate:
    """The training bill from per-example token counts: epochs (given or "auto") × Σ min(limit, tokens)
    × price. `token_counter` (stats.json's name) makes the result an estimate when it starts with
    "estimate:"."""
    tokens = [int(t) for t in example_tokens]
    if not tokens:
        raise ValueError("no training examples to estimate")
    epochs, heuristic = resolve_epochs(n_epochs, len(tokens))
    per_epoch = capped_tokens(tokens, max_tokens_per_example)
    capped = sum(1 for t in tokens if max_tokens_per_example is not None and t > max_tokens_per_example)
    billed = epochs * per_epoch
    cost = usd(billed, price_per_1m)
    return TrainingEstimate(
        base_model=base_model, n_examples=len(tokens), tokens_per_epoch=per_epoch,
        tokens_uncapped=sum(tokens), capped_examples=capped, max_tokens_per_example=max_tokens_per_example,
        epochs=epochs, epochs_from_heuristic=heuristic, billed_tokens=billed, price_per_1m=float(price_per_1m),
        usd=cost, jpy_per_usd=float(jpy_per_usd), jpy=to_jpy(cost, jpy_per_usd), token_counter=token_counter,
        prices_as_of=prices_as_of, fx_label=fx_label, reasons=_estimate_reasons(token_counter, heuristic))


def estimate_training_from_totals(total_tokens: int, n_examples: int, n_epochs: Any, price_per_1m: float,
                                  jpy_per_usd: float, max_example_tokens_seen: int | None = None,
                                  max_tokens_per_example: int | None = None, base_model: str = "",
                                  token_counter: str | None = None, prices_as_of: str | None = None,
                                  fx_label: str | None = None) -> TrainingEstimate:
    """The same from totals (as `stats.json` keeps them): exact when no example exceeds the limit
    (`max_example_tokens_seen` <= limit — 01_data windows long dialogues so this is the normal
    case); otherwise the uncapped total is an upper bound and the label says so."""
    if n_examples <= 0:
        raise ValueError("no training examples to estimate")
    epochs, heuristic = resolve_epochs(n_epochs, n_examples)
    cap_unknown = (max_tokens_per_example is not None and
                   (max_example_tokens_seen is None or max_example_tokens_seen > max_tokens_per_example))
    per_epoch = int(total_tokens)
    if max_tokens_per_example is not None:
        per_epoch = min(per_epoch, n_examples * int(max_tokens_per_example))
    billed = epochs * per_epoch
    cost = usd(billed, price_per_1m)
    return TrainingEstimate(
        base_model=base_model, n_examples=int(n_examples), tokens_per_epoch=per_epoch,
        tokens_uncapped=int(total_tokens), capped_examples=-1 if cap_unknown else 0,
        max_tokens_per_example=max_tokens_per_example, epochs=epochs, epochs_from_heuristic=heuristic,
        billed_tokens=billed, price_per_1m=float(price_per_1m), usd=cost, jpy_per_usd=float(jpy_per_usd),
        jpy=to_jpy(cost, jpy_per_usd), token_counter=token_counter, prices_as_of=prices_as_of,
        fx_label=fx_label, reasons=_estimate_reasons(token_counter, heuristic, cap_unknown))


def estimate_from_stats(stats: Mapping[str, Any], n_epochs: Any, price_per_1m: float, jpy_per_usd: float,
                        split: str = "train", max_tokens_per_example: int | None = None,
                        base_model: str = "", prices_as_of: str | None = None,
                        fx_label: str | None = None) -> TrainingEstimate:
    """`estimate_training_from_totals` fed from 01_data's `stats.json` (tokens, examples,
    max_example_tokens_seen, token_counter); the limit defaults to stats' `max_example_tokens`."""
    try:
        total = int(stats["tokens"][split])
        n = int((stats.get("examples") or stats["splits"])[split])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"stats.json has no token total / example count for split {split!r}: "
                         "re-run 01_data") from exc
    limit = max_tokens_per_example if max_tokens_per_example is not None else stats.get("max_example_tokens")
    return estimate_training_from_totals(
        total, n, n_epochs, price_per_1m, jpy_per_usd, stats.get("max_example_tokens_seen"), limit,
        base_model=base_model, token_counter=stats.get("token_counter"), prices_as_of=prices_as_of,
        fx_label=fx_label)


@dataclass
class Cost:
    """A priced amount of tokens: USD and JPY, with what it is (`label`) and whether it is an estimate."""

    what: str
    tokens: int
    usd: float
    jpy: float
    is_estimate: bool
    label: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def actual_training_cost(trained_tokens: int, price_per_1m: float, jpy_per_usd: float,
                         prices_as_of: str | None = None) -> Cost:
    """A finished job's cost from the `trained_tokens` OpenAI reports, at the listed training price.
    Not an estimate of tokens; the price is the table's (dated), the JPY rate its dated assumption."""
    amount = usd(trained_tokens, price_per_1m)
    when = f" as of {prices_as_of}" if prices_as_of else ""
    return Cost(what="training (actual)", tokens=int(trained_tokens), usd=amount,
                jpy=to_jpy(amount, jpy_per_usd), is_estimate=False,
                label=f"actual: trained_tokens reported by OpenAI × ${price_per_1m:g}/1M (listed price{when})",
                detail={"price_per_1m": float(price_per_1m), "jpy_per_usd": float(jpy_per_usd)})


def inference_cost(input_tokens: int, output_tokens: int, prices: Mapping[str, Any], jpy_per_usd: float,
                   cached_input_tokens: int = 0, batch: bool = False, is_estimate: bool = False,
                   what: str = "inference") -> Cost:
    """Cost of using a fine-tuned model: input (less cached) + cached input + output tokens at the
    model's prices (a `PriceTable.entry`); `batch=True` uses its Batch API rates."""
    table: Mapping[str, Any] = prices
    if batch:
        if not prices.get("batch"):
            raise ValueError(f"no batch prices for {prices.get('model', 'this model')}")
        table = {**{k: prices[k] for k in ("input", "cached_input", "output")}, **prices["batch"]}
    cached = int(cached_input_tokens)
    fresh = int(input_tokens) - cached
    if fresh < 0:
        raise ValueError("cached_input_tokens cannot exceed input_tokens")
    amount = (usd(fresh, table["input"]) + usd(cached, table["cached_input"])
              + usd(output_tokens, table["output"]))
    tag = "estimate" if is_estimate else "computed"
    return Cost(what=what, tokens=int(input_tokens) + int(output_tokens), usd=amount,
                jpy=to_jpy(amount, jpy_per_usd), is_estimate=is_estimate,
                label=f"{tag}: {int(input_tokens):,} in ({cached:,} cached) + {int(output_tokens):,} out"
                      f"{' at Batch API rates' if batch else ''}",
                detail={"input_tokens": int(input_tokens), "cached_input_tokens": cached,
                        "output_tokens": int(output_tokens), "batch": batch})

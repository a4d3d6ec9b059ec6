"""The seeds' cost estimate (11.62 M tokens × 10 epochs at an inference input rate) beside the same
tokens and epochs at the dated fine-tuning training price, and what their token figure leaves out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import fmt_jpy, fmt_usd
from kokoro_helpers.report.cost_inputs import DEFAULT_BASE_MODEL
from kokoro_helpers.report.prices import PriceTable
from kokoro_helpers.report.what_if_costs import CORPUS_DIALOGUES


@dataclass(frozen=True)
class SeedsFigures:
    """The seeds' cost estimate, as they stated it."""

    tokens: int = 11_620_000          # the whole corpus, gpt-4o-mini tokens (a widely quoted rough figure)
    epochs: int = 10
    price_per_1m: float = 0.40        # an inference *input* rate, used for training
    training_jpy: float = 6_823
    inference_jpy: float = 1_091
    total_jpy: float = 7_914
    dialogues: int = CORPUS_DIALOGUES


SEEDS = SeedsFigures()

# The release's converted chat examples with message overhead, o200k_base, measured with the
# genuine encoding file (../shared/KOKOROCHAT.md): the quoted 11.62 M is the utterance text alone.
RELEASE_TOKENS_WITH_OVERHEAD = {"with system prompt": 13_814_682, "without": 13_544_533}


def seeds_comparison(prices: PriceTable, base_model: str = DEFAULT_BASE_MODEL,
                     seeds: SeedsFigures = SEEDS, stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The seeds' estimate (11.62 M tokens × 10 epochs at $0.40/1M) beside the same tokens and
    epochs at the training price of `base_model`. Their inference figure is carried over as stated
    (they give no workload to re-derive it from); the measured one is in the inference section."""
    entry = prices.entry(base_model)
    billed = seeds.tokens * seeds.epochs
    seeds_usd = costs.usd(billed, seeds.price_per_1m)
    implied_rate = seeds.training_jpy / seeds_usd
    corrected = costs.estimate_training_from_totals(
        seeds.tokens, seeds.dialogues, seeds.epochs, entry["training"], prices.jpy_per_usd,
        base_model=entry["model"], token_counter="estimate:the seeds' quoted 11.62 M tokens (a rough figure)",
        prices_as_of=prices.as_of, fx_label=prices.fx_label)
    total = corrected.jpy + seeds.inference_jpy
    ratio = entry["training"] / seeds.price_per_1m
    sentence = (f"The seeds priced {billed / 1e6:,.1f} M billed training tokens ({seeds.tokens / 1e6:.2f} M × "
                f"{seeds.epochs} epochs) at ${seeds.price_per_1m:.2f}/1M, an inference input rate, but OpenAI bills "
                f"fine-tuning training separately at ${entry['training']:.2f}/1M for {entry['model']} (as of "
                f"{prices.as_of}), {ratio:.1f} times as much: training is about {fmt_jpy(corrected.jpy)} "
                f"({fmt_usd(corrected.usd)}), not {fmt_jpy(seeds.training_jpy)}, and the total about "
                f"{fmt_jpy(total)}, not {fmt_jpy(seeds.total_jpy)}.")
    # the seeds' token figure was low too: it leaves out the message overhead OpenAI bills
    this_run = dict((stats or {}).get("tokens") or {})
    counter_name = str((stats or {}).get("token_counter") or "unknown counter")
    release = RELEASE_TOKENS_WITH_OVERHEAD
    tokens_sentence = (f"The quoted {seeds.tokens / 1e6:.2f} M tokens are the utterance text alone; with message "
                       f"overhead (3 + 1 role token per message, +3 per example) the release's examples are "
                       f"{release['with system prompt'] / 1e6:.2f} M o200k_base tokens "
                       f"({release['without'] / 1e6:.2f} M without a system prompt).")
    if this_run:
        tokens_sentence += (" This run's data: " + ", ".join(f"{k} {v:,}" for k, v in this_run.items())
                            + f" = {sum(this_run.values()):,} tokens ({counter_name}).")
    sentence += " " + tokens_sentence
    return {
        "tokens_with_overhead": {"quoted_text_only": seeds.tokens, "release_measured": dict(release),
                                 "this_run": this_run, "this_run_total": sum(this_run.values()),
                                 "token_counter": counter_name if this_run else None,
                                 "sentence": tokens_sentence},
        "seeds": {"tokens": seeds.tokens, "epochs": seeds.epochs, "billed_tokens": billed,
                  "price_per_1m": seeds.price_per_1m, "training_usd": seeds_usd,
                  "training_jpy": seeds.training_jpy, "implied_jpy_per_usd": implied_rate,
                  "inference_jpy": seeds.inference_jpy, "total_jpy": seeds.total_jpy},
        "corrected": {"base_model": entry["model"], "billed_tokens": corrected.billed_tokens,
                      "epochs": corrected.epochs, "price_per_1m": corrected.price_per_1m,
                      "training_usd": corrected.usd, "training_jpy": corrected.jpy,
                      "jpy_per_usd": prices.jpy_per_usd, "inference_jpy": seeds.inference_jpy,
                      "total_jpy": total, "is_estimate": True,
                      "label": "estimate: the seeds' rough token figure at the dated training price; their "
                               "inference figure carried over as stated"},
        "price_ratio": ratio,
        "prices_as_of": prices.as_of,
        "sentence": sentence,
    }


def seeds_table(cmp: Mapping[str, Any]):
    import pandas as pd
    s, c = cmp["seeds"], cmp["corrected"]
    rows = [
        ("tokens (whole corpus)", f"{s['tokens'] / 1e6:.2f} M", f"{s['tokens'] / 1e6:.2f} M", "the seeds' rough figure, kept"),
        *[(f"tokens with message overhead: {k}", "-", f"{v:,}", f"this run's data/stats.json "
           f"({cmp['tokens_with_overhead']['token_counter']})")
          for k, v in (cmp.get("tokens_with_overhead", {}).get("this_run") or {}).items()],
        *[(f"tokens with message overhead: release, {k}", "-", f"{v / 1e6:.2f} M",
           "measured with o200k_base: the quoted figure leaves out message overhead")
          for k, v in (cmp.get("tokens_with_overhead", {}).get("release_measured") or {}).items()],
        ("epochs", s["epochs"], c["epochs"], ""),
        ("billed training tokens", f"{s['billed_tokens']:,}", f"{c['billed_tokens']:,}", "epochs × tokens"),
        ("price per 1M training tokens", f"${s['price_per_1m']:.2f}", f"${c['price_per_1m']:.2f}",
         f"seeds: an inference input rate; corrected: fine-tuning training, {c['base_model']}, as of {cmp['prices_as_of']}"),
        ("training (USD)", fmt_usd(s["training_usd"]), fmt_usd(c["training_usd"]), ""),
        ("JPY per USD", f"{s['implied_jpy_per_usd']:.1f} (implied)", f"{c['jpy_per_usd']:g}",
         "seeds: implied by their own figures; corrected: the price table's dated assumption"),
        ("training (JPY)", fmt_jpy(s["training_jpy"]), fmt_jpy(c["training_jpy"]), ""),
        ("inference (JPY)", fmt_jpy(s["inference_jpy"]), fmt_jpy(c["inference_jpy"]),
         "carried over: the seeds give no workload (see the inference section for measured prices)"),
        ("total (JPY)", fmt_jpy(s["total_jpy"]), fmt_jpy(c["total_jpy"]), c["label"]),
    ]
    return pd.DataFrame(rows, columns=["item", "seeds", "corrected", "note"]).set_index("item")

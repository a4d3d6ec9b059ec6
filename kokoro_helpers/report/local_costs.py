"""05_cost's local LoRA cost: GPU hours to train on the same data, from the tokens/s 02 measured (or
an assumed throughput), × the GPU price; and the device that throughput was measured on."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import fmt_jpy, fmt_usd
from kokoro_helpers.report.cost_inputs import CostInputs

SECONDS_PER_HOUR = 3_600


def _str(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def device_label(card: Mapping[str, Any]) -> tuple[str, bool]:
    """(label, named): the device a local card's throughput was measured on — its recorded device
    name when the card has one, else "CPU" / "GPU (model not recorded)", with " (embedded smoke
    model)" for the package's tiny model."""
    params = card.get("training_params") or {}
    metrics = card.get("training_metrics") or {}
    name = None
    for source in (card, params, metrics):
        name = name or _str(source.get("device_name"))
    device = None
    for source in (card, params, metrics):
        device = device or _str(source.get("device"))
    if name:
        label, named = name, True
    elif device and device.lower().startswith("cpu"):
        label, named = "CPU", True
    elif device and device.lower().startswith(("cuda", "gpu")):
        label, named = "GPU (model not recorded)", False
    else:
        label, named = "unknown device", False
    world = params.get("world_size")
    if isinstance(world, int) and world > 1:
        label += f" x{world}"
    if card.get("smoke_model") or str(card.get("base_model", "")).startswith("embedded:"):
        label += " (embedded smoke model)"
    return label, named


def _local_card(inputs: CostInputs) -> tuple[Path, dict[str, Any]] | None:
    for path, card in inputs.local_cards:       # newest first
        if (card.get("training_metrics") or {}).get("train_tokens_per_s"):
            return path, card
    return None


def local_costs(inputs: CostInputs, epochs: int, gpu_hourly_usd: float | None = None,
                tokens_per_s: float | None = None) -> dict[str, Any]:
    """GPU hours to train the local LoRA on the same data for `epochs` epochs: tokens per epoch (the
    local tokenizer's count from the card, else stats.json's) × epochs ÷ the tokens/s 02 measured
    (or `tokens_per_s`, an assumption), × the number of processes, × the GPU price (`gpu_hourly_usd`
    or the price table's). Always an estimate: the label names the device it was measured on."""
    table = inputs.prices
    price = float(gpu_hourly_usd) if gpu_hourly_usd is not None else table.gpu_hourly_usd
    price_label = (f"${price:.2f}/GPU-hour (parameter gpu_hourly_usd)" if gpu_hourly_usd is not None
                   else table.gpu_label)
    found = _local_card(inputs)
    if found is None and tokens_per_s is None:
        return {"available": False, "is_estimate": True,
                "reason": "no local LoRA card with a measured tokens/s in run_dir/models (02 Part B has not "
                          "trained): set local_tokens_per_s to price an assumed throughput"}
    if price is None:
        return {"available": False, "is_estimate": True,
                "reason": "no GPU price: set gpu_hourly_usd or local.gpu_hourly_usd in the price table"}
    stats = inputs.stats
    o200k_per_epoch = int(stats["tokens"]["train"])
    out: dict[str, Any] = {"available": True, "is_estimate": True, "epochs": int(epochs),
                           "gpu_hourly_usd": price, "gpu_price_label": price_label}
    reasons = []
    world = 1
    if found is not None:
        path, card = found
        metrics = card.get("training_metrics") or {}
        params = card.get("training_params") or {}
        world = int(params.get("world_size") or 1)
        label, named = device_label(card)
        local_tokens = ((card.get("training_data") or {}).get("train") or {}).get("tokens")
        out.update(card=path.name, model_id=card.get("model_id"), base_model=card.get("base_model"),
                   smoke_model=bool(card.get("smoke_model")), device=label, device_named=named,
                   world_size=world)
        measured_tps = float(metrics["train_tokens_per_s"])
        wall = metrics.get("wall_s")
        if wall:
            hours = float(wall) / SECONDS_PER_HOUR * world
            out["measured_run"] = {"wall_s": float(wall), "gpu_hours": hours, "usd": hours * price,
                                   "jpy": costs.to_jpy(hours * price, table.jpy_per_usd),
                                   "epochs": metrics.get("epochs") or params.get("epochs"),
                                   "label": f"this run's own training, measured wall time on {label}"}
    else:
        measured_tps, local_tokens = None, None
        out.update(device="assumed (parameter local_tokens_per_s)", device_named=False, world_size=1)
    if tokens_per_s is not None:
        out["tokens_per_s"] = float(tokens_per_s)
        out["tokens_per_s_source"] = "parameter local_tokens_per_s (an assumption)"
        reasons.append("throughput assumed (parameter local_tokens_per_s)")
    else:
        out["tokens_per_s"] = measured_tps
        out["tokens_per_s_source"] = f"measured by 02 on {out['device']} (training steps, non-padding tokens)"
        reasons.append(f"throughput measured on {out['device']}")
        if out.get("smoke_model") or out["device"].startswith("CPU"):
            reasons.append("a CPU / smoke-model throughput says nothing about a real model on a GPU: "
                           "the figure shows the arithmetic only — measure on the target GPU")
    if local_tokens:
        out["tokens_per_epoch"] = int(local_tokens)
        out["tokens_source"] = "the local tokenizer's count of train.jsonl (card training_data.train.tokens)"
    else:
        out["tokens_per_epoch"] = o200k_per_epoch
        out["tokens_source"] = f"data/stats.json training tokens ({inputs.token_counter}) as a proxy"
        reasons.append("token count of another tokenizer used as a proxy")
    out["local_tokens_per_stats_token"] = out["tokens_per_epoch"] / o200k_per_epoch if o200k_per_epoch else 1.0
    train_tokens = out["tokens_per_epoch"] * int(epochs)
    hours = train_tokens / out["tokens_per_s"] / SECONDS_PER_HOUR if out["tokens_per_s"] else float("nan")
    out.update(train_tokens=train_tokens, hours=hours, gpu_hours=hours * world, usd=hours * world * price,
               jpy=costs.to_jpy(hours * world * price, table.jpy_per_usd))
    reasons.append("training steps only (model loading and evaluation excluded)")
    if str(price_label).endswith("(assumption)"):
        reasons.append("GPU price is an assumption")
    out["reasons"] = reasons
    out["label"] = "estimate: " + "; ".join(reasons)
    return out


def local_table(local: Mapping[str, Any]):
    import pandas as pd
    if not local.get("available"):
        return pd.DataFrame({"note": [local.get("reason", "no local estimate")]})
    rows = [("adapter", local.get("model_id", "-"), f"base {local.get('base_model', '-')}"),
            ("measured on", local["device"], local.get("card", "")),
            ("throughput", f"{local['tokens_per_s']:,.0f} tokens/s", local["tokens_per_s_source"]),
            ("tokens per epoch", f"{local['tokens_per_epoch']:,}", local["tokens_source"]),
            ("epochs", local["epochs"], "the same as the OpenAI estimate"),
            ("GPU hours", f"{local['gpu_hours']:,.4g}", f"× {local.get('world_size', 1)} process(es)"),
            ("GPU price", f"${local['gpu_hourly_usd']:.2f}/h", local["gpu_price_label"]),
            ("cost (USD)", fmt_usd(local["usd"]), "estimate"),
            ("cost (JPY)", fmt_jpy(local["jpy"]), "estimate"),
            ("label", "estimate", local["label"])]
    run = local.get("measured_run")
    if run:
        rows.insert(6, ("this run (measured wall time)", f"{run['wall_s']:,.1f} s = {fmt_usd(run['usd'])}",
                        f"{run['label']}, priced at the GPU rate"))
    return pd.DataFrame(rows, columns=["item", "value", "note"]).set_index("item")

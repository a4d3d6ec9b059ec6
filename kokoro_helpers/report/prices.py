"""The dated price table (params/prices.yaml): load, validate, look up, and the service window.

Every price has a source and a date; the JPY rate and the GPU hourly price are labelled
assumptions. `PriceTable.entry("ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc")` finds the
base model's prices for a fine-tuned id. `service_window_warning(model)` says when OpenAI's
reported wind-down dates of self-serve fine-tuning are past or near (within 60 days), and
points at the durable alternative, the local LoRA path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from kokoro_helpers.paths import resolve

DEFAULT_PRICES_FILE = "params/prices.yaml"
WARN_DAYS = 60
PRICE_KEYS = ("training", "input", "cached_input", "output")
BATCH_KEYS = ("input", "cached_input", "output")
LOCAL_ALTERNATIVE = ("The local LoRA path (Part B of 02_finetune, served by 04) is the durable "
                     "alternative: its adapters are files you keep, with no service window.")


class PriceError(ValueError):
    """A missing or malformed price table, or a model it does not price; the message says what to fix."""


def base_model_of(model_id: str) -> str:
    """The base model of a model id: `ft:gpt-4o-mini-2024-07-18:org:suffix:abc` -> `gpt-4o-mini-2024-07-18`
    (checkpoint ids `...:ckpt-step-88` too); any other id is returned unchanged."""
    model_id = str(model_id).strip()
    if model_id.startswith("ft:"):
        parts = model_id.split(":")
        if len(parts) >= 2 and parts[1]:
            return parts[1]
    return model_id


def _as_date(value: Any, where: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise PriceError(f"{where}: {value!r} is not a date (write it as \"YYYY-MM-DD\")") from None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise PriceError(f"{where} must be a non-negative number (USD per 1M tokens), got {value!r}")
    return float(value)


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping or mapping[key] in (None, ""):
        raise PriceError(f"{where}: missing `{key}`")
    return mapping[key]


def _validate_section(section: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    """One provider's block: source, as_of and models{name: {price: number}} (+ batch, note)."""
    if not isinstance(section, dict):
        raise PriceError(f"{where} must be a mapping")
    for key in ("source", "as_of"):
        _require(section, key, where)
    models = _require(section, "models", where)
    if not isinstance(models, dict) or not models:
        raise PriceError(f"{where}.models must map base-model names to their prices")
    allowed = set(required) | set(optional) | {"batch", "note"}
    for name, entry in models.items():
        at = f"{where}.models.{name}"
        if not isinstance(entry, dict):
            raise PriceError(f"{at} must be a mapping of {required + optional}")
        for key in required:
            _number(_require(entry, key, at), f"{at}.{key}")
        for key in optional:
            if key in entry:
                _number(entry[key], f"{at}.{key}")
        unknown = set(entry) - allowed
        if unknown:
            raise PriceError(f"{at}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
        if "batch" in entry:
            batch = entry["batch"]
            if not isinstance(batch, dict) or set(batch) - set(BATCH_KEYS):
                raise PriceError(f"{at}.batch must map some of {BATCH_KEYS} to prices")
            for key, value in batch.items():
                _number(value, f"{at}.batch.{key}")


def validate_prices(raw: Any, origin: str = "prices") -> None:
    """Raise PriceError naming the first problem of a price table (see params/prices.yaml)."""
    if not isinstance(raw, dict):
        raise PriceError(f"{origin}: the price table must be a YAML mapping")
    _validate_section(_require(raw, "openai", origin), f"{origin}: openai", required=PRICE_KEYS, optional=())
    if raw.get("azure") is not None:   # Azure: per-token prices where published, plus hosting per hour
        _validate_section(raw["azure"], f"{origin}: azure", required=("training",),
                          optional=("input", "cached_input", "output", "hosting_per_hour"))
    fx = _require(raw, "exchange_rate", origin)
    rate = _number(_require(fx, "jpy_per_usd", f"{origin}: exchange_rate"), f"{origin}: exchange_rate.jpy_per_usd")
    if rate <= 0:
        raise PriceError(f"{origin}: exchange_rate.jpy_per_usd must be positive")
    _require(fx, "as_of", f"{origin}: exchange_rate")
    local = raw.get("local")
    if local is not None:
        _number(_require(local, "gpu_hourly_usd", f"{origin}: local"), f"{origin}: local.gpu_hourly_usd")
    sw = raw.get("service_window")
    if sw is not None:
        where = f"{origin}: service_window"
        _require(sw, "source", where)
        _require(sw, "status", where)
        if sw.get("no_new_jobs_after") is not None:
            _as_date(sw["no_new_jobs_after"], f"{where}.no_new_jobs_after")
        retirements = sw.get("retirements") or {}
        if not isinstance(retirements, dict):
            raise PriceError(f"{where}.retirements must map model names to dates")
        for name, value in retirements.items():
            _as_date(value, f"{where}.retirements.{name}")


@dataclass
class ServiceWindow:
    """The reported service-window dates for one model, relative to `today`."""

    model: str
    base_model: str
    today: date
    no_new_jobs_after: date | None
    retires_on: date | None
    status: str                       # "reported"
    source: str
    warn_days: int = WARN_DAYS
    messages: list[str] = field(default_factory=list)

    @property
    def warn(self) -> bool:
        return bool(self.messages)

    def warning(self) -> str | None:
        """One paragraph: what is past or near, the source, the local alternative; None if nothing is."""
        if not self.messages:
            return None
        return (f"⚠ Service window ({self.status}: {self.source}): " + " ".join(self.messages)
                + " " + LOCAL_ALTERNATIVE)


@dataclass
class PriceTable:
    """A validated price table. `raw` is the YAML as read; `path` where it came from."""

    raw: dict[str, Any]
    path: Path | None = None

    # --- OpenAI ---
    @property
    def source(self) -> str:
        return str(self.raw["openai"]["source"])

    @property
    def as_of(self) -> str:
        return str(self.raw["openai"]["as_of"])

    @property
    def models(self) -> list[str]:
        return list(self.raw["openai"]["models"])

    def resolve_model(self, model_id: str) -> str:
        """The priced base-model name of `model_id` (a base name, an `ft:` id, or an undated alias
        such as `gpt-4o-mini` when exactly one dated snapshot matches)."""
        base = base_model_of(model_id)
        models = self.raw["openai"]["models"]
        if base in models:
            return base
        dated = [m for m in models if re.fullmatch(re.escape(base) + r"-\d{4}-\d{2}-\d{2}", m)]
        if len(dated) == 1:
            return dated[0]
        where = f" in {self.path}" if self.path else ""
        raise PriceError(f"no prices for {model_id!r}{where}; priced base models: {', '.join(models)} "
                         f"(add an entry with its source and date)")

    def entry(self, model_id: str) -> dict[str, Any]:
        """The prices of a model (a copy) plus `model`, `source`, `as_of`."""
        name = self.resolve_model(model_id)
        entry = dict(self.raw["openai"]["models"][name])
        entry.update(model=name, source=self.source, as_of=self.as_of)
        return entry

    def training_price(self, model_id: str) -> float:
        """USD per 1M billed training tokens."""
        return float(self.entry(model_id)["training"])

    def for_provider(self, provider: str = "openai") -> "PriceTable":
        """The table as seen by `provider`: "openai" as is; "azure" with the `azure:` section's prices,
        source and date in the place of OpenAI's (exchange rate, local prices and the rest shared)."""
        if str(provider or "openai") == "openai":
            return self
        section = self.raw.get(str(provider))
        if not isinstance(section, dict) or not section.get("models"):
            raise PriceError(f"no `{provider}:` prices in {self.path or 'the price table'} (add them with source and date)")
        return PriceTable(raw={**self.raw, "openai": section, "provider": str(provider)}, path=self.path)

    # --- currency and local ---
    @property
    def jpy_per_usd(self) -> float:
        return float(self.raw["exchange_rate"]["jpy_per_usd"])

    @property
    def fx_as_of(self) -> str:
        return str(self.raw["exchange_rate"]["as_of"])

    @property
    def fx_label(self) -> str:
        fx = self.raw["exchange_rate"]
        tag = ", assumption" if fx.get("assumption") else ""
        return f"{self.jpy_per_usd:g} JPY/USD ({self.fx_as_of}{tag})"

    @property
    def gpu_hourly_usd(self) -> float | None:
        local = self.raw.get("local") or {}
        return float(local["gpu_hourly_usd"]) if "gpu_hourly_usd" in local else None

    @property
    def gpu_label(self) -> str:
        local = self.raw.get("local") or {}
        if "gpu_hourly_usd" not in local:
            return "no GPU price in the table"
        tag = " (assumption)" if local.get("assumption") else ""
        return f"${float(local['gpu_hourly_usd']):.2f}/GPU-hour{tag}"

    # --- service window ---
    def service_window(self, model_id: str, today: date | str | None = None,
                       warn_days: int = WARN_DAYS, new_jobs: bool = True) -> ServiceWindow:
        """The reported dates for `model_id` and the warnings due at `today` (default: today).
        `new_jobs`: also check the last day new fine-tuning jobs can be created (02 does; a
        notebook only *using* a fine-tuned model may pass False)."""
        today = _as_date(today, "today") if today is not None else date.today()
        sw = self.raw.get("service_window") or {}
        base = base_model_of(model_id)
        try:
            base = self.resolve_model(model_id)
        except PriceError:
            pass
        retirements = sw.get("retirements") or {}
        retires = _as_date(retirements[base], base) if base in retirements else None
        cutoff = _as_date(sw["no_new_jobs_after"], "no_new_jobs_after") if sw.get("no_new_jobs_after") else None
        window = ServiceWindow(model=str(model_id), base_model=base, today=today, no_new_jobs_after=cutoff,
                               retires_on=retires, status=str(sw.get("status", "reported")),
                               source=str(sw.get("source", "unknown source")), warn_days=warn_days)
        if retires is not None:
            days = (retires - today).days
            if days < 0:
                window.messages.append(f"{base} and its fine-tunes were reportedly retired on {retires} "
                                       f"({-days} days ago): jobs and requests on it will fail.")
            elif days <= warn_days:
                window.messages.append(f"{base} and its fine-tunes are reportedly retired on {retires}, "
                                       f"{days} days from {today}: evaluate and use them before then.")
        if new_jobs and cutoff is not None:
            days = (cutoff - today).days
            if days < 0:
                window.messages.append(f"OpenAI reportedly accepts no new fine-tuning jobs after {cutoff} "
                                       f"({-days} days ago).")
            elif days <= warn_days:
                window.messages.append(f"OpenAI reportedly accepts no new fine-tuning jobs after {cutoff}, "
                                       f"{days} days from {today}.")
        return window


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Read and validate the price table (default params/prices.yaml, relative to the project root)."""
    p = resolve(path or DEFAULT_PRICES_FILE)
    if not p.is_file():
        raise PriceError(f"price table not found: {p} (the project ships params/prices.yaml)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PriceError(f"{p} is not valid YAML: {exc}") from exc
    validate_prices(raw, str(p))
    return PriceTable(raw=raw, path=p)


def service_window_warning(model_id: str, today: date | str | None = None,
                           prices: PriceTable | str | Path | None = None,
                           warn_days: int = WARN_DAYS, new_jobs: bool = True) -> str | None:
    """The warning text when `model_id`'s reported dates are past or within `warn_days` of
    `today` (default: today), naming the local LoRA path as the durable alternative; else None."""
    table = prices if isinstance(prices, PriceTable) else load_prices(prices)
    return table.service_window(model_id, today=today, warn_days=warn_days, new_jobs=new_jobs).warning()

"""What a local LoRA run writes and shows: the adapter folder (weights, tokenizer with its chat template and
system_prompt_mode, README model card, history.json, data_report.json), built whole or not at all, the registry
card ``run_dir/models/<name>.json``, and the :class:`TrainResult` with its tables and loss curves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from kokoro_helpers import cards
from kokoro_helpers.jsonio import atomic_dir, write_json_atomic, write_text_atomic
from kokoro_helpers.local.chat_messages import SYSTEM_PROMPT_MODE_KEY
from kokoro_helpers.local.tiny_model import is_embedded, portable_tokenizer_files, quiet_transformers
from kokoro_helpers.paths import portable

if TYPE_CHECKING:
    from kokoro_helpers.local.chat_encoding import ChatEncoder
    from kokoro_helpers.local.sft_config import LoraTrainConfig
    from kokoro_helpers.local.train_plan import Plan


@dataclass
class TrainResult:
    """What a run produced (or why it was skipped), with the views the notebook shows."""

    skipped: str | None = None
    name: str = ""
    adapter_dir: Path | None = None
    card_path: Path | None = None
    card: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        return self.skipped is None

    def loss_table(self):
        """Base vs adapter held-out loss (mean cross-entropy per assistant token) and perplexity."""
        import pandas as pd

        rows = []
        for label, key in (("base (adapter off)", "base_valid_loss"), ("base + LoRA adapter", "adapter_valid_loss")):
            loss = self.metrics.get(key)
            rows.append({"model": label, "valid_loss": loss,
                         "valid_perplexity": math.exp(loss) if loss is not None and loss < 50 else None})
        return pd.DataFrame(rows).set_index("model")

    def compare(self) -> str:
        """One line: is the adapter's held-out loss below the base's? (printed, never asserted)"""
        if self.skipped:
            return f"no comparison: {self.skipped}"
        base, ada = self.metrics.get("base_valid_loss"), self.metrics.get("adapter_valid_loss")
        if base is None or ada is None:
            return "no comparison: the valid split is empty (or evaluate_base was off)"
        if ada < base:
            return (f"adapter valid loss {ada:.4f} < base {base:.4f} (-{base - ada:.4f} nats per assistant "
                    f"token, perplexity x{math.exp(ada - base):.2f}): the adapter is better on held-out dialogues")
        return (f"WARNING: adapter valid loss {ada:.4f} is NOT below the base's {base:.4f}: training did not help "
                "on held-out dialogues (try more epochs, another learning_rate, or more data)")

    def card_view(self) -> dict[str, Any]:
        """The registry card without its long loss history (the curves are plotted instead)."""
        return {k: v for k, v in self.card.items() if k not in ("loss_history",)}

    def speed_table(self):
        import pandas as pd

        keys = ("wall_s", "train_tokens_per_s", "padding_fraction", "trainable_params", "total_params",
                "trainable_fraction", "global_step", "epochs")
        return pd.DataFrame([{k: self.metrics.get(k) for k in keys}], index=[self.name])

    def files(self):
        """The files written for this model: path and size."""
        import pandas as pd

        rows = []
        if self.adapter_dir and self.adapter_dir.is_dir():
            for p in sorted(self.adapter_dir.iterdir()):
                if p.is_file():
                    rows.append({"file": portable(p), "bytes": p.stat().st_size})
        if self.card_path and self.card_path.is_file():
            rows.append({"file": portable(self.card_path), "bytes": self.card_path.stat().st_size})
        return pd.DataFrame(rows, columns=["file", "bytes"])

    def summary(self) -> str:
        if self.skipped:
            return f"local LoRA skipped: {self.skipped}"
        m = self.metrics
        base, ada = m.get("base_valid_loss"), m.get("adapter_valid_loss")
        loss = (f"valid loss base {base:.4f} -> adapter {ada:.4f}" if base is not None and ada is not None
                else "no valid examples: no held-out loss")
        return (f"{self.name}: {loss}; {m.get('train_tokens_per_s', 0):,.0f} tokens/s, padding "
                f"{m.get('padding_fraction', 0):.1%}, {m.get('wall_s', 0):.1f} s, step {m.get('global_step')} -> "
                f"{portable(self.adapter_dir) if self.adapter_dir else '?'}")


def plot_loss_curves(result: TrainResult | Mapping[str, Any], ax=None):
    """Train loss per optimizer step, valid loss per epoch, and the base's valid loss (dashed)."""
    import matplotlib.pyplot as plt

    history = result.history if isinstance(result, TrainResult) else result
    if isinstance(result, TrainResult) and result.skipped:
        print(f"no curves: {result.skipped}")
        return None
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    train = history.get("train", [])
    valid = history.get("valid", [])
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train (per step)")
    if valid:
        ax.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid (per epoch)")
    if history.get("base_valid_loss") is not None:
        ax.axhline(history["base_valid_loss"], ls="--", color="gray", label="base model, valid")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per assistant token")
    ax.set_title("local LoRA: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def loss_history(log_history: list[dict[str, Any]], base_loss: float | None) -> dict[str, Any]:
    """The curves of the Trainer's log: train loss per optimizer step, valid loss per evaluation, the base's loss."""
    train, valid = [], []
    for e in log_history:
        if "loss" in e and "step" in e:
            gn = e.get("grad_norm")
            train.append({"step": e["step"], "epoch": round(float(e.get("epoch", 0)), 4),
                          "loss": round(float(e["loss"]), 5), "lr": e.get("learning_rate"),
                          "time_s": e.get("step_time_s"),
                          "grad_norm": round(float(gn), 4) if gn is not None and math.isfinite(gn) else None})
        elif "eval_loss" in e:
            ep = float(e.get("epoch", 0))
            valid.append({"step": e["step"], "epoch": int(round(ep)) if abs(ep - round(ep)) < 1e-6 else ep,
                          "loss": float(e["eval_loss"])})
    # a resumed run can log a step twice (the checkpoint's history, then the session's): keep the last
    train = list({r["step"]: r for r in train}.values())
    valid = list({r["step"]: r for r in valid}.values())
    return {"train": train, "valid": valid, "base_valid_loss": base_loss}


def save_adapter(adapter_dir: Path, model: Any, tokenizer: Any, system_prompt_mode: str, history: dict[str, Any],
                 data: dict[str, Any], card: dict[str, Any]) -> None:
    """Write the adapter folder; an existing one is replaced only once the new one is complete."""
    with atomic_dir(adapter_dir) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp)
            # generation must give the template the messages as training did (generate.render_prompt)
            tokenizer.init_kwargs[SYSTEM_PROMPT_MODE_KEY] = system_prompt_mode
            tokenizer.save_pretrained(tmp)
        portable_tokenizer_files(tmp)
        write_json_atomic(tmp / "history.json", history, indent=1)
        write_json_atomic(tmp / "data_report.json", data, indent=1)
        write_text_atomic(tmp / "README.md", adapter_readme(card))


def adapter_card(cfg: LoraTrainConfig, plan: Plan, *, adapter_dir: Path, checkpoint_root: Path, base_path: str,
                 base_fingerprint: str, encoder: ChatEncoder, world_size: int, device_name: str | None,
                 metrics: dict[str, Any], history: dict[str, Any], data: dict[str, Any],
                 finished: bool) -> dict[str, Any]:
    """The registry card ``run_dir/models/<name>.json`` of a trained adapter (also the README's source)."""
    import trl

    adapter = portable(adapter_dir)
    usage = (
        f"Local LoRA adapter in {adapter} (peft). Load it with kokoro_helpers (04_local_lora_inference) or: "
        f"tok = AutoTokenizer.from_pretrained('{adapter}'); base = AutoModelForCausalLM.from_pretrained(<base>); "
        f"model = PeftModel.from_pretrained(base, '{adapter}'). Prompt with tok.apply_chat_template(messages, "
        f"add_generation_prompt=True); generation ends at {encoder.end_of_turn}. Base: "
        f"{cfg.local_base_model}" + (" (built by kokoro_helpers.local.tiny_model; a smoke model whose replies mean "
                                     "nothing)" if is_embedded(cfg.local_base_model) else "") + ".")
    training_params = dict(cfg.training_params(), system_prompt_mode_used=encoder.system_prompt_mode,
                           precision=plan.precision, device=plan.device, device_name=device_name,
                           world_size=world_size, trainer=f"trl.SFTTrainer {trl.__version__}")
    return cards.new_card(
        kind="local_lora", model_id=cfg.name, base_model=cfg.local_base_model,
        training_params=training_params, usage_instructions=usage,
        adapter_path=adapter, base_model_path=portable(Path(base_path))
        if Path(base_path).exists() else base_path, base_fingerprint=base_fingerprint,
        training_metrics=metrics, loss_history=history, training_data=data,
        end_of_turn_token=encoder.end_of_turn, finished=finished,
        checkpoints=portable(checkpoint_root), smoke_model=is_embedded(cfg.local_base_model))


def adapter_readme(card: dict[str, Any]) -> str:
    """The adapter folder's README.md model card, from its registry card."""
    m, d, p = card["training_metrics"], card["training_data"], card["training_params"]

    def f(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    smoke = ("\n> **Smoke model.** The base is the package's embedded tiny model: the adapter exists to test "
             "the pipeline, and its replies mean nothing.\n" if card.get("smoke_model") else "")
    params = "\n".join(f"| {k} | {v} |" for k, v in p.items())
    return f"""# {card['model_id']} — local LoRA adapter
{smoke}
- **Base model:** `{card['base_model']}` (loaded from `{card['base_model_path']}`)
- **Kind:** local_lora (peft LoRA adapter; `adapter_model.safetensors`, `adapter_config.json`)
- **Tokenizer:** the base's, saved here with its chat template; turns end with `{card['end_of_turn_token']}`
- **Trained:** {card['timestamp']}{'' if card['finished'] else ' — PARTIAL (stopped by max_steps)'}

## Data
- train.jsonl sha256 `{d['train_sha256']}`
- valid.jsonl sha256 `{d['valid_sha256']}`
- train: {d['train']['examples']} examples -> {d['train']['sequences']} sequences, {d['train']['tokens']:,} tokens
  ({d['train']['trained_tokens']:,} on assistant turns); dropped exchanges: {d['train']['dropped_exchanges']}
- valid: {d['valid']['examples']} examples -> {d['valid']['sequences']} sequences, {d['valid']['tokens']:,} tokens

## Metrics
| metric | value |
|---|---|
| valid loss, base (adapter off) | {f(m['base_valid_loss'])} |
| valid loss, with adapter | {f(m['adapter_valid_loss'])} |
| train tokens/s (non-padding) | {f(m['train_tokens_per_s'], ',.0f')} |
| padding fraction | {f(m['padding_fraction'], '.1%')} |
| wall time (s) | {f(m['wall_s'], '.1f')} |
| trainable / total parameters | {m['trainable_params']:,} / {m['total_params']:,} ({f(m['trainable_fraction'], '.2%')}) |
| optimizer steps | {m['global_step']} / {m['total_steps']} |

Valid loss is the mean cross-entropy per assistant token (content and end-of-turn), on
the held-out split written by 01_data.

## Training parameters
| parameter | value |
|---|---|
{params}

## Use
{card['usage_instructions']}
"""

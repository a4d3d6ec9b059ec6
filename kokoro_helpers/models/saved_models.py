"""Saved models: list the model cards of a run and use a model — the seeds' `use_saved_model.py`.

    python -m kokoro_helpers.saved_models --list [--run-dir runs/default]
    python -m kokoro_helpers.saved_models --use-latest --input "最近眠れなくて…"
    python -m kokoro_helpers.saved_models --model-id ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc --interactive
    python -m kokoro_helpers.saved_models --model-file runs/default/models/x.json --input "..." --system "..."

OpenAI models (kind "openai") are used through the API (OPENAI_API_KEY from the environment or
.env); Azure OpenAI fine-tunes (card provider "azure") through their deployment (`--deployment NAME`
or the card's azure_deployment; AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, OPENAI_API_VERSION);
local LoRA models (kind "local_lora") on this machine — every kind through the one model interface
(kokoro_helpers.models.open.open_model). Bad use ends with one line on stderr and a non-zero exit, never a
traceback (KOKORO_DEBUG=1 shows it).

From Python: `list_models(run_dir)`, `choose_card(run_dir, model_id=... | latest=True | model_file=...)`,
then `open_model(card_path).reply(messages)`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from kokoro_helpers import cards
from kokoro_helpers.cards import CardError
from kokoro_helpers.models.base import with_system_prompt
from kokoro_helpers.models.open import open_model
from kokoro_helpers.paths import DEFAULT_RUN_DIR, resolve

EXIT_USAGE = 2
EXIT_ERROR = 1


def scan_cards(run_dir: str | Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """(readable cards newest first, one problem line per unreadable card file)."""
    folder = cards.models_dir(run_dir)
    good, bad = [], []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            good.append((path, cards.load_card(path)))
        except CardError as exc:
            bad.append(str(exc))
    good.sort(key=lambda pc: str(pc[1].get("timestamp", "")), reverse=True)
    return good, bad


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def list_models(run_dir: str | Path = DEFAULT_RUN_DIR) -> list[dict[str, Any]]:
    """One row per card, newest first: model id, kind, status, timestamp, training params, card file."""
    rows = []
    for path, card in scan_cards(run_dir)[0]:
        params = card.get("training_params") or {}
        rows.append({"model_id": card.get("model_id"), "kind": card.get("kind", "openai"),
                     "status": card.get("status", "ready" if card.get("model_id") else "unknown"),
                     "timestamp": card.get("timestamp"), "base_model": card.get("base_model"),
                     "job_id": card.get("job_id"), "training_params": params, "card": str(path)})
    return rows


def format_models(rows: list[dict[str, Any]]) -> str:
    """The --list text: a numbered block per model."""
    lines = []
    for i, r in enumerate(rows, 1):
        name = r["model_id"] or f"(no model yet: job {r.get('job_id')})"
        lines.append(f"{i}. {name}  [{r['kind']}, {r['status']}]")
        lines.append(f"   timestamp: {r['timestamp']}   base: {r['base_model']}")
        params = dict(r["training_params"] or {})
        splits = params.pop("data_splits", None)
        text = " ".join(f"{k}={v}" for k, v in params.items() if v is not None)
        if isinstance(splits, dict):
            text += " data_splits=" + "/".join(f"{k} {v}" for k, v in splits.items())
        lines.append(f"   training: {text or '-'}")
        lines.append(f"   card: {_display_path(Path(r['card']))}")
    return "\n".join(lines)


def choose_card(run_dir: str | Path = DEFAULT_RUN_DIR, model_id: str | None = None, latest: bool = False,
               model_file: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """The card to use: from a card file, by model id (or card file name), or the newest usable one."""
    if model_file:
        path = Path(model_file).expanduser()
        if not path.is_absolute() and not path.exists():
            path = resolve(path)
        card = cards.load_card(path)
    else:
        found, bad = scan_cards(run_dir)
        skipped = f" ({len(bad)} unreadable card(s) skipped: {bad[0]})" if bad else ""
        if latest:
            usable = [(p, c) for p, c in found if c.get("model_id")]
            if not usable:
                raise CardError(f"no usable model card in {cards.models_dir(run_dir)}{skipped} "
                                "(train one with 02_finetune; --list shows what is there)")
            path, card = usable[0]
        else:
            match = [(p, c) for p, c in found if c.get("model_id") == model_id or p.stem == model_id]
            if not match:
                raise CardError(f"unknown model id {model_id!r}: no card for it in {cards.models_dir(run_dir)}"
                                f"{skipped} (--list shows the saved models; or pass --model-file CARD)")
            path, card = match[0]
    if not card.get("model_id"):
        raise CardError(f"{path} has no model yet (job {card.get('job_id')} is {card.get('status')}): "
                        "resume monitoring in 02_finetune first")
    return Path(path), card


class _Parser(argparse.ArgumentParser):
    """argparse, but bad use is one line on stderr (and exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m kokoro_helpers.saved_models",
                description="List the fine-tuned models of a run and use one (OpenAI or local LoRA).")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="the run whose models/ to read (default: %(default)s)")
    p.add_argument("--list", action="store_true", help="list the saved models, newest first")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-id", help="a model id (or card file name) from --list")
    which.add_argument("--use-latest", action="store_true", help="the newest usable model")
    which.add_argument("--model-file", help="a model card file (.json)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--input", help="one message; prints the model's reply")
    how.add_argument("--interactive", action="store_true", help="chat with history; quit or exit ends")
    p.add_argument("--deployment", help="Azure OpenAI: the deployment that serves the fine-tuned model "
                                        "(default: the card's azure_deployment)")
    p.add_argument("--system", help="system prompt (default: the one the model was trained with, if recorded)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length limit (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: %(default)s)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.list:
        rows = list_models(args.run_dir)
        for problem in scan_cards(args.run_dir)[1]:
            print(f"warning: {problem}", file=sys.stderr)
        if not rows:
            print(f"no model cards in {cards.models_dir(args.run_dir)}")
        else:
            print(format_models(rows))
        return 0
    if not (args.model_id or args.use_latest or args.model_file):
        raise _UsageError("choose a model: --model-id ID, --use-latest or --model-file CARD (or --list)")
    if not (args.input is not None or args.interactive):
        raise _UsageError("say what to do with the model: --input TEXT or --interactive")
    if args.max_tokens <= 0:
        raise _UsageError("--max-tokens must be positive")
    path, card = choose_card(args.run_dir, args.model_id, args.use_latest, args.model_file)
    args.provider_ = card.get("provider", "openai")
    model = open_model(path, args.run_dir, deployment=args.deployment,
                       max_new_tokens=args.max_tokens,
                       temperature=args.temperature, log=None)
    system = args.system if args.system is not None else card.get("system_prompt")

    def answer(history: list[dict[str, str]]) -> str:
        return model.reply(with_system_prompt(history, system, replace=args.system is not None))

    if args.input is not None:
        print(answer([{"role": "user", "content": args.input}]))
        return 0
    print(f"chatting with {card['model_id']} ({card.get('kind')}) — type quit or exit to end")
    history: list[dict[str, str]] = []
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print()
            return 0
        if text.strip().lower() in ("quit", "exit"):
            return 0
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        reply = answer(history)
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


class _UsageError(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the exit status (0 ok, 1 error, 2 bad use, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except _UsageError as exc:
        print(f"error: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # one line, never a traceback (KOKORO_DEBUG=1 shows it)
        if os.environ.get("KOKORO_DEBUG") == "1":
            raise
        print(f"error: {_one_line(exc, getattr(args, 'provider_', None) or 'openai')}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(exc: BaseException, provider: str = "openai") -> str:
    from kokoro_helpers.hosted.errors import explain, redact
    from kokoro_helpers.hosted.errors import OpenAIFTError
    try:
        import openai
        if isinstance(exc, openai.APIError):
            return " ".join(str(explain(exc, provider, "using the model")).split())
    except ImportError:
        pass
    text = " ".join(redact(exc).split())
    if isinstance(exc, (CardError, OpenAIFTError, ValueError, OSError)):
        return text
    return f"{type(exc).__name__}: {text} (KOKORO_DEBUG=1 shows the traceback)"


if __name__ == "__main__":
    sys.exit(main())

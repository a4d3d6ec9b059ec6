"""`python -m kokoro_helpers.saved_models`: listing cards of both kinds, using a model, and bad use
ending in one clear line (never a traceback). No network: the no-key case fails before any request,
and the rest use a fake transport."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import openai
import pytest

from kokoro_helpers.models import open as open_mod
from kokoro_helpers.models import saved_models

ROOT = Path(__file__).resolve().parents[1]
SEED_ID = "ft:gpt-4o-mini-2024-07-18:personal:kokoro-chat:AbCdEf12"

# the shape of the seeds' model-info files (no `kind`: they were all OpenAI models)
SEED_CARD = {
    "model_id": SEED_ID,
    "timestamp": "2025-05-01T12:00:00",
    "base_model": "gpt-4o-mini-2024-07-18",
    "training_params": {"epochs": 10, "batch_size": 32, "learning_rate_multiplier": "auto", "max_samples": None,
                        "seed": 42, "data_splits": {"train": 5271, "test": 659, "valid": 659}},
    "evaluation_results": {},
    "usage_instructions": "Use this model id with the chat completions API.",
}
LORA_CARD = {
    "model_id": "lora-tiny", "timestamp": "2026-11-20T09:00:00+00:00", "base_model": "embedded:tiny",
    "training_params": {"epochs": 3, "batch_size": 8}, "evaluation_results": {}, "usage_instructions": "",
    "kind": "local_lora", "adapter_path": "models/lora-tiny", "training_metrics": {},
}
PENDING_CARD = {
    "model_id": None, "timestamp": "2026-11-21T00:00:00+00:00", "base_model": "gpt-4o-mini-2024-07-18",
    "training_params": {"epochs": "auto"}, "evaluation_results": {}, "usage_instructions": "", "kind": "openai",
    "job_id": "ftjob-pending", "status": "running",
}


def write_card(run_dir: Path, name: str, card: dict) -> Path:
    path = run_dir / "models" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose environment has no OpenAI key (an empty value also shadows
    any key in a .env) and an unroutable base URL, so no request can leave the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_API_KEY="", OPENAI_BASE_URL="http://127.0.0.1:9/v1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "kokoro_helpers.saved_models", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)


def test_list_shows_a_seed_card_and_use_latest_without_key_fails_in_one_line(tmp_path):
    write_card(tmp_path, "seed-model", SEED_CARD)
    listed = cli("--list", "--run-dir", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert SEED_ID in listed.stdout and "seed-model.json" in listed.stdout
    assert "epochs=10" in listed.stdout and "batch_size=32" in listed.stdout and "train 5271" in listed.stdout
    assert "[openai," in listed.stdout

    used = cli("--use-latest", "--input", "こんにちは", "--run-dir", str(tmp_path))
    assert used.returncode != 0
    assert "Traceback" not in used.stderr
    lines = used.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0]
    assert used.stdout == ""


def test_list_is_newest_first_over_both_kinds_and_skips_corrupt_cards(tmp_path, capsys):
    write_card(tmp_path, "seed-model", SEED_CARD)
    write_card(tmp_path, "lora-tiny", LORA_CARD)
    write_card(tmp_path, "pending", PENDING_CARD)
    (tmp_path / "models" / "broken.json").write_text("{not json", encoding="utf-8")
    rows = saved_models.list_models(tmp_path)
    assert [r["model_id"] for r in rows] == [None, "lora-tiny", SEED_ID]
    assert [r["kind"] for r in rows] == ["openai", "local_lora", "openai"]
    assert saved_models.main(["--list", "--run-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.index("ftjob-pending") < out.index("lora-tiny") < out.index(SEED_ID)
    assert "broken.json" in err and "corrupt" in err and "Traceback" not in err


def test_use_latest_skips_cards_without_a_model(tmp_path):
    write_card(tmp_path, "seed-model", SEED_CARD)
    write_card(tmp_path, "pending", PENDING_CARD)
    path, card = saved_models.choose_card(tmp_path, latest=True)
    assert card["model_id"] == SEED_ID and path.name == "seed-model.json"
    path, card = saved_models.choose_card(tmp_path, model_id="seed-model")      # by card file name too
    assert card["model_id"] == SEED_ID


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, expected, code", [
    (["--model-id", "ft:nope", "--input", "x"], "unknown model id 'ft:nope'", 1),
    (["--model-file", "{run}/models/broken.json", "--input", "x"], "is corrupt", 1),
    (["--model-file", "{run}/models/missing.json", "--input", "x"], "model card not found", 1),
    (["--model-id", "pending", "--input", "x"], "has no model yet", 1),
    (["--input", "x"], "choose a model", 2),
    (["--use-latest"], "--input TEXT or --interactive", 2),
    (["--use-latest", "--input", "x", "--max-tokens", "many"], "invalid int value", 2),
    (["--model-id", "a", "--use-latest", "--input", "x"], "not allowed with argument", 2),
])
def test_bad_use_is_one_clear_line_and_a_non_zero_exit(tmp_path, capsys, args, expected, code):
    write_card(tmp_path, "seed-model", SEED_CARD)
    write_card(tmp_path, "pending", PENDING_CARD)
    (tmp_path / "models" / "broken.json").write_text("{not json", encoding="utf-8")
    argv = [a.replace("{run}", str(tmp_path)) for a in args] + ["--run-dir", str(tmp_path)]
    try:
        status = saved_models.main(argv)
    except SystemExit as exc:          # argparse's own exit
        status = exc.code
    assert status == code
    assert expected in one_error_line(capsys)


def test_unknown_id_in_a_fresh_process(tmp_path):
    write_card(tmp_path, "seed-model", SEED_CARD)
    res = cli("--model-id", "ft:nope", "--input", "x", "--run-dir", str(tmp_path))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "unknown model id" in res.stderr


def test_a_local_lora_card_answers_through_the_same_interface(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    from kokoro_helpers.local.export import init_adapter
    from kokoro_helpers.models.open import open_model

    init_adapter(tmp_path / "models" / "lora-tiny", seed=3)
    write_card(tmp_path, "lora-tiny", LORA_CARD)
    monkeypatch.setattr(open_mod, "hosted_client", lambda *a, **k: pytest.fail("a local card asked for an API client"))
    torch.manual_seed(0)
    assert saved_models.main(["--model-id", "lora-tiny", "--input", "眠れません", "--max-tokens", "8",
                              "--temperature", "0", "--run-dir", str(tmp_path)]) == 0
    reply = capsys.readouterr().out.strip()
    expected = open_model("lora-tiny", tmp_path, max_new_tokens=8).reply([{"role": "user", "content": "眠れません"}])
    assert reply == expected.strip()


def _fake_chat_client(seen: list):
    def handler(request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.read())
        seen.append(body)
        n = sum(1 for m in body["messages"] if m["role"] == "user")
        return httpx2.Response(200, json={
            "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"返答{n}"}}]})
    return openai.OpenAI(api_key="test", base_url="https://fake-openai.test/v1", max_retries=0,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def test_input_and_interactive_use_the_model_with_history(tmp_path, capsys, monkeypatch):
    write_card(tmp_path, "seed-model", SEED_CARD)
    seen: list = []
    monkeypatch.setattr(open_mod, "hosted_client", lambda *a, **k: _fake_chat_client(seen))
    assert saved_models.main(["--use-latest", "--input", "こんにちは", "--run-dir", str(tmp_path),
                              "--system", "あなたはカウンセラーです。", "--max-tokens", "64", "--temperature", "0.2"]) == 0
    assert capsys.readouterr().out.strip() == "返答1"
    assert seen[0]["model"] == SEED_ID and seen[0]["max_tokens"] == 64 and seen[0]["temperature"] == 0.2
    assert seen[0]["messages"][0] == {"role": "system", "content": "あなたはカウンセラーです。"}

    answers = iter(["最近眠れません", "", "仕事のことです", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert saved_models.main(["--model-id", SEED_ID, "--interactive", "--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model> 返答1" in out and "model> 返答2" in out
    assert [m["role"] for m in seen[-1]["messages"]] == ["user", "assistant", "user"]


AZURE_CARD = {**SEED_CARD, "kind": "openai", "provider": "azure", "model_id": "gpt-4o-mini-2024-07-18.ft-abc123",
              "azure_deployment": None, "timestamp": "2026-11-22T00:00:00+00:00"}


def test_an_azure_card_is_used_through_its_deployment(tmp_path, capsys, monkeypatch):
    write_card(tmp_path, "azure-model", AZURE_CARD)
    # without a deployment: one line saying Azure serves a fine-tune only once deployed, and how to name it
    assert saved_models.main(["--use-latest", "--input", "x", "--run-dir", str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert "deployment" in line and "--deployment" in line
    seen: list = []
    monkeypatch.setattr(open_mod, "hosted_client", lambda *a, **k: _fake_chat_client(seen))
    assert saved_models.main(["--use-latest", "--input", "こんにちは", "--deployment", "kokoro-ft",
                              "--run-dir", str(tmp_path)]) == 0
    assert seen[-1]["model"] == "kokoro-ft"


def test_a_wrong_key_is_one_line_naming_the_key_and_never_showing_it(tmp_path, capsys, monkeypatch):
    secret = "sk-" + "proj-WRONGkeyWRONGkey0123456789zyxw"
    write_card(tmp_path, "seed-model", SEED_CARD)

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(401, json={"error": {
            "message": f"Incorrect API key provided: {secret[:8]}{'*' * 20}{secret[-4:]}. You can find your API key "
                       "at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})

    client = openai.OpenAI(api_key=secret, base_url="https://fake-openai.test/v1", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    monkeypatch.setattr(open_mod, "hosted_client", lambda *a, **k: client)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    assert saved_models.main(["--use-latest", "--input", "x", "--run-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "401" in captured.err and "OPENAI_API_KEY" in captured.err and ".env" in captured.err
    assert secret not in captured.err + captured.out and secret[-4:] not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err

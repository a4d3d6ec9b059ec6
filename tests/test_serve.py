"""The OpenAI-compatible server (kokoro_helpers.serve) against the real `openai` client, over real
HTTP on a free loopback port: non-streaming, streaming, concurrency, 4xx bodies, the CLI."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kokoro_helpers import generate as gen  # noqa: E402
from kokoro_helpers import serve  # noqa: E402
from kokoro_helpers.tiny_model import build_tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "system", "content": "あなたは心理カウンセラーです。"},
            {"role": "user", "content": "最近、仕事のことで眠れません。"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    build_tiny_model(progress=False)
    return gen.init_adapter(tmp_path_factory.mktemp("serve") / "lora-serve", seed=5)


@pytest.fixture(scope="module")
def lm(adapter, tmp_path_factory) -> gen.LocalModel:
    model = gen.load(adapter, device="cpu")
    model.add_adapter(gen.init_adapter(tmp_path_factory.mktemp("serve-b") / "other", seed=6), name="other")
    return model


@pytest.fixture(scope="module")
def server(lm):
    srv = serve.ServerThread(serve.create_app(lm, max_tokens=16, temperature=0.0))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=60)


def post(server, body, raw: bytes | None = None):
    if raw is not None:
        return httpx.post(f"{server.url}/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


# --------------------------------------------------------------------------- the happy paths

def test_health_and_models(server, client):
    assert server.host == "127.0.0.1" and server.port > 0
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["device"] == "cpu"
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["lora-serve", "other"] and len(ids) == 3      # two adapters and the base


def test_non_streaming_answers_the_openai_client(lm, client):
    resp = client.chat.completions.create(model="lora-serve", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = lm.generate(MESSAGES, adapter="lora-serve", max_new_tokens=12, return_details=True)
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == "lora-serve" and resp.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert resp.usage.prompt_tokens == expected.prompt_tokens
    assert resp.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    other = client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=12, temperature=0)
    assert other.choices[0].message.content == lm.generate(MESSAGES, adapter="other", max_new_tokens=12)


def test_streaming_answers_the_openai_client(lm, client):
    stream = client.chat.completions.create(model="lora-serve", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected = lm.generate(MESSAGES, adapter="lora-serve", max_new_tokens=12, return_details=True)
    assert text == expected.text and finishes == [expected.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": "lora-serve", "messages": MESSAGES, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_concurrent_requests_are_answered_safely(lm, client):
    expected = {name: lm.generate(MESSAGES, adapter=name, max_new_tokens=10) for name in ("lora-serve", "other")}

    def ask(k: int) -> tuple[str, str]:
        name = ("lora-serve", "other")[k % 2]
        if k % 3 == 0:
            parts = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0,
                                                   stream=True)
            return name, "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        resp = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=10, temperature=0)
        return name, resp.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(8)))
    assert all(text == expected[name] for name, text in results)


def test_stop_strings():
    assert serve.apply_stop("こんにちは。元気です", ["。"]) == ("こんにちは", True)
    assert serve.apply_stop("abc", ["x", "y"]) == ("abc", False)


# --------------------------------------------------------------------------- malformed requests

@pytest.mark.parametrize("body, status, param", [
    ({"model": "lora-serve"}, 400, "messages"),
    ({"messages": MESSAGES}, 400, "model"),
    ({"model": "lora-serve", "messages": []}, 400, "messages"),
    ({"model": "lora-serve", "messages": "hello"}, 400, "messages"),
    ({"model": "lora-serve", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "lora-serve", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "lora-serve", "messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, 400,
     "messages[1].role"),
    ({"model": "no-such-model", "messages": MESSAGES}, 404, "model"),
    ({"model": 3, "messages": MESSAGES}, 400, "model"),
    ({"model": "lora-serve", "messages": MESSAGES, "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "lora-serve", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "lora-serve", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"model": "lora-serve", "messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ({"model": "lora-serve", "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    ({"model": "lora-serve", "messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    ({"model": "lora-serve", "messages": MESSAGES, "n": 2}, 400, "n"),
    ({"model": "lora-serve", "messages": MESSAGES, "seed": 1.5}, 400, "seed"),
    ({"model": "lora-serve", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ([1, 2, 3], 400, None),
])
def test_malformed_requests_get_4xx_with_an_openai_error_body(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_bad_json_unknown_routes_and_the_client_errors(server, client):
    for raw in (b"{not json", b""):
        r = post(server, None, raw=raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{server.url}/v1/nowhere", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{server.url}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="lora-serve", messages=[{"role": "tool", "content": "x",
                                                                      "tool_call_id": "1"}])


def test_api_key_is_required_when_configured(lm):
    with serve.ServerThread(serve.create_app(lm, api_key="sekrit")) as srv:
        bad = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=srv.base_url, api_key="sekrit", max_retries=0)
        assert good.models.list().data
    with pytest.raises(httpx.ConnectError):               # stopped: the port is closed
        httpx.get(f"{srv.url}/health", timeout=2)


# --------------------------------------------------------------------------- the command line

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_an_adapter_folder(adapter):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kokoro_helpers.serve", "--model", str(adapter), "--port",
                             str(port), "--log-level", "warning", "--temperature", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start: {proc.stdout.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
        resp = client.chat.completions.create(model="lora-serve", messages=MESSAGES, max_tokens=5)
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert post(type("S", (), {"url": f"http://127.0.0.1:{port}"}), {"model": "lora-serve"}).status_code == 400
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


def test_cli_reports_a_missing_model(tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path / "nope"), "--run-dir", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err

"""The OpenAI-compatible server (kokoro_helpers.local.serve and its serve_* parts) against the real `openai` client, over real
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
from procs import stop

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from kokoro_helpers.local import export, loading  # noqa: E402
from kokoro_helpers.local import model as local_model  # noqa: E402
from kokoro_helpers.local import serve  # noqa: E402
from kokoro_helpers.local.serve_app import create_app  # noqa: E402
from kokoro_helpers.local.serve_protocol import Limits, apply_stop  # noqa: E402
from kokoro_helpers.local.tiny_model import build_tiny_model  # noqa: E402

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
    return export.init_adapter(tmp_path_factory.mktemp("serve") / "lora-serve", seed=5)


@pytest.fixture(scope="module")
def lm(adapter, tmp_path_factory) -> local_model.LocalModel:
    model = loading.load(adapter, device="cpu")
    model.add_adapter(export.init_adapter(tmp_path_factory.mktemp("serve-b") / "other", seed=6), name="other")
    return model


@pytest.fixture(scope="module")
def server(lm):
    srv = serve.ServerThread(create_app(lm, max_tokens=16, temperature=0.0))
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
    assert apply_stop("こんにちは。元気です", ["。"]) == ("こんにちは", True)
    assert apply_stop("abc", ["x", "y"]) == ("abc", False)


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
    with serve.ServerThread(create_app(lm, api_key="sekrit")) as srv:
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
        # SIGTERM while a long reply streams: the generation is cancelled and the server exits at once
        events: list[str] = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          json={"model": "lora-serve", "messages": MESSAGES, "max_tokens": 4000, "stream": True,
                                "temperature": 1.0, "seed": 3}) as r:
            lines = r.iter_lines()
            events.append(next(lines))                    # the role chunk: generation has begun
            proc.terminate()
            try:
                events += [line for line in lines if line]
            except httpx.TransportError:
                pass
        assert proc.wait(30) in (0, -15)                  # uvicorn re-raises SIGTERM after a clean shutdown
        assert len(events) < 4000 and not any('"finish_reason": "length"' in e for e in events)
        assert events[-2:] == [events[-2], "data: [DONE]"] and "server_shutting_down" in events[-2], events[-3:]
    finally:
        stop(proc, 10)


def test_cli_reports_a_missing_model(tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path / "nope"), "--run-dir", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- long prompts, limits, safety

def long_conversation(n: int) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "あなたは心理カウンセラーです。"}]
    for i in range(n // 2):
        msgs += [{"role": "user", "content": f"相談{i}"}, {"role": "assistant", "content": "はい"}]
    return msgs + [{"role": "user", "content": "最後の相談です。"}]


@pytest.fixture()
def roomy(lm):
    """A server that takes 10,000-message requests (the default --max-messages is 2048)."""
    with serve.ServerThread(create_app(lm, max_tokens=8, temperature=0.0,
                                             limits=Limits(max_messages=20_000))) as srv:
        yield srv


def test_a_10000_message_request_is_refused_or_fitted_and_says_so(server, roomy):
    msgs = long_conversation(10_000)
    r = post(server, {"model": "lora-serve", "messages": msgs})            # default limits
    assert r.status_code == 400 and r.json()["error"]["code"] == "array_above_max_length"
    r = post(roomy, {"model": "lora-serve", "messages": msgs})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "truncation" in err["message"]
    r = post(roomy, {"model": "lora-serve", "messages": msgs, "truncation": "auto", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncation"]["dropped_messages"] > 9000 and body["truncation"]["dropped_messages"] % 2 == 0
    assert body["usage"]["prompt_tokens"] <= 4096 - 4 < body["truncation"]["prompt_tokens_before"]
    assert r.headers["x-prompt-truncated"] == "true"
    short = post(roomy, {"model": "lora-serve", "messages": MESSAGES, "max_tokens": 4}).json()
    assert "truncation" not in short


def test_fitting_runs_outside_the_model_lock(roomy, monkeypatch):
    """While a 10,000-message request is being fitted (held here at a gate), a normal request is
    answered: fitting does not hold the model."""
    import threading

    from kokoro_helpers.local import serve_model
    real = serve_model.fit_messages
    gate, entered, order = threading.Event(), threading.Event(), []

    def gated(tokenizer, messages, room, **kw):
        if len(messages) > 100:
            entered.set()
            assert gate.wait(60)
        return real(tokenizer, messages, room, **kw)

    monkeypatch.setattr(serve_model, "fit_messages", gated)
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(lambda: (post(roomy, {"model": "lora-serve", "messages": long_conversation(10_000)}),
                                   order.append("big"))[0])
        assert entered.wait(30)
        small = post(roomy, {"model": "lora-serve", "messages": MESSAGES, "max_tokens": 4})
        order.append("small")
        gate.set()
        assert big.result(60).status_code == 400
    assert small.status_code == 200 and order == ["small", "big"]


def test_abandoned_requests_stop_generating(lm, monkeypatch):
    """Three clients that give up on long non-streaming replies, and one that hangs up a stream:
    their generations are cancelled (a few tokens each), so the next request does not wait."""

    real = local_model.stream_generate
    runs: list[dict] = []

    def long_stream(model, tokenizer, messages, **kw):      # every reply as long as max_tokens allows
        record = {"deltas": 0, "cancelled": False, "max": kw["max_new_tokens"]}
        runs.append(record)
        kw["min_new_tokens"] = kw["max_new_tokens"]
        try:
            for delta in real(model, tokenizer, messages, **kw):
                record["deltas"] += 1
                yield delta
        finally:
            record["cancelled"] = kw["cancel"].is_set()

    monkeypatch.setattr(local_model, "stream_generate", long_stream)
    with serve.ServerThread(create_app(lm, temperature=0.0)) as srv:
        def abandon(_):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{srv.url}/v1/chat/completions", timeout=httpx.Timeout(60, read=0.5),
                           json={"model": "lora-serve", "messages": MESSAGES, "max_tokens": 4000})
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(abandon, range(3)))
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=60, json={
                "model": "lora-serve", "messages": MESSAGES, "max_tokens": 4000, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""
            next(lines)                                  # a first delta: generation runs; then hang up
        r = post(srv, {"model": "lora-serve", "messages": MESSAGES, "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        deadline = time.monotonic() + 30
        while httpx.get(f"{srv.url}/health", timeout=5).json()["queue"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{srv.url}/health", timeout=5).json()["queue"] == 0
    abandoned = [run for run in runs if run["max"] == 4000]
    assert len(runs) - len(abandoned) == 1 and 1 <= len(abandoned) <= 4   # a queued one may never start
    assert all(run["cancelled"] and run["deltas"] < 4000 for run in abandoned), runs


def test_a_full_queue_answers_429_with_retry_after(lm):
    with serve.ServerThread(create_app(lm, max_tokens=4, temperature=0.0,
                                             limits=Limits(max_queue=0))) as srv:
        with ThreadPoolExecutor(1) as pool:
            with lm.lock:                                # the model is busy (e.g. the chat widget)
                first = pool.submit(post, srv, {"model": "lora-serve", "messages": MESSAGES})
                deadline = time.monotonic() + 30
                while httpx.get(f"{srv.url}/health", timeout=5).json()["queue"] < 1:
                    assert time.monotonic() < deadline and not first.done()
                    time.sleep(0.02)
                busy = post(srv, {"model": "lora-serve", "messages": MESSAGES})
                assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
                assert busy.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0).chat.completions.create(
                        model="lora-serve", messages=MESSAGES)
                assert not first.done()
        assert first.result(60).status_code == 200


@pytest.mark.parametrize("limits, body, code, param", [
    ({"max_messages": 3}, {"messages": long_conversation(4)}, "array_above_max_length", "messages"),
    ({"max_message_chars": 10}, {"messages": [{"role": "user", "content": "あ" * 11}]}, "string_above_max_length",
     "messages[0].content"),
    ({"max_body_bytes": 200}, {"messages": [{"role": "user", "content": "x" * 300}]}, "request_too_large", None),
])
def test_limits_answer_openai_style(lm, limits, body, code, param):
    with serve.ServerThread(create_app(lm, max_tokens=4, limits=Limits(**limits))) as srv:
        r = post(srv, {"model": "lora-serve", **body})
        err = r.json()["error"]
        assert r.status_code in (400, 413) and err["code"] == code and err["param"] == param
        assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": 2**64, "stream": True}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"truncation": "sometimes"}, "truncation"),
])
def test_parameter_errors_name_the_parameter_before_any_stream(server, body, param):
    r = post(server, {"model": "lora-serve", "messages": MESSAGES, **body})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == param


def test_no_op_sampling_values_and_ignored_fields_are_accepted(server):
    r = post(server, {"model": "lora-serve", "messages": MESSAGES, "max_tokens": 2, "presence_penalty": 0,
                      "frequency_penalty": 0.0, "logit_bias": {}, "user": "u1", "metadata": {"a": "b"},
                      "seed": -5})
    assert r.status_code == 200, r.text


def test_browser_safety(server, lm):
    url = f"{server.url}/v1/chat/completions"
    body = json.dumps({"model": "lora-serve", "messages": MESSAGES, "max_tokens": 2})
    # a cross-site "simple" POST (no preflight): text/plain is refused before anything runs
    r = httpx.post(url, content=body, headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert "access-control-allow-origin" not in r.headers
    r = httpx.post(url, content=body, headers={"content-type": "application/json", "host": "evil.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}"):
        assert httpx.get(f"{server.url}/health", headers={"host": host}).status_code == 200
    r = httpx.post(url, content=body, headers={"content-type": "application/json", "origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers     # no CORS by default
    r = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(url)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schema = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
            "truncation"} <= set(schema["properties"]) and schema["required"] == ["model", "messages"]
    with serve.ServerThread(create_app(lm, cors_origins=["http://localhost:3000"],
                                             allowed_hosts=["kokoro.test"])) as srv:
        r = httpx.options(f"{srv.url}/v1/chat/completions", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert httpx.get(f"{srv.url}/health", headers={"host": "kokoro.test"}).status_code == 200


def test_with_a_key_docs_are_behind_it_too_and_the_banner_says_how_to_pass_it(lm):
    with serve.ServerThread(create_app(lm, api_key="sekrit")) as srv:
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(f"{srv.url}{path}").status_code == 401
            assert httpx.get(f"{srv.url}{path}", headers={"authorization": "Bearer sekrit"}).status_code == 200
        app = srv.app
    text = serve.banner(app, "127.0.0.1", 8000, "KOKORO_KEY", {"device": "cpu", "dtype": "float32"})
    assert "api_key=os.environ['KOKORO_KEY']" in text and "EMPTY" not in text
    assert "api_key='EMPTY'" in serve.banner(app, "127.0.0.1", 8000, None, {"device": "cpu", "dtype": "float32"})


def test_cli_refuses_impossible_limits(tmp_path, capsys):
    assert serve.main(["--model", str(tmp_path / "nope"), "--max-messages", "0"]) == 2
    assert "--max-messages must be at least 1" in capsys.readouterr().err
    assert serve.main(["--model", str(tmp_path / "nope"), "--max-queue", "-1"]) == 2
    with pytest.raises(SystemExit):
        serve.main(["--model", "x", "--truncation", "sometimes"])

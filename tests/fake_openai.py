"""A stateful fake of the OpenAI (and Azure OpenAI) fine-tuning API, behind the real SDK.

`FakeOpenAI.handler` is an httpx2 MockTransport handler (openai 3.x runs on httpx2), so every test
runs the SDK's own code: its retries, its cursor pagination, its error classes. The server keeps its
state across clients, so a "kernel restart" is a new client talking to the same server. It fails
the way real services do:

* `fault(method, path, status, after_commit=True)`: the request *is* processed (the job or file
  exists) and then the answer is lost — a 502 from a proxy, or a dropped connection ("drop");
* `fault(...)` without after_commit: 429 / 5xx / timeouts before anything happens, e.g. a jobs
  list outage (`fault("GET", "/fine_tuning/jobs", 503, times=99)`);
* lists are paged by cursor (`after`, `limit`, `has_more`), newest first, like the real ones;
* a wrong key gets the real 401 body (`invalid_api_key`, the key shown masked);
* `refuse_creation=...`: job creation answers a refusal with the real error shape;
* `azure=True`: Azure's routes (`/openai/...?api-version=`), `api-key` header, no job metadata.

Error bodies follow OpenAI's documented shape `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Callable

import httpx2
import openai

BASE_URL = "https://fake-openai.test/v1"
AZURE_ENDPOINT = "https://kokoro-fake.openai.azure.com"
AZURE_API_VERSION = "2025-04-01-preview"

# The body OpenAI returns for a wrong key (the key is echoed masked: first 8 and last 4 characters).
def invalid_key_body(sent: str) -> dict[str, Any]:
    shown = f"{sent[:8]}{'*' * max(0, len(sent) - 12)}{sent[-4:]}" if len(sent) > 12 else "****"
    return {"error": {"message": f"Incorrect API key provided: {shown}. You can find your API key at "
                                 "https://platform.openai.com/account/api-keys.",
                      "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


# What OpenAI answers when a base model can no longer be fine-tuned by this organization: the shape of
# its documented "model_not_available" refusal (400, param "model").
def refused_body(model: str) -> dict[str, Any]:
    return {"error": {"message": f"Model {model} is not available for fine-tuning or does not exist.",
                      "type": "invalid_request_error", "param": "model", "code": "model_not_available"}}


class FakeOpenAI:
    """A tiny stateful OpenAI: files, fine-tuning jobs (with events, checkpoints, result file), chat."""

    def __init__(self, key: str | None = None, plan: tuple[str, ...] | None = None,
                 fail_with: dict[str, Any] | None = None, total_steps: int = 6, azure: bool = False,
                 refuse_creation: bool = False):
        self.key = key
        self.azure = azure
        self.refuse_creation = refuse_creation
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[tuple[str, str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.file_meta: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.polls: dict[str, int] = {}
        self.plan = plan or ("validating_files", "queued", "running", "running", "succeeded")
        self.fail_with = fail_with
        self.total_steps = total_steps
        self.faults: list[dict[str, Any]] = []
        self.on_create: Callable[[], None] | None = None     # called while a create request is in flight
        self.n = 0
        self.t = int(time.time())          # the server clock: now (lookups compare with the client clock)
        # a new job shows in jobs.list only after the client has waited this long (eventual consistency);
        # pass `fake.sleep` as the client's sleep so that its waits count
        self.list_lag_s = 0.0
        self.waited = 0.0
        self.visible_at: dict[str, float] = {}
        self.lock = threading.Lock()

    # --- clients ---
    def client(self, max_retries: int = 2, with_key: bool = True, key: str = "test") -> openai.OpenAI:
        http = httpx2.Client(transport=httpx2.MockTransport(self.handler))
        if self.azure:
            return openai.AzureOpenAI(azure_endpoint=AZURE_ENDPOINT, api_version=AZURE_API_VERSION,
                                      api_key=key, http_client=http, max_retries=max_retries)
        kwargs: dict[str, Any] = {"api_key": key} if with_key else {}
        return openai.OpenAI(base_url=BASE_URL, http_client=http, max_retries=max_retries, **kwargs)

    def transport(self) -> httpx2.Client:
        return httpx2.Client(transport=httpx2.MockTransport(self.handler))

    def fault(self, method: str, path_regex: str, status: int | str, times: int = 1, retry_ms: int | None = 1,
              after_commit: bool = False):
        """Answer the next `times` matching requests with `status` (or "timeout" / "drop"); with
        `after_commit` the request is processed first and only its answer is lost."""
        self.faults.append({"method": method, "re": re.compile(path_regex), "status": status, "times": times,
                            "retry_ms": retry_ms, "after_commit": after_commit})

    def count(self, method: str, path_regex: str) -> int:
        return sum(1 for m, p in self.calls if m == method and re.fullmatch(path_regex, p))

    def add_other_jobs(self, n: int, status: str = "succeeded") -> None:
        """`n` unrelated jobs created earlier (another project's), so lookups must page."""
        for _ in range(n):
            jid = self._id("ftjob")
            self.jobs[jid] = {"object": "fine_tuning.job", "id": jid, "model": "gpt-4o-mini-2024-07-18",
                              "created_at": self._tick(), "finished_at": None, "fine_tuned_model": None,
                              "organization_id": "org-fake", "result_files": [], "status": status,
                              "validation_file": None, "training_file": "file-other", "hyperparameters": {},
                              "trained_tokens": None, "error": None, "seed": 1,
                              "metadata": {"project": "someone-else"}, "suffix": "other"}
            self.events[jid] = []
            self.polls[jid] = 0

    def jobs_for(self, tag: str) -> list[dict[str, Any]]:
        return [j for j in self.jobs.values() if (j.get("metadata") or {}).get("kokoro_request") == tag
                or j.get("_tag") == tag]

    # --- helpers ---
    def _id(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n:04d}"

    def sleep(self, seconds: float) -> None:
        """The client's time.sleep: no real wait; it moves the time that list visibility goes by."""
        self.waited += float(seconds)

    def _tick(self) -> int:
        self.t += 7
        return self.t

    def _event(self, job_id: str, message: str, data: dict | None = None, level: str = "info") -> None:
        self.events[job_id].append({"object": "fine_tuning.job.event", "id": self._id("ftevent"),
                                    "created_at": self._tick(), "level": level, "message": message,
                                    "data": data or {}, "type": "metrics" if data else "message"})

    @staticmethod
    def _json(status: int, body: Any, headers: dict | None = None) -> httpx2.Response:
        return httpx2.Response(status, json=body, headers=headers or {})

    @staticmethod
    def _error(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error",
               param: str | None = None) -> httpx2.Response:
        return httpx2.Response(status, json={"error": {"message": message, "type": type_, "param": param,
                                                       "code": code}})

    @staticmethod
    def _page(items: list[dict[str, Any]], request: httpx2.Request, default_limit: int) -> dict[str, Any]:
        after = request.url.params.get("after")
        if after:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        limit = int(request.url.params.get("limit", default_limit))
        return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}

    def _public(self, job: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in job.items() if not k.startswith("_")}
        if self.azure:
            out.pop("metadata", None)        # a service that does not echo metadata
        return out

    # --- the server ---
    def handler(self, request: httpx2.Request) -> httpx2.Response:
        with self.lock:
            return self._handle(request)

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if self.azure:
            if not path.startswith("/openai/"):
                return self._error(404, "Resource not found", "404")
            if request.url.params.get("api-version") != AZURE_API_VERSION:
                return self._error(404, "Resource not found", "404")
            path = path.removeprefix("/openai")
        else:
            path = path.removeprefix("/v1")
        method = request.method
        self.calls.append((method, path))
        if self.key is not None:
            sent = (request.headers.get("api-key") if self.azure
                    else request.headers.get("authorization", "").removeprefix("Bearer "))
            if sent != self.key:
                if self.azure:
                    return self._error(401, "Access denied due to invalid subscription key or wrong API endpoint. "
                                            "Make sure to provide a valid key for an active subscription and use a "
                                            "correct regional API endpoint for your resource.", "401")
                return self._json(401, invalid_key_body(sent or ""))
        for f in self.faults:
            if f["times"] > 0 and f["method"] == method and f["re"].fullmatch(path):
                f["times"] -= 1
                if f["after_commit"]:
                    self._route(method, path, request)       # the server did it; the answer is lost
                if f["status"] == "timeout":
                    raise httpx2.ReadTimeout("fake timeout", request=request)
                if f["status"] == "drop":
                    raise httpx2.RemoteProtocolError("Server disconnected without sending a response.",
                                                     request=request)
                headers = {"retry-after-ms": str(f["retry_ms"])} if f["retry_ms"] else {}
                if f["status"] == 502:
                    return httpx2.Response(502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                           headers={"content-type": "text/html", **headers})
                return httpx2.Response(f["status"], json={"error": {"message": "The server had an error while "
                                                                    "processing your request. Sorry about that!",
                                                                    "type": "server_error", "param": None,
                                                                    "code": None}}, headers=headers)
        return self._route(method, path, request)

    def _route(self, method: str, path: str, request: httpx2.Request) -> httpx2.Response:
        if method == "POST" and path == "/files":
            body = request.read()
            fid = self._id("file")
            m = re.search(rb'name="file"; filename="([^"]+)"', body)
            name = m.group(1).decode() if m else "upload.jsonl"
            part = body[body.index(b'filename="'):]
            content = part.split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
            self.files[fid] = content
            self.file_meta[fid] = {"id": fid, "object": "file", "bytes": len(content), "created_at": self._tick(),
                                   "filename": name, "purpose": "fine-tune", "status": "processed"}
            self.bodies.append((method, path, len(content)))
            return self._json(200, self.file_meta[fid])
        if method == "GET" and path == "/files":
            purpose = request.url.params.get("purpose")
            items = sorted((m for m in self.file_meta.values() if not purpose or m["purpose"] == purpose),
                           key=lambda m: m["created_at"], reverse=True)
            return self._json(200, self._page(items, request, 10_000))
        m = re.fullmatch(r"/files/([^/]+)", path)
        if m and method == "GET":
            if m.group(1) not in self.files:
                return self._error(404, f"No such File object: {m.group(1)}", param="id")
            meta = self.file_meta.get(m.group(1)) or {"id": m.group(1), "object": "file",
                                                      "bytes": len(self.files[m.group(1)]), "created_at": 1,
                                                      "filename": "x.jsonl", "purpose": "fine-tune",
                                                      "status": "processed"}
            return self._json(200, meta)
        m = re.fullmatch(r"/files/([^/]+)/content", path)
        if m and method == "GET":
            return httpx2.Response(200, content=self.files[m.group(1)])
        if method == "POST" and path == "/fine_tuning/jobs":
            body = json.loads(request.read())
            self.bodies.append((method, path, body))
            if self.on_create is not None:
                hook, self.on_create = self.on_create, None
                self.lock.release()
                try:
                    hook()
                finally:
                    self.lock.acquire()
            if self.refuse_creation:
                return self._json(400, refused_body(body.get("model")))
            for key in ("training_file", "validation_file"):
                if body.get(key) and body[key] not in self.files:
                    return self._error(400, f"invalid {key}: {body[key]}", "invalid_file", param=key)
            jid = self._id("ftjob")
            hp = body.get("method", {}).get("supervised", {}).get("hyperparameters", {})
            job = {"object": "fine_tuning.job", "id": jid, "model": body["model"], "created_at": self._tick(),
                   "finished_at": None, "fine_tuned_model": None, "organization_id": "org-fake",
                   "result_files": [], "status": "validating_files", "validation_file": body.get("validation_file"),
                   "training_file": body["training_file"], "hyperparameters": hp, "trained_tokens": None,
                   "error": None, "seed": body.get("seed", 0), "metadata": body.get("metadata"),
                   "method": body.get("method"), "suffix": body.get("suffix"),
                   "_tag": (body.get("metadata") or {}).get("kokoro_request")}
            self.jobs[jid] = job
            self.visible_at[jid] = self.waited + self.list_lag_s
            self.events[jid] = []
            self.polls[jid] = 0
            self._event(jid, "Validating training file")
            return self._json(200, self._public(job))
        if method == "GET" and path == "/fine_tuning/jobs":
            data = sorted((j for j in self.jobs.values() if self.visible_at.get(j["id"], 0.0) <= self.waited),
                          key=lambda j: (j["created_at"], j["id"]), reverse=True)
            return self._json(200, self._page([self._public(j) for j in data], request, 20))
        m = re.fullmatch(r"/fine_tuning/jobs/([^/]+)", path)
        if m and method == "GET":
            if m.group(1) not in self.jobs:
                return self._error(404, f"Could not find fine-tuning job {m.group(1)}", "fine_tune_not_found")
            return self._json(200, self._public(self._advance(m.group(1))))
        m = re.fullmatch(r"/fine_tuning/jobs/([^/]+)/cancel", path)
        if m and method == "POST":
            job = self.jobs[m.group(1)]
            job["status"] = "cancelled"
            return self._json(200, self._public(job))
        m = re.fullmatch(r"/fine_tuning/jobs/([^/]+)/events", path)
        if m and method == "GET":
            newest_first = list(reversed(self.events[m.group(1)]))
            return self._json(200, self._page(newest_first, request, 20))
        m = re.fullmatch(r"/fine_tuning/jobs/([^/]+)/checkpoints", path)
        if m and method == "GET":
            job = self.jobs[m.group(1)]
            data = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{s}", "created_at": self._tick(),
                     "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{s}",
                     "fine_tuning_job_id": job["id"], "step_number": s,
                     "metrics": {"step": s, "train_loss": 1.0 / s, "valid_loss": 1.1 / s}}
                    for s in (self.total_steps, self.total_steps // 2)]
            return self._json(200, {"object": "list", "data": data, "has_more": False})
        m = re.fullmatch(r"(?:/deployments/([^/]+))?/chat/completions", path)
        if m and method == "POST":
            body = json.loads(request.read())
            self.bodies.append((method, path, body))
            return self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                                    "model": body.get("model") or m.group(1),
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": "お話を聞かせてください。"}}],
                                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
        return self._error(404, f"fake server: no route {method} {path}")

    def _advance(self, jid: str) -> dict[str, Any]:
        job = self.jobs[jid]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        i = self.polls[jid] = self.polls[jid] + 1
        status = self.plan[min(i, len(self.plan) - 1)]
        if status == "succeeded" and self.fail_with:
            status = "failed"
        if status != job["status"]:
            self._event(jid, f"Job status: {status}")
        if status == "running":
            running_polls = sum(1 for s in self.plan[:i + 1] if s == "running")
            per = self.total_steps // max(1, self.plan.count("running"))
            for step in range((running_polls - 1) * per + 1, running_polls * per + 1):
                self._event(jid, f"Step {step}/{self.total_steps}: training loss={2.0 / step:.3f}",
                            {"step": step, "total_steps": self.total_steps, "train_loss": 2.0 / step,
                             "valid_loss": 2.2 / step if step % 2 == 0 else None})
        job["status"] = status
        if status == "failed":
            job["error"] = self.fail_with
            job["finished_at"] = self._tick()
            self._event(jid, f"Job failed: {self.fail_with['message']}", level="error")
        if status == "succeeded":
            rid = self._id("file")
            rows = ["step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"]
            rows += [f"{s},{2.0 / s:.4f},0.5,{'' if s % 2 else f'{2.2 / s:.4f}'},{'' if s % 2 else 0.6}"
                     for s in range(1, self.total_steps + 1)]
            self.files[rid] = ("\n".join(rows) + "\n").encode()
            job.update(fine_tuned_model=f"ft:{job['model']}:org-fake:{job.get('suffix') or 'x'}:{jid[-4:]}",
                       trained_tokens=12_345, result_files=[rid], finished_at=self._tick(),
                       hyperparameters={"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8})
            job["method"] = {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
            self._event(jid, "New fine-tuned model created")
            self._event(jid, "The job has successfully completed")
        return job

    def fail_job(self, jid: str, code: str = "invalid_training_file", message: str = "The job failed validation.",
                 status: str = "failed") -> None:
        """Make an existing job end failed (or cancelled) at the service."""
        job = self.jobs[jid]
        job["status"] = status
        job["finished_at"] = self._tick()
        if status == "failed":
            job["error"] = {"code": code, "message": message, "param": "training_file"}


# --- the fake over real HTTP (for notebooks run in their own kernel by papermill / `make report`) ---------

def serve(fake: FakeOpenAI, host: str = "127.0.0.1"):
    """Serve `fake` on a loopback port; returns (base_url for OPENAI_BASE_URL, stop()). A separate
    process (a papermill kernel) then talks to it through the real SDK and real sockets."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            url = f"http://{host}:{self.server.server_address[1]}{self.path}"
            request = httpx2.Request(self.command, url, headers=dict(self.headers.items()), content=body)
            try:
                response = fake.handler(request)
            except httpx2.HTTPError:                       # a dropped connection: close without answering
                self.close_connection = True
                return
            data = response.read()
            self.send_response(response.status_code)
            for k, v in response.headers.items():
                if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(k, v)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _any

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://{host}:{server.server_address[1]}/v1", stop


if __name__ == "__main__":   # python tests/fake_openai.py --refuse : a fake to point OPENAI_BASE_URL at
    import argparse
    import signal
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refuse", action="store_true", help="refuse job creation (the wind-down)")
    ap.add_argument("--port-file", help="write the base URL here")
    args = ap.parse_args()
    url, stop = serve(FakeOpenAI(refuse_creation=args.refuse))
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(url)
    print(url, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    stop()

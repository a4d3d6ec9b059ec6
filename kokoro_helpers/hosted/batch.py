"""OpenAI's Batch API for 03 (half price, results within 24 h): the LLM judge (`judge_batch: true`)
and OpenAI models' replies (`eval_batch: true`).

    runner = BatchRunner(client, run_dir, "judge-rubric")
    results = runner.run({custom_id: chat.completions body, ...})   # {custom_id: BatchResult}

Nothing is lost: the request file's id and then the batch id are written to
`run_dir/eval/batches/<name>-<sha of the requests>.json` the moment OpenAI returns them, before any
waiting; the same call after a kernel restart (same requests, so the same state file) resumes that
batch instead of paying for a new one. Results are matched by `custom_id`, never by line order.
A batch that ends `failed`, `expired` or `cancelled` raises BatchError naming the batch and what
to do; its state file is set aside (`.ended.json`), so the next run submits a fresh batch — the
answers it did return (an expired batch keeps its finished requests) are handed back first. A
completed batch's state file is set aside too once its results are handed back (and cached by the
caller), so asking again for requests that failed in it makes a new batch.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from kokoro_helpers.jsonio import content_sha1, iter_jsonl, read_json, write_json_atomic
from kokoro_helpers.paths import resolve

ENDPOINT = "/v1/chat/completions"
DONE = {"completed", "failed", "expired", "cancelled"}


class BatchError(RuntimeError):
    """A batch ended without all its results (failed / expired / cancelled), or timed out waiting."""

    def __init__(self, message: str, partial: Mapping[str, "BatchResult"] | None = None):
        super().__init__(message)
        self.partial = dict(partial or {})


@dataclass
class BatchResult:
    custom_id: str
    text: str | None               # the reply's content, None when the request failed
    error: str | None = None
    usage: dict[str, Any] | None = None


def _requests_sha(bodies: Mapping[str, Mapping[str, Any]]) -> str:
    return content_sha1(bodies)[:12]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)[:60]


def parse_output_lines(text: str) -> dict[str, BatchResult]:
    """{custom_id: BatchResult} from a batch output or error file (JSON lines)."""
    out: dict[str, BatchResult] = {}
    for row in iter_jsonl((text or "").splitlines(), where="batch output", lenient=True):
        cid = row.get("custom_id")
        if not cid:
            continue
        response = row.get("response") or {}
        body = response.get("body") or {}
        if row.get("error") or response.get("status_code", 200) != 200:
            err = row.get("error") or body.get("error") or {}
            msg = err.get("message") if isinstance(err, dict) else str(err)
            out[cid] = BatchResult(cid, None, f"HTTP {response.get('status_code', '?')}: {msg or 'request failed'}")
            continue
        try:
            text_ = body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            out[cid] = BatchResult(cid, None, "answer without choices[0].message")
            continue
        out[cid] = BatchResult(cid, text_, None, body.get("usage"))
    return out


class BatchRunner:
    """One named batch job at a time for `client` (an `openai.OpenAI`), with its state under
    run_dir/eval/batches/."""

    def __init__(self, client: Any, run_dir: str | Path, name: str, *, poll_seconds: float = 30.0,
                 max_wait_s: float | None = None, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] | None = print):
        self.client = client
        self.folder = resolve(run_dir) / "eval" / "batches"
        self.name = _slug(name)
        self.poll_seconds = float(poll_seconds)
        self.max_wait_s = max_wait_s
        self.sleep = sleep
        self.log = log

    def _say(self, msg: str) -> None:
        if self.log is not None:
            self.log(msg)

    def state_path(self, bodies: Mapping[str, Mapping[str, Any]]) -> Path:
        return self.folder / f"{self.name}-{_requests_sha(bodies)}.json"

    def submit(self, bodies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Upload the requests and create the batch, writing each id as soon as it exists; or, when
        a state file for exactly these requests exists, return it (resume)."""
        path = self.state_path(bodies)
        state = read_json(path, {}) if path.is_file() else {}
        if state.get("batch_id"):
            self._say(f"batch {self.name}: resuming {state['batch_id']} (from {path.name})")
            return state
        self.folder.mkdir(parents=True, exist_ok=True)
        state.update({"name": self.name, "requests": len(bodies), "endpoint": ENDPOINT, "state_file": path.name})
        if not state.get("input_file_id"):
            lines = "".join(json.dumps({"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": dict(body)},
                                       ensure_ascii=False) + "\n" for cid, body in bodies.items())
            upload = self.client.files.create(file=(f"{path.stem}.jsonl", io.BytesIO(lines.encode("utf-8"))),
                                              purpose="batch")
            state["input_file_id"] = upload.id
            write_json_atomic(path, state)
        batch = self.client.batches.create(input_file_id=state["input_file_id"], endpoint=ENDPOINT,
                                           completion_window="24h", metadata={"kokoro": self.name})
        state["batch_id"] = batch.id
        state["created_at"] = getattr(batch, "created_at", None)
        write_json_atomic(path, state)                   # before any waiting: a restart resumes it
        self._say(f"batch {self.name}: submitted {batch.id} with {len(bodies)} requests; its id is in {path}")
        return state

    def wait(self, batch_id: str) -> Any:
        """Poll until the batch ends; progress at each poll."""
        waited = 0.0
        last = None
        while True:
            batch = self.client.batches.retrieve(batch_id)
            counts = getattr(batch, "request_counts", None)
            line = (f"batch {self.name} {batch_id}: {batch.status}"
                    + (f" ({counts.completed}/{counts.total} done, {counts.failed} failed)" if counts else ""))
            if line != last:
                self._say(line)
                last = line
            if batch.status in DONE:
                return batch
            if self.max_wait_s is not None and waited >= self.max_wait_s:
                raise BatchError(f"batch {batch_id} still {batch.status} after {waited:.0f} s; its id is kept in "
                                 f"{self.folder}: re-run the cell later to resume it (nothing is paid twice)")
            self.sleep(self.poll_seconds)
            waited += self.poll_seconds

    def _file_text(self, file_id: str | None) -> str:
        if not file_id:
            return ""
        return self.client.files.content(file_id).text

    def run(self, bodies: Mapping[str, Mapping[str, Any]]) -> dict[str, BatchResult]:
        """Every request's result by custom_id (requests missing from the output count as failed)."""
        if not bodies:
            return {}
        path = self.state_path(bodies)
        state = self.submit(bodies)
        batch = self.wait(state["batch_id"])
        results = parse_output_lines(self._file_text(getattr(batch, "output_file_id", None)))
        for cid, r in parse_output_lines(self._file_text(getattr(batch, "error_file_id", None))).items():
            results.setdefault(cid, r)
        if batch.status != "completed":
            errors = getattr(batch, "errors", None)
            detail = "; ".join(f"{e.code}: {e.message}" for e in (getattr(errors, "data", None) or [])[:3])
            ended = path.with_name(path.stem + f".{batch.status}.ended.json")
            path.replace(ended)
            raise BatchError(f"batch {batch.id} ended '{batch.status}'" + (f" ({detail})" if detail else "")
                             + f" with {sum(r.text is not None for r in results.values())} of {len(bodies)} answers; "
                             f"its record is {ended.name}. Re-run to submit a new batch (answers already "
                             f"returned are kept), or set the *_batch option to false to ask request by request.",
                             partial=results)
        for cid in bodies:
            results.setdefault(cid, BatchResult(cid, None, "missing from the batch output"))
        state["status"] = "completed"
        state["output_file_id"] = getattr(batch, "output_file_id", None)
        write_json_atomic(path, state)
        # handed back (the callers cache every answer at once): the same requests later get a new batch,
        # so a request that failed in this one is asked again rather than read back failed
        path.replace(path.with_name(path.stem + ".completed.ended.json"))
        return {cid: results[cid] for cid in bodies}

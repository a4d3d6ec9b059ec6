"""Local generation with a loaded model and tokenizer: one reply, many replies batched, or one reply streamed.

    batch_generate(model, tokenizer, list_of_conversations, max_new_tokens=64, temperature=0)
    generate(model, tokenizer, messages)                         # a batch of one
    for delta in stream_generate(model, tokenizer, messages): print(delta, end="")

What it guarantees:

- **Generation.** Messages go through the chat template with the generation prompt
  (:mod:`kokoro_helpers.local.prompts`); greedy at ``temperature=0``, otherwise sampling with
  ``temperature``/``top_p`` from ``seed`` (other sampling defaults of the model's
  ``generation_config``, e.g. Qwen's ``top_k`` and ``repetition_penalty``, still apply when
  sampling); generation stops at the end-of-turn token (the template's, e.g. ``<|im_end|>``). A
  conversation longer than the model's context loses its oldest turns first, never silently (a
  warning, and ``Generation.dropped_messages``).
- **Batches.** Left padding with attention masks (position ids follow the mask), prompts sorted
  by length so padding stays small, results in input order; on a CUDA out-of-memory error the
  batch is halved and retried (a warning says so) instead of the run being lost.
"""
from __future__ import annotations

import math
import queue
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from kokoro_helpers.local.prompts import (ContextLengthError, FittedPrompt, Messages, context_length,
                                          end_of_turn_ids, fit_prompt)


class GenerationOOMError(RuntimeError):
    """Out of GPU memory even with one prompt per batch."""


@dataclass
class Generation:
    """One reply and how it came about (``return_details=True``)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                 # "stop" (end of turn) | "length" (max_new_tokens reached)
    dropped_messages: int = 0          # oldest turns dropped to fit the context


@dataclass
class _Prepared:
    prompts: list[list[int]]
    dropped: list[int]
    stop_ids: list[int]
    pad_id: int
    gen_kwargs: dict[str, Any]
    device: Any


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch
        return torch.device("cpu")


def _check_settings(max_new_tokens: int, temperature: float, top_p: float | None, min_new_tokens: int | None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is None or not math.isfinite(float(temperature)) or float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_new_tokens is not None and not 0 <= int(min_new_tokens) <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens, got {min_new_tokens!r}")


def _prepare(model, tokenizer, conversations: Sequence[Messages], max_new_tokens: int, temperature: float,
             top_p: float | None, min_new_tokens: int | None, stop_tokens: Iterable[str]) -> _Prepared:
    _check_settings(max_new_tokens, temperature, top_p, min_new_tokens)
    limit = context_length(model, tokenizer)
    room = None if limit is None else limit - max_new_tokens
    prompts, dropped = [], []
    for conv in conversations:
        if isinstance(conv, FittedPrompt):          # fitted by the caller (the server, outside the lock)
            if room is not None and len(conv.ids) > room:
                raise ContextLengthError(len(conv.ids), room)
            ids, n = conv.ids, 0
        else:
            ids, n = fit_prompt(tokenizer, conv, room)
        prompts.append(ids)
        dropped.append(n)
    cut = sum(1 for n in dropped if n)
    if cut:
        warnings.warn(f"{cut} conversation(s) longer than the model's context ({limit} tokens, {max_new_tokens} kept "
                      f"for the reply): their oldest turns were dropped ({sum(dropped)} message(s) in all)",
                      stacklevel=3)
    stop_ids = end_of_turn_ids(model, tokenizer, stop_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "eos_token_id": stop_ids or None,
                              "pad_token_id": pad_id}
    if float(temperature) > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p if top_p is not None else 1.0))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if min_new_tokens:
        kwargs["min_new_tokens"] = int(min_new_tokens)
    return _Prepared(prompts, dropped, stop_ids, pad_id, kwargs, _model_device(model))


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _finish(tokenizer, new_ids: Sequence[int], stop_ids: Sequence[int], pad_id: int, prompt_len: int,
            dropped: int) -> Generation:
    """Cut a generated row at its first end-of-turn token; decode without special tokens."""
    out: list[int] = []
    reason = "length"
    stops = set(stop_ids)
    for t in new_ids:
        if t in stops:
            reason = "stop"
            break
        out.append(int(t))
    text = tokenizer.decode(out, skip_special_tokens=True).strip()
    return Generation(text=text, token_ids=out, prompt_tokens=prompt_len,
                      completion_tokens=len(out) + (1 if reason == "stop" else 0), finish_reason=reason,
                      dropped_messages=dropped)


def _is_oom(exc: BaseException) -> bool:
    """torch's out-of-memory error, or any error accelerate would lower the batch size for."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or should_reduce_batch_size(exc)


@contextmanager
def _seeded(seed: int | None, device):
    """Seed torch's generators inside the block and restore them after (the caller's RNG untouched)."""
    import torch

    if seed is None:
        yield
        return
    devices = [device.index or 0] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _run_batch(model, prep: _Prepared, rows: Sequence[int]) -> list[list[int]]:
    import torch

    prompts = [prep.prompts[i] for i in rows]
    ids, mask = _left_pad(prompts, prep.pad_id, prep.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*generation flags are not valid.*")
        out = model.generate(input_ids=ids, attention_mask=mask, **prep.gen_kwargs)
    return out[:, ids.shape[1]:].tolist()


def batch_generate(model, tokenizer, conversations: Sequence[Messages], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float | None = None, seed: int | None = None, *,
                   batch_size: int = 8, min_new_tokens: int | None = None, stop_tokens: Iterable[str] = (),
                   return_details: bool = False, progress: bool = False,
                   on_batch: Callable[[list[int], list[Generation]], None] | None = None) -> list[Any]:
    """Replies to many conversations (the seeds' ``batch_generate``), in input order.

    Prompts go through the chat template with the generation prompt, are sorted by length
    (longest first, so an out-of-memory error shows up at once) and generated ``batch_size`` at
    a time with left padding and attention masks; each reply ends at the end-of-turn token.
    ``temperature=0`` is greedy (``top_p`` unused); otherwise sampling, reproducible with
    ``seed`` for the same batch composition. ``min_new_tokens`` forbids the end of turn before
    that many tokens (the benchmark forces equal lengths with it). On a CUDA out-of-memory error
    the batch is halved and retried (down to one prompt) and the smaller size kept.

    Returns the replies' text, or :class:`Generation` objects with ``return_details=True``.
    ``on_batch(indices, generations)`` is called after each batch (progress, caching).
    """
    conversations = list(conversations)
    if not conversations:
        return []
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    prep = _prepare(model, tokenizer, conversations, max_new_tokens, temperature, top_p, min_new_tokens, stop_tokens)
    order = sorted(range(len(conversations)), key=lambda i: -len(prep.prompts[i]))
    results: list[Generation | None] = [None] * len(conversations)
    size = int(batch_size)
    bar = None
    if progress:
        from kokoro_helpers.progress import tqdm
        bar = tqdm(total=len(conversations), desc="generate", unit="prompt")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with _seeded(seed, prep.device):
            start = 0
            while start < len(order):
                rows = order[start:start + size]
                try:
                    new = _run_batch(model, prep, rows)
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    from accelerate.utils.memory import clear_device_cache
                    clear_device_cache(garbage_collection=True)
                    if size == 1:
                        raise GenerationOOMError(
                            f"out of GPU memory generating one prompt of {len(prep.prompts[rows[0]])} tokens with "
                            f"max_new_tokens={max_new_tokens}: lower max_new_tokens, shorten the context, or use a "
                            "smaller base / a GPU with more memory") from exc
                    size = max(1, size // 2)
                    warnings.warn(f"CUDA out of memory at batch size {len(rows)}: retrying with batch size {size}",
                                  stacklevel=2)
                    continue
                done = []
                for row, ids in zip(rows, new):
                    results[row] = _finish(tokenizer, ids, prep.stop_ids, prep.pad_id, len(prep.prompts[row]),
                                           prep.dropped[row])
                    done.append(results[row])
                if on_batch is not None:
                    on_batch(list(rows), done)
                if bar is not None:
                    bar.update(len(rows))
                start += len(rows)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    final = [r for r in results if r is not None]
    return final if return_details else [r.text for r in final]


def generate(model, tokenizer, messages: Messages, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float | None = None, seed: int | None = None, *, min_new_tokens: int | None = None,
             stop_tokens: Iterable[str] = (), return_details: bool = False) -> Any:
    """One reply to one conversation (a batch of one; the same settings as :func:`batch_generate`)."""
    return batch_generate(model, tokenizer, [messages], max_new_tokens, temperature, top_p, seed, batch_size=1,
                          min_new_tokens=min_new_tokens, stop_tokens=stop_tokens, return_details=return_details)[0]


def per_prompt_generate(model, tokenizer, conversations: Sequence[Messages], **kwargs: Any) -> list[Any]:
    """The seeds' loop: one ``generate`` call per prompt, no padding (the benchmark's baseline)."""
    return [generate(model, tokenizer, conv, **kwargs) for conv in conversations]


# ----------------------------------------------------------------------- streaming

class _DeltaStreamer:
    """A transformers streamer that turns generated ids into text deltas on a queue.

    Unlike ``TextIteratorStreamer`` it does not wait for a space or a CJK ideograph before
    releasing text (Japanese kana would arrive in bursts): every complete character goes out
    at once. Only an incomplete byte sequence (``\\ufffd`` at the end) and trailing whitespace
    (stripped at the end, as the non-streaming reply is) are held back."""

    _END = object()

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.sent = 0                   # characters of the decoded text already sent
        self.prompt_seen = False
        self.stopped = False
        self.queue: "queue.Queue[Any]" = queue.Queue()

    def put(self, value) -> None:
        if not self.prompt_seen:        # generate() first puts the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        for t in value.reshape(-1).tolist():
            if int(t) in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(int(t))
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if not final:
            if text.endswith("\ufffd"):
                return
            text = text.rstrip()
        else:
            text = text.rstrip()
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        self._emit(final=True)
        self.queue.put(self._END)


def stream_generate(model, tokenizer, messages: Messages, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_p: float | None = None, seed: int | None = None, *, min_new_tokens: int | None = None,
                    stop_tokens: Iterable[str] = (), details: dict[str, Any] | None = None,
                    timeout_s: float | None = 600.0, cancel: threading.Event | None = None) -> Iterator[str]:
    """The reply's text, yielded piece by piece as tokens are generated (``model.generate`` runs in a
    thread with a streamer). Joined, the pieces equal :func:`generate`'s reply for the same
    settings. Closing the iterator early stops generation at the next token. ``details``, when
    given, is filled at the end with ``prompt_tokens``, ``completion_tokens``, ``finish_reason``
    and ``dropped_messages``. ``cancel``: an event that, once set (e.g. by a server whose client went
    away), stops generation at the next token as closing does."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    prep = _prepare(model, tokenizer, [messages], max_new_tokens, temperature, top_p, min_new_tokens, stop_tokens)
    streamer = _DeltaStreamer(tokenizer, prep.stop_ids)
    external = cancel
    cancel = threading.Event()
    failure: list[BaseException] = []

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = cancel.is_set() or (external is not None and external.is_set())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    ids, mask = _left_pad(prep.prompts, prep.pad_id, prep.device)

    def work() -> None:
        try:
            with torch.no_grad(), _seeded(seed, prep.device), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*generation flags are not valid.*")
                model.generate(input_ids=ids, attention_mask=mask, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Cancelled()]), **prep.gen_kwargs)
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
            streamer.queue.put(_DeltaStreamer._END)

    was_training = getattr(model, "training", False)
    model.eval()
    thread = threading.Thread(target=work, name="kokoro-stream", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = streamer.queue.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no token for {timeout_s} s: generation seems stuck") from None
            if item is _DeltaStreamer._END:
                break
            yield item
        if failure:
            raise failure[0]
        if details is not None:
            details.update(prompt_tokens=len(prep.prompts[0]), finish_reason="stop" if streamer.stopped else "length",
                           completion_tokens=len(streamer.ids) + (1 if streamer.stopped else 0),
                           dropped_messages=prep.dropped[0])
    finally:
        cancel.set()
        thread.join()
        if was_training:
            model.train()

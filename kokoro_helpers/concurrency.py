"""Calls on a bounded thread pool, results handed back in the caller's thread as they complete."""
from __future__ import annotations

import itertools
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence

from kokoro_helpers.progress import tqdm


def run_concurrently(fn: Callable[[Any], Any], inputs: Sequence[Any], concurrency: int = 4,
                     on_result: Callable[[int, Any], None] | None = None, progress: bool = True,
                     desc: str = "") -> list[Any]:
    """fn(x) for every input on at most `concurrency` threads; results in input order.

    Results are handed to `on_result(index, value)` in the calling thread as they complete (so the
    caller can write them to disk without locks). No more than `concurrency` calls are ever in
    flight. The first exception stops new work, waits for the calls in flight (their results
    are still handed over) and is re-raised; so is KeyboardInterrupt."""
    n = len(inputs)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    concurrency = max(1, int(concurrency))
    bar = tqdm(total=n, desc=desc, unit="item", disable=not progress)
    pending = iter(range(n))
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        running = {}
        try:
            for i in itertools.islice(pending, concurrency):
                running[pool.submit(fn, inputs[i])] = i
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = running.pop(fut)
                    try:
                        value = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        error = error or exc
                        continue
                    results[i] = value
                    if on_result is not None:
                        on_result(i, value)
                    bar.update(1)
                    if error is None:
                        nxt = next(pending, None)
                        if nxt is not None:
                            running[pool.submit(fn, inputs[nxt])] = nxt
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
        finally:
            bar.close()
    if error is not None:
        raise error
    return results

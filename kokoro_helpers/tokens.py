"""Token counting as OpenAI bills chat fine-tuning: tiktoken `o200k_base`, or a labelled estimate.

The encoding is named explicitly: `o200k_base` is the encoding of gpt-4o-mini and gpt-4.1
(tiktoken's model lookup maps `ft:gpt-4.1-...` ids to the wrong one). tiktoken downloads the
encoding file on first use; offline (as on this project's machines) that fails, so the counter
falls back to an *estimate* and says so in its `name` (`estimate:...`), which `stats.json`
records as `token_counter`. To get exact counts offline, put the file in tiktoken's cache with
`install_encoding_file("path/to/o200k_base.tiktoken")`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from itertools import repeat
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ENCODING = "o200k_base"
ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
TOKENS_PER_MESSAGE = 3  # <|im_start|>{role}\n ... <|im_end|>, per OpenAI's counting guidance
REPLY_PRIMING = 3       # every reply is primed with <|im_start|>assistant<|message|>
TOKENS_PER_NAME = 1     # a message's `name` costs its tokens + 1 (OpenAI's num_tokens_from_messages)

# Estimate for Japanese text without the encoding file: ~0.6 tokens per non-ASCII character
# (KOKOROCHAT.md's rough 11.6 M tokens / 17 M characters, less message overhead), ~1 per 4 ASCII.
EST_NON_ASCII = 0.6
EST_ASCII = 0.25
_ROLE, _CONTENT = itemgetter("role"), itemgetter("content")
ESTIMATE_NAME = f"estimate:{EST_NON_ASCII}/non-ASCII char+{EST_ASCII}/ASCII char (no {ENCODING} file)"


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for its encoding files (its own rule)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _cache_file() -> Path:
    return tiktoken_cache_dir() / hashlib.sha1(ENCODING_URL.encode()).hexdigest()


def install_encoding_file(path: str | Path) -> Path:
    """Copy a downloaded `o200k_base.tiktoken` into tiktoken's cache so counts become exact offline."""
    target = _cache_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return target


def _estimate(text: str) -> int:
    n = len(text)
    non_ascii = n - len(text.encode("ascii", "ignore"))   # exact, at C speed
    return int(non_ascii * EST_NON_ASCII + (n - non_ascii) * EST_ASCII + 0.999)


def _estimate_many(texts: list[str]) -> list[int]:
    """[_estimate(t) for t in texts], without a Python call per text."""
    na_rate, a_rate = EST_NON_ASCII, EST_ASCII
    ascii_lens = map(len, map(str.encode, texts, repeat("ascii"), repeat("ignore")))
    return [int((n - a) * na_rate + a * a_rate + 0.999) for n, a in zip(map(len, texts), ascii_lens)]


@dataclass
class TokenCounter:
    """Counts tokens of texts and of chat examples. `name` is what `stats.json` records."""

    name: str
    encode: Callable[[str], Sequence[int]] | None = None
    _batch: Callable[[list[str]], list[Sequence[int]]] | None = field(default=None, repr=False)

    @property
    def is_estimate(self) -> bool:
        return self.name.startswith("estimate:")

    def count(self, text: str) -> int:
        return len(self.encode(text)) if self.encode else _estimate(text)

    def count_many(self, texts: list[str]) -> list[int]:
        if self.encode is None:
            return _estimate_many(texts)
        if self._batch is not None:
            return [len(ids) for ids in self._batch(texts)]
        return [len(self.encode(t)) for t in texts]

    def message_costs(self, messages: list[dict[str, Any]]) -> list[int]:
        """Tokens each message adds: 3 + its string values (role, content, name), +1 with a name — OpenAI's rule."""
        # fast path, same numbers: every message is a plain dict of exactly a str role and a str
        # content (no name, no weight); each distinct role string is counted once
        if messages and set(map(type, messages)) == {dict} and set(map(len, messages)) == {2}:
            try:
                roles, contents = list(map(_ROLE, messages)), list(map(_CONTENT, messages))
            except KeyError:
                roles = contents = None
            if roles is not None and set(map(type, roles)) == {str} and set(map(type, contents)) == {str}:
                unique = list(set(roles))
                role_tokens = dict(zip(unique, self.count_many(unique)))
                return [TOKENS_PER_MESSAGE + role_tokens[r] + n for r, n in zip(roles, self.count_many(contents))]
        texts, sizes = [], []
        for m in messages:
            vals = [v for k, v in m.items() if isinstance(v, str) and k != "weight"]
            texts.extend(vals)
            sizes.append(len(vals))
        counts = self.count_many(texts)
        out, i = [], 0
        for m, k in zip(messages, sizes):
            out.append(TOKENS_PER_MESSAGE + sum(counts[i:i + k]) + ("name" in m) * TOKENS_PER_NAME)
            i += k
        return out

    def count_messages(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of one chat example, assistant tokens included, +3 reply priming."""
        return sum(self.message_costs(messages)) + REPLY_PRIMING


def estimate_counter() -> TokenCounter:
    return TokenCounter(name=ESTIMATE_NAME)


def _load_encoding(timeout: float):
    """tiktoken's encoding, or None if it can't be had within `timeout` seconds (no network)."""
    try:
        import tiktoken
    except ImportError:
        return None
    box: dict[str, Any] = {}

    def target():
        try:
            box["enc"] = tiktoken.get_encoding(ENCODING)
        except Exception as exc:  # offline: a connection error, whatever the HTTP library
            box["err"] = exc

    if _cache_file().is_file() or os.environ.get("KOKORO_TIKTOKEN_OFFLINE") != "1":
        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(timeout)
    return box.get("enc")


_CACHED: dict[str, TokenCounter] = {}


def get_token_counter(encoding: Any = None, timeout: float = 8.0) -> TokenCounter:
    """The project's token counter.

    `encoding`: an object with `.encode(str)` (e.g. a tiktoken Encoding — tests inject one),
    else tiktoken's `o200k_base` if it loads within `timeout` seconds, else the labelled estimate.
    Set KOKORO_TIKTOKEN_OFFLINE=1 to skip the download attempt when the file is not cached.
    """
    if encoding is not None:
        name = getattr(encoding, "name", None) or "injected"
        batch = getattr(encoding, "encode_ordinary_batch", None)
        return TokenCounter(name=str(name), encode=encoding.encode, _batch=batch)
    if "auto" in _CACHED:
        return _CACHED["auto"]
    enc = _load_encoding(timeout)
    if enc is None:
        counter = estimate_counter()
    else:
        counter = TokenCounter(name=ENCODING, encode=enc.encode_ordinary,
                               _batch=lambda texts: enc.encode_ordinary_batch(texts, num_threads=4))
    _CACHED["auto"] = counter
    return counter


def total_tokens(counter: TokenCounter, examples: Iterable[list[dict[str, Any]]]) -> int:
    return sum(counter.count_messages(m) for m in examples)

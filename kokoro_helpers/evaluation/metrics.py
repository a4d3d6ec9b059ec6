"""03_eval's automatic metrics, at character level (suited to Japanese: no word segmenter).

chrF and BLEU come from sacrebleu (`CHRF()`, `BLEU(tokenize="char")`); ROUGE-L over characters
is implemented here (a plain LCS), because the maintained `rouge-score` package tokenizes with an
ASCII-only default that turns Japanese into nothing (scores of 0). Plus reply length, distinct-n,
and — for local models — the perplexity of the real reply (`perplexity_of_references`).

    metrics = compute_metrics(generations, items, perplexity=ppl)   # one row per model
    write_metrics(metrics, run_dir); plot_metrics(metrics)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers.progress import tqdm

from kokoro_helpers.jsonio import atomic_write
from kokoro_helpers.evaluation.evaluate import EvalError, Item, eval_dir, generation_rows, text_chars

# =================================================================================================
# 3. Automatic metrics (character level)
# =================================================================================================

def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-L over characters (whitespace removed): P = LCS/len(hyp), R = LCS/len(ref),
    F = 2PR/(P+R) (the F1 that rouge-score reports). Empty strings score 0."""
    h, r = text_chars(hypothesis), text_chars(reference)
    lcs = lcs_length(h, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    p, rec = lcs / len(h), lcs / len(r)
    return {"precision": p, "recall": rec, "f": 2 * p * rec / (p + rec)}


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n over characters (Li et al., 2016): unique n-grams / all n-grams, pooled over all
    texts (whitespace removed, n-grams never cross texts). NaN when there are no n-grams."""
    total = 0
    unique: set[str] = set()
    for text in texts:
        s = text_chars(text)
        grams = [s[i:i + n] for i in range(len(s) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else float("nan")


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, β=2, whitespace ignored), 0..100."""
    from sacrebleu.metrics import CHRF
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def bleu_char(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU over characters (sacrebleu, tokenize="char": every character a token, 4-grams,
    whitespace dropped), 0..100."""
    from sacrebleu.metrics import BLEU
    return float(BLEU(tokenize="char").corpus_score(list(hypotheses), [list(references)]).score)


def metric_signatures() -> dict[str, str]:
    """sacrebleu's signatures of the chrF and BLEU used here (quote them with the numbers)."""
    from sacrebleu.metrics import BLEU, CHRF
    out = {}
    for name, metric in (("chrF", CHRF()), ("BLEU_char", BLEU(tokenize="char"))):
        metric.corpus_score(["あ"], [["あ"]])        # sacrebleu knows the signature only after a use
        out[name] = str(metric.get_signature())
    return out


METRIC_DESCRIPTIONS = {
    "n_items": "items with a reply",
    "chrF": "corpus chrF vs the real reply (sacrebleu, char 6-grams, β=2), 0-100",
    "BLEU_char": "corpus BLEU over characters (sacrebleu tokenize='char'), 0-100",
    "ROUGE_L_char": "mean ROUGE-L F1 over characters (LCS), 0-1",
    "length_chars": "mean reply length in characters (whitespace removed)",
    "ref_length_chars": "mean length of the real replies to the same items",
    "distinct_1": "unique character unigrams / all, pooled over replies",
    "distinct_2": "unique character bigrams / all, pooled over replies",
    "empty_replies": "replies with no characters",
    "ref_nll": "local models: mean token NLL of the real reply given the context (nats)",
    "ref_ppl": "local models: perplexity of the real reply, exp(ref_nll)",
    "ref_tokens": "local models: reference tokens scored",
}


def _metric_row(hyps: list[str], refs: list[str]) -> dict[str, Any]:
    return {
        "n_items": len(hyps),
        "chrF": chrf(hyps, refs),
        "BLEU_char": bleu_char(hyps, refs),
        "ROUGE_L_char": sum(rouge_l(h, r)["f"] for h, r in zip(hyps, refs)) / len(hyps),
        "length_chars": sum(len(text_chars(h)) for h in hyps) / len(hyps),
        "ref_length_chars": sum(len(text_chars(r)) for r in refs) / len(refs),
        "distinct_1": distinct_n(hyps, 1),
        "distinct_2": distinct_n(hyps, 2),
        "empty_replies": sum(1 for h in hyps if not text_chars(h)),
    }


def _perplexity_columns(result: Mapping[str, Any], item_ids: Sequence[str] | None) -> dict[str, Any]:
    """ref_nll / ref_ppl / ref_tokens of a perplexity result, restricted to `item_ids` (token-
    weighted) when the result has per-item values, else its overall figures."""
    per_item = result.get("per_item")
    if item_ids is not None and isinstance(per_item, Mapping) and per_item:
        parts = [per_item[i] for i in item_ids if i in per_item]
        tokens = sum(p["tokens"] for p in parts)
        if not tokens:
            return {"ref_nll": float("nan"), "ref_ppl": float("nan"), "ref_tokens": 0}
        nll = sum(p["nll"] * p["tokens"] for p in parts) / tokens
        return {"ref_nll": nll, "ref_ppl": math.exp(nll), "ref_tokens": tokens}
    return {"ref_nll": result.get("ref_nll"), "ref_ppl": result.get("ref_ppl"), "ref_tokens": result.get("ref_tokens")}


def compute_metrics(generations: Any, items: Sequence[Item], *, perplexity: Mapping[str, Mapping[str, Any]] | None = None,
                    by: str | None = None, include_reference: bool = False):
    """Automatic metrics, one row per model (index `model`), one column per metric
    (see METRIC_DESCRIPTIONS). `generations`: generate_all's DataFrame, its rows, or the path of
    generations.jsonl; only rows whose item_id is in `items` count. `perplexity`:
    {model name: perplexity_of_references(...)} adds ref_nll / ref_ppl / ref_tokens over the
    same items (NaN for models without one). `by="split"`: one row per (model, split) instead.
    `include_reference`: a row "(reference)" with the real replies' own length and distinct-n
    (its overlap metrics are NaN). Every model is scored against the same references; a model
    with fewer replies than others shows it in n_items."""
    import pandas as pd
    if by not in (None, "split"):
        raise ValueError(f"by must be None or 'split', got {by!r}")
    by_id = {it["item_id"]: it for it in items}
    groups: dict[tuple, tuple[list[str], list[str], list[str]]] = {}
    for row in generation_rows(generations):
        it = by_id.get(row.get("item_id"))
        if it is None:
            continue
        key = (row["model"], it["split"]) if by == "split" else (row["model"],)
        hyps, refs, ids = groups.setdefault(key, ([], [], []))
        response = row.get("response")
        hyps.append(response if isinstance(response, str) else "")
        refs.append(it["reference"])
        ids.append(it["item_id"])
    if not groups:
        raise EvalError("no generation matches these items: run generate_all on the same items")
    records = []
    for key, (hyps, refs, ids) in groups.items():
        rec = {"model": key[0], **({"split": key[1]} if by == "split" else {}), **_metric_row(hyps, refs)}
        if perplexity:
            result = perplexity.get(key[0])
            if result:
                rec.update(_perplexity_columns(result, [i for i in by_id if by is None or by_id[i]["split"] == key[1]]))
            else:
                rec.update({"ref_nll": float("nan"), "ref_ppl": float("nan"), "ref_tokens": float("nan")})
        records.append(rec)
    if include_reference:
        splits = sorted({it["split"] for it in items}) if by == "split" else [None]
        for split in splits:
            refs = [it["reference"] for it in items if split is None or it["split"] == split]
            rec = {"model": "(reference)", **({"split": split} if by == "split" else {}),
                   "n_items": len(refs), "chrF": float("nan"), "BLEU_char": float("nan"),
                   "ROUGE_L_char": float("nan"), "length_chars": sum(len(text_chars(r)) for r in refs) / len(refs),
                   "ref_length_chars": sum(len(text_chars(r)) for r in refs) / len(refs),
                   "distinct_1": distinct_n(refs, 1), "distinct_2": distinct_n(refs, 2),
                   "empty_replies": sum(1 for r in refs if not text_chars(r))}
            records.append(rec)
    frame = pd.DataFrame(records)
    frame = frame.set_index(["model", "split"] if by == "split" else "model")
    frame.attrs["signatures"] = metric_signatures()
    return frame


def write_metrics(df: Any, run_dir: str | Path, name: str = "metrics.csv") -> Path:
    """Write the metrics table to run_dir/eval/<name> (atomically)."""
    path = eval_dir(run_dir) / name
    with atomic_write(path) as f:
        df.to_csv(f, float_format="%.6g")
    return path


def plot_metrics(df: Any, metrics: Sequence[str] | None = None, ncols: int = 3):
    """One horizontal bar chart per metric, one bar per model (labels in English so no CJK font is
    needed). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    default = ["chrF", "BLEU_char", "ROUGE_L_char", "length_chars", "distinct_1", "distinct_2", "ref_ppl"]
    metrics = [m for m in (metrics or default) if m in df.columns and df[m].notna().any()]
    if not metrics:
        raise EvalError("no metric column to plot")
    ncols = max(1, min(ncols, len(metrics)))
    nrows = math.ceil(len(metrics) / ncols)
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in df.index]
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 0.5 * len(labels) * nrows + 1.8 * nrows),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        pairs = [(lab, float(v)) for lab, v in zip(labels, df[metric].astype(float)) if not math.isnan(v)]
        names, values = [p[0] for p in pairs], [p[1] for p in pairs]   # rows without this metric left out
        ax.barh(names[::-1], values[::-1], color="#4c72b0")
        ax.set_title(metric)
        ax.set_xlabel(METRIC_DESCRIPTIONS.get(metric, metric), fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        for y, v in enumerate(values[::-1]):
            ax.annotate(f"{v:.3g}", (v, y), xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def _forward_kept_logits(model: Any, ids: Any, mask: Any, keep: int) -> Any:
    """Logits of the last `keep` positions of a left-padded batch. Position ids follow the mask
    (so padding does not shift positions); `logits_to_keep` spares the (batch × length × vocab)
    logits where the model supports it, else the full logits are sliced."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep)
    except TypeError:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    logits = out.logits
    return logits[:, -keep:] if logits.shape[1] != keep else logits


def reference_perplexities(models: Iterable[Any], items: Sequence[Item], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """{name: perplexity_of_references(...)} for every model whose weights are on this machine (each loaded
    if needed); models behind an API give no token probabilities for a given reply and are left out."""
    out = {}
    for m in models:
        weights = m.weights() if hasattr(m, "weights") else None
        if weights is None:
            continue
        with weights as (model, tokenizer):
            out[m.name] = perplexity_of_references(model, tokenizer, items, desc=f"perplexity {m.name}", **kwargs)
    return out


def _split_ids(tokenizer: Any, prompt: str, reference: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + reference`` tokenized as one text, split where the reference starts
    (a token that spans the boundary counts as the reference's). A tokenizer without offsets
    (a slow one) tokenizes the two parts apart."""
    text = prompt + reference
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return (list(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                list(tokenizer(reference, add_special_tokens=False)["input_ids"]))
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    cut = next((k for k, (_, end) in enumerate(offsets) if end > len(prompt)), len(ids))
    return ids[:cut], ids[cut:]


def perplexity_of_references(model: Any, tokenizer: Any, items: Sequence[Item], *, batch_size: int = 8,
                             max_length: int | None = None, progress: bool = True,
                             desc: str = "perplexity") -> dict[str, Any]:
    """Mean token negative log-likelihood of each real reply given its context, for a Hugging Face
    causal LM and a tokenizer with a chat template.

    The prompt is rendered as generation renders it (`prompts.render_prompt`: the chat template
    with the generation prompt and the adapter's system_prompt_mode); prompt + reference are
    tokenized as one text (no special tokens added: the template writes its own BOS), and the
    tokens whose characters lie in the reference are scored — so the ids are the tokenizer's own
    tokenization of the text, with no spurious word-start token at the reply's start (SentencePiece
    tokenizers). The end-of-turn token is the template's, not the reply's, and is not scored. When prompt + reference
    exceed `max_length` (default: the model's max_position_embeddings) the *context* is cut from
    the left and the item counted in `truncated`; a reference that alone does not fit is skipped
    and counted in `skipped`. Batched (left padding, position ids from the mask, sorted by length)
    and only the logits of the reference positions are kept.

    Returns {ref_nll (mean over all reference tokens, nats), ref_ppl = exp(ref_nll), ref_tokens,
    items, truncated, skipped, per_item: {item_id: {"nll": mean NLL, "tokens": n}}}."""
    import torch

    limit = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    encoded = []
    truncated = skipped = 0
    from kokoro_helpers.local.prompts import render_prompt   # the prompt exactly as generation renders it

    for it in items:
        prompt_ids, ref_ids = _split_ids(tokenizer, render_prompt(tokenizer, list(it["context"])), it["reference"])
        if not ref_ids or not prompt_ids:
            skipped += 1
            continue
        if limit and len(prompt_ids) + len(ref_ids) > limit:
            keep = int(limit) - len(ref_ids)
            if keep < 1:
                skipped += 1
                continue
            prompt_ids = prompt_ids[-keep:]
            truncated += 1
        encoded.append((it["item_id"], prompt_ids, ref_ids))
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]) + len(encoded[i][2]))
    step = max(1, int(batch_size))
    per_item: dict[str, dict[str, float]] = {}
    total_nll, total_tokens = 0.0, 0
    was_training = getattr(model, "training", False)
    model.eval()
    bar = tqdm(total=len(encoded), desc=desc, unit="item", disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), step):
                batch = [encoded[i] for i in order[start:start + step]]
                width = max(len(p) + len(r) for _, p, r in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for b, (_, p, r) in enumerate(batch):
                    ids[b, width - len(p) - len(r):] = torch.tensor(p + r)
                    mask[b, width - len(p) - len(r):] = 1
                keep = max(len(r) for _, _, r in batch) + 1
                logits = _forward_kept_logits(model, ids.to(device), mask.to(device), keep)
                for b, (item_id, _, r) in enumerate(batch):
                    # kept position k predicts the token at k+1: the reference's n tokens are the
                    # last n of the row, predicted by kept positions keep-1-n .. keep-2
                    rows = logits[b, keep - 1 - len(r):keep - 1].float()
                    targets = torch.tensor(r, device=rows.device)
                    nll = torch.logsumexp(rows, dim=-1) - rows.gather(1, targets.unsqueeze(1)).squeeze(1)
                    per_item[item_id] = {"nll": float(nll.mean()), "tokens": len(r)}
                    total_nll += float(nll.sum())
                    total_tokens += len(r)
                bar.update(len(batch))
    finally:
        bar.close()
        if was_training:
            model.train()
    mean = total_nll / total_tokens if total_tokens else float("nan")
    return {"ref_nll": mean, "ref_ppl": math.exp(mean) if total_tokens else float("nan"),
            "ref_tokens": total_tokens, "items": len(per_item), "truncated": truncated, "skipped": skipped,
            "per_item": per_item}

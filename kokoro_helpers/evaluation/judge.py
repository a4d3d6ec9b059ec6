"""03_eval's optional LLM judge (only with a client / key): rubric scores on the same criteria
as the human raters, and pairwise comparisons asked in both orders — a win counts only when both
orders agree (position bias). Answers are cached in run_dir/eval/judge/cache.jsonl (they cost money).

    scores = judge_scores(generations, items, client, judge_model, criteria="default", run_dir=run_dir)
    pairs = judge_pairwise(generations, items, client, judge_model, run_dir=run_dir)
"""
from __future__ import annotations

import itertools
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


from kokoro_helpers.cards import now_iso
from kokoro_helpers.concurrency import run_concurrently
from kokoro_helpers.evaluation.evaluate import EvalError, Item, JsonlCache, eval_dir, generation_rows
from kokoro_helpers.jsonio import content_sha1
from kokoro_helpers.models.endpoint import EndpointChatModel
from kokoro_helpers.notes import Log, say
from kokoro_helpers.data.schema import SPEAKER_LABEL_JA

# =================================================================================================
# 4. Optional LLM judge (only with a client / key)
# =================================================================================================

# The same criteria keys and preset names as the manual scoring widget (score_store.CRITERIA_PRESETS:
# "default" = the seeds' 正確性・関連性・専門性, "kokorochat" = turn-level items of KokoroChat's client
# review), each with the rubric text the judge reads (the widget needs only labels).
JUDGE_CRITERIA_PRESETS: dict[str, dict[str, str]] = {
    "default": {
        "accuracy": "正確性: 相談者の発言や状況を正しく理解し、事実を取り違えたり根拠のないことを述べたりしていない。",
        "relevance": "関連性: 直前の相談者の発言と対話の流れに沿っており、話題から外れていない。",
        "expertise": "専門性: 傾聴・共感・適切な質問など、カウンセラーとして適切な応答の技法にかなっている。",
    },
    "kokorochat": {
        "showed_acceptance_and_empathy": "受容・共感: 相談者の気持ちを受け止め、共感を示している。",
        "provided_acknowledgment_and_affirmation": "肯定・承認: 相談者の考えや努力を認め、肯定的に言葉にしている。",
        "asked_effective_questions": "的確な質問による会話の促進: 相談者が考えを深められる的確な質問で会話を進めている。",
        "offered_actionable_suggestions": "次の行動につながる提案: 相談者の次の行動につながる具体的な提案や方向づけがある。",
    },
}
JUDGE_CRITERIA_PRESETS["seeds"] = JUDGE_CRITERIA_PRESETS["default"]
SCORE_RANGE = (0, 5)

JUDGE_SYSTEM = ("あなたは心理カウンセリングの応答を評価する熟練のスーパーバイザーです。"
                "公平に評価し、指定された JSON だけを出力してください。")


def judge_criteria(criteria: str | Sequence[str] | Mapping[str, str] | None = None) -> dict[str, str]:
    """{key: rubric text}: a preset name ("default" | "seeds" | "kokorochat", as in the scoring
    widget), a list of keys from the presets, or a dict of your own. Default: "default"
    (accuracy 正確性 / relevance 関連性 / expertise 専門性)."""
    if criteria is None:
        return dict(JUDGE_CRITERIA_PRESETS["default"])
    if isinstance(criteria, str):
        if criteria not in JUDGE_CRITERIA_PRESETS:
            raise ValueError(f"unknown criteria preset {criteria!r}; presets: {sorted(JUDGE_CRITERIA_PRESETS)}")
        return dict(JUDGE_CRITERIA_PRESETS[criteria])
    if isinstance(criteria, Mapping):
        return {str(k): str(v) for k, v in criteria.items()}
    known = {k: v for preset in JUDGE_CRITERIA_PRESETS.values() for k, v in preset.items()}
    unknown = [c for c in criteria if c not in known]
    if unknown:
        raise ValueError(f"no rubric text for {unknown}: pass a dict {{key: description}}")
    return {c: known[c] for c in criteria}


def transcript(context: Sequence[Mapping[str, Any]]) -> str:
    """The dialogue as 相談者 / カウンセラー lines (the system prompt left out)."""
    return "\n".join(f"{SPEAKER_LABEL_JA.get(m.get('role'), m.get('role'))}: {m.get('content', '')}"
                     for m in context if m.get("role") != "system")


def rubric_prompt(item: Item, response: str, criteria: Mapping[str, str], show_reference: bool = False) -> str:
    lo, hi = SCORE_RANGE
    lines = ["以下は相談者とカウンセラーの対話の途中までと、次のカウンセラーの発言の候補です。",
             f"候補を次の各基準について {lo}〜{hi} の整数で採点してください"
             f"（{lo} = まったく当てはまらない、{hi} = 非常によく当てはまる）。", "", "## 基準"]
    lines += [f"- {key}: {text}" for key, text in criteria.items()]
    lines += ["", "## 対話", transcript(item["context"])]
    if show_reference:
        lines += ["", "## 参考: 実際のカウンセラーの発言", item["reference"]]
    lines += ["", "## 候補", response, "", "## 出力",
              "次の形の JSON だけを出力してください（<...> は置き換える）: "
              + '{"scores": {' + ", ".join(f'"{k}": <{lo}〜{hi}の整数>' for k in criteria)
              + '}, "reason": "<短い理由>"}']
    return "\n".join(lines)


def pairwise_prompt(item: Item, first: str, second: str, criteria: Mapping[str, str]) -> str:
    lines = ["以下は相談者とカウンセラーの対話の途中までと、次のカウンセラーの発言の候補 A と B です。",
             "次の観点を総合して、より良い候補を選んでください。提示の順序や長さに左右されないでください。",
             "", "## 観点"]
    lines += [f"- {key}: {text}" for key, text in criteria.items()]
    lines += ["", "## 対話", transcript(item["context"]), "", "## 候補 A", first, "", "## 候補 B", second,
              "", "## 出力", '次の形の JSON だけを出力してください: {"winner": "A" または "B" または "tie", "reason": "短い理由"}']
    return "\n".join(lines)


def extract_json(text: str) -> Any | None:
    """The first JSON object in `text` (code fences, prose around it, full-width braces tolerated);
    None if there is none."""
    if not text:
        return None
    s = unicodedata.normalize("NFKC", text)
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", s):
        try:
            obj, _ = decoder.raw_decode(s, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _as_score(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and float(value).is_integer():
        score = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)(?:\s*/\s*\d+)?\s*(?:点)?\s*", unicodedata.normalize("NFKC", value))
        if not m:
            return None
        score = int(m.group(1))
    else:
        return None
    return score if SCORE_RANGE[0] <= score <= SCORE_RANGE[1] else None


def parse_rubric(text: str, criteria: Iterable[str]) -> tuple[dict[str, int | None], str | None]:
    """({criterion: score or None}, error or None) from a judge's answer. Scores are read from
    `{"scores": {...}}` or from the top level; a value that is not an integer in 0..5 is None."""
    criteria = list(criteria)
    obj = extract_json(text)
    if obj is None:
        return {c: None for c in criteria}, "no JSON object in the answer"
    scores = obj.get("scores") if isinstance(obj.get("scores"), dict) else obj
    out = {c: _as_score(scores.get(c)) for c in criteria}
    bad = [c for c, v in out.items() if v is None]
    return out, (f"missing or out-of-range scores for {bad}" if bad else None)


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a pairwise answer (JSON `winner`, or a bare answer); None if unclear."""
    obj = extract_json(text)
    raw = obj.get("winner") if isinstance(obj, dict) else text
    if not isinstance(raw, str):
        return None
    s = unicodedata.normalize("NFKC", raw).strip().strip("\"'`「」").lower()
    s = re.sub(r"^(候補|応答|reply|response|candidate)\s*", "", s)
    if s in ("a", "b"):
        return s.upper()
    if s in ("tie", "draw", "引き分け", "同等", "equal", "both"):
        return "tie"
    return None


class Judge:
    """One judge model behind a client: cached, concurrent calls (retried by the SDK: `retries`, default the
    client's own `max_retries`) returning the raw text."""

    def __init__(self, client: Any, judge_model: str, run_dir: str | Path | None, concurrency: int,
                 max_tokens: int, temperature: float, json_mode: bool, retries: int | None,
                 progress: bool, log: Log, system: str | None = None, batch: Any = None):
        if client is None:
            raise EvalError("the LLM judge needs a client: set OPENAI_API_KEY (see default_client()) "
                            "or pass client=; without one skip the judge")
        if not judge_model:
            raise EvalError("judge_model is empty: name the judge model (e.g. 'gpt-4o-2024-08-06')")
        self.responder = EndpointChatModel(client, judge_model, max_tokens=max_tokens, temperature=temperature,
                                           concurrency=concurrency, sdk_max_retries=retries, progress=progress,
                                           log=log)
        self.json_mode = json_mode
        self.judge_model = judge_model
        self.cache = (JsonlCache(eval_dir(run_dir) / "judge" / "cache.jsonl", ("judge_model", "prompt_sha"))
                      if run_dir is not None else None)
        self.log = log
        self.system = system or JUDGE_SYSTEM
        self.batch = batch                     # a batch_api.BatchRunner: OpenAI's Batch API instead of one call each
        self.errors: dict[int, str] = {}       # prompt index -> why its request failed (last ask)

    def ask(self, prompts: Sequence[str], desc: str) -> list[str]:
        """The judge's answer to each prompt, from the cache where possible. A request that still
        fails after the retries (endpoint down, HTTP error) does not stop the others: its answer is
        "" and the reason is in `self.errors[index]`; it is not cached, so a re-run asks again."""
        self.errors = {}
        have = self.cache.load() if self.cache is not None else {}
        shas = [content_sha1([self.responder.settings, self.json_mode, self.system, p]) for p in prompts]
        answers: list[str | None] = [have.get((self.judge_model, s), {}).get("answer") for s in shas]
        todo = [i for i, a in enumerate(answers) if a is None]
        say(self.log, f"judge {self.judge_model} ({desc}): {len(prompts) - len(todo)} cached, {len(todo)} to ask")
        extra = {"response_format": {"type": "json_object"}} if self.json_mode else {}

        def messages(i: int) -> list[dict[str, str]]:
            return [{"role": "system", "content": self.system}, {"role": "user", "content": prompts[i]}]

        def body(i: int) -> dict[str, Any]:
            return {**self.responder.request(messages(i)), **extra}

        if self.batch is not None and todo:
            return self._ask_batch(todo, shas, answers, body)

        def one(i: int) -> str:
            try:
                return self.responder.complete(messages(i), extra=extra)[0]
            except Exception as exc:  # noqa: BLE001 - one failed request is reported per item, never a crash
                return _RequestFailed(f"{type(exc).__name__}: {str(exc)[:300]}")

        def store(k: int, text: str) -> None:
            i = todo[k]
            if isinstance(text, _RequestFailed):
                self.errors[i] = text.reason
                return
            answers[i] = text
            if self.cache is not None and extract_json(text) is not None:   # prose is asked again next run
                self.cache.append({"judge_model": self.judge_model, "prompt_sha": shas[i], "answer": text,
                                   "time": now_iso()})

        run_concurrently(one, todo, self.responder.concurrency, store, self.responder.progress,
                         desc=f"judge {desc}")
        prose = [i for i in todo if i not in self.errors and extract_json(answers[i] or "") is None]
        if prose:                 # an answer without JSON: asked once more now (and again on a re-run)
            say(self.log, f"judge {self.judge_model} ({desc}): {len(prose)} answer(s) without JSON; asking once more")
            first_round, todo = todo, prose
            run_concurrently(one, prose, self.responder.concurrency, store, self.responder.progress,
                             desc=f"judge {desc} (again)")
            todo = first_round
        if self.errors:
            first = next(iter(self.errors.values()))
            say(self.log, f"judge {self.judge_model} ({desc}): {len(self.errors)} of {len(todo)} request(s) "
                           f"FAILED after retries (first: {first}); they are reported per item and asked "
                           f"again on the next run")
        return [a or "" for a in answers]


    def _ask_batch(self, todo: list[int], shas: list[str], answers: list[str | None],
                   body: Callable[[int], dict[str, Any]]) -> list[str]:
        """The missing answers through OpenAI's Batch API (custom_id = the prompt's sha): cached as
        they come back; failed requests are reported per item like any other."""
        from kokoro_helpers.hosted.batch import BatchError
        bodies: dict[str, dict[str, Any]] = {}
        for i in todo:
            b = body(i)
            b.update(b.pop("extra_body", None) or {})
            bodies.setdefault(shas[i], b)

        def keep(results: Mapping[str, Any]) -> None:
            for i in todo:
                r = results.get(shas[i])
                if r is None or r.text is None:
                    self.errors[i] = (r.error if r is not None else None) or "no result in the batch"
                    continue
                self.errors.pop(i, None)
                answers[i] = r.text
                if self.cache is not None and extract_json(r.text) is not None:
                    self.cache.append({"judge_model": self.judge_model, "prompt_sha": shas[i], "answer": r.text,
                                       "time": now_iso(), "via": "batch"})

        try:
            keep(self.batch.run(bodies))
        except BatchError as exc:
            keep(exc.partial)                  # what the batch did return is kept (cached) first
            raise
        if self.errors:
            say(self.log, f"judge {self.judge_model} (batch): {len(self.errors)} of {len(todo)} request(s) failed; "
                           f"reported per item, asked again on the next run")
        return [a or "" for a in answers]


class _RequestFailed(str):
    """A judge request that failed after its retries (kept apart from a real answer)."""

    def __new__(cls, reason: str):
        obj = super().__new__(cls, "")
        obj.reason = reason
        return obj


def _judge_inputs(generations: Any, items: Sequence[Item]) -> tuple[dict[str, Item], dict[tuple[str, str], str]]:
    by_id = {it["item_id"]: it for it in items}
    replies = {(r["model"], r["item_id"]): (r["response"] if isinstance(r.get("response"), str) else "")
               for r in generation_rows(generations) if r.get("item_id") in by_id}
    return by_id, replies


def judge_scores(generations: Any, items: Sequence[Item], client: Any, judge_model: str, *,
                 criteria: str | Sequence[str] | Mapping[str, str] | None = None, run_dir: str | Path | None = None,
                 show_reference: bool = False, concurrency: int = 4, max_tokens: int = 400,
                 temperature: float = 0.0, json_mode: bool = True, retries: int | None = None,
                 progress: bool = True, log: Log = print,
                 batch: Any = None):
    """Rubric scores (0..5 per criterion) from an LLM judge for every (model, item) reply.

    The judge sees the dialogue and one reply, never the model's name. Answers are parsed
    robustly (`parse_rubric`); unparseable or out-of-range scores are NaN with the reason in
    `parse_error`, never guessed. Transient errors are retried by the SDK (`retries`,
    default the client's `max_retries`). A request that still
    fails is reported per item (`parse_error` "request failed: ...") and never stops the run. With `run_dir` the answers are cached in
    run_dir/eval/judge/cache.jsonl, so a re-run pays nothing. Returns a long DataFrame
    (item_id, split, model, criterion, score, parse_error); summarise with
    `summarize_judge_scores`."""
    import pandas as pd
    crit = judge_criteria(criteria)
    judge = Judge(client, judge_model, run_dir, concurrency, max_tokens, temperature, json_mode, retries,
                  progress, log, batch=batch)
    by_id, replies = _judge_inputs(generations, items)
    keys = list(replies)
    prompts = [rubric_prompt(by_id[i], replies[(m, i)], crit, show_reference) for m, i in keys]
    answers = judge.ask(prompts, "rubric")
    rows = []
    for k, ((model, item_id), answer) in enumerate(zip(keys, answers)):
        scores, error = parse_rubric(answer, crit)
        if k in judge.errors:
            error = f"request failed: {judge.errors[k]}"
        for c, s in scores.items():
            rows.append({"item_id": item_id, "split": by_id[item_id]["split"], "model": model, "criterion": c,
                         "score": float("nan") if s is None else s, "parse_error": error})
    return pd.DataFrame(rows, columns=["item_id", "split", "model", "criterion", "score", "parse_error"])


def summarize_judge_scores(scores: Any):
    """Mean judge score per model × criterion (rows: models; columns: criteria), plus n_scored."""
    table = scores.pivot_table(index="model", columns="criterion", values="score", aggfunc="mean", sort=False)
    table["n_scored"] = scores.dropna(subset=["score"]).groupby("model", sort=False)["item_id"].nunique()
    failed = scores[scores["parse_error"].fillna("").str.startswith("request failed")]
    table["n_request_failed"] = failed.groupby("model", sort=False)["item_id"].nunique()
    table["n_request_failed"] = table["n_request_failed"].fillna(0).astype(int)
    return table


def combine_verdicts(first: str | None, second: str | None, model_a: str, model_b: str) -> str:
    """The outcome of one pair asked in both orders: `first` is the verdict with model_a shown as A,
    `second` with model_b shown as A. A model wins only if both verdicts pick it; both "tie" is a
    tie; any disagreement is "inconsistent" (position bias); an unreadable verdict is "invalid"."""
    if first is None or second is None:
        return "invalid"
    pick1 = {"A": model_a, "B": model_b, "tie": "tie"}[first]
    pick2 = {"A": model_b, "B": model_a, "tie": "tie"}[second]
    if pick1 == pick2:
        return pick1
    return "inconsistent"


def judge_pairwise(generations: Any, items: Sequence[Item], client: Any, judge_model: str, *,
                   pairs: Sequence[tuple[str, str]] | None = None,
                   criteria: str | Sequence[str] | Mapping[str, str] | None = None,
                   run_dir: str | Path | None = None, concurrency: int = 4, max_tokens: int = 300,
                   temperature: float = 0.0, json_mode: bool = True, retries: int | None = None,
                   progress: bool = True, log: Log = print,
                   batch: Any = None):
    """Pairwise comparisons by an LLM judge, each asked twice with the replies in both orders.

    `pairs`: (model_a, model_b) tuples; default every pair of models in `generations`. Only items
    both models answered are compared. Returns one row per (pair, item): item_id, split, model_a,
    model_b, verdict_ab (model_a shown first), verdict_ba, outcome (`combine_verdicts`: the winning
    model, "tie", "inconsistent" or "invalid"). Summarise with `summarize_pairwise`."""
    import pandas as pd
    crit = judge_criteria(criteria)
    judge = Judge(client, judge_model, run_dir, concurrency, max_tokens, temperature, json_mode, retries,
                  progress, log, batch=batch)
    by_id, replies = _judge_inputs(generations, items)
    models = list(dict.fromkeys(m for m, _ in replies))
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(models, 2))
    jobs = []
    for a, b in pairs:
        if a == b:
            raise ValueError(f"a pair needs two different models, got ({a!r}, {b!r})")
        for item_id in by_id:
            if (a, item_id) in replies and (b, item_id) in replies:
                jobs.append((a, b, item_id))
    prompts = []
    for a, b, item_id in jobs:
        ra, rb = replies[(a, item_id)], replies[(b, item_id)]
        prompts.append(pairwise_prompt(by_id[item_id], ra, rb, crit))
        prompts.append(pairwise_prompt(by_id[item_id], rb, ra, crit))
    answers = judge.ask(prompts, "pairwise")
    rows = []
    for k, (a, b, item_id) in enumerate(jobs):
        v1, v2 = parse_verdict(answers[2 * k]), parse_verdict(answers[2 * k + 1])
        failed = [judge.errors[j] for j in (2 * k, 2 * k + 1) if j in judge.errors]
        rows.append({"item_id": item_id, "split": by_id[item_id]["split"], "model_a": a, "model_b": b,
                     "verdict_ab": v1, "verdict_ba": v2, "outcome": combine_verdicts(v1, v2, a, b),
                     "request_error": failed[0] if failed else None})
    return pd.DataFrame(rows, columns=["item_id", "split", "model_a", "model_b", "verdict_ab", "verdict_ba", "outcome",
                                       "request_error"])


def summarize_pairwise(comparisons: Any):
    """Per pair: n, wins_a, wins_b (both orders agreed), ties, inconsistent (the verdict followed
    the position), invalid, and win rates over all n."""
    import pandas as pd
    rows = []
    for (a, b), g in comparisons.groupby(["model_a", "model_b"], sort=False):
        n = len(g)
        counts = g["outcome"].value_counts()
        wa, wb = int(counts.get(a, 0)), int(counts.get(b, 0))
        rows.append({"model_a": a, "model_b": b, "n": n, "wins_a": wa, "wins_b": wb,
                     "ties": int(counts.get("tie", 0)), "inconsistent": int(counts.get("inconsistent", 0)),
                     "invalid": int(counts.get("invalid", 0)),
                     "win_rate_a": wa / n if n else float("nan"), "win_rate_b": wb / n if n else float("nan")})
    return pd.DataFrame(rows)

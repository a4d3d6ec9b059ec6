"""The KokoroChat record schema (see ../shared/KOKOROCHAT.md): keys, criteria, topics, presets."""
from __future__ import annotations

TOP_LEVEL_KEYS = ("dialogue", "topic", "review_by_client_en", "review_by_client_jp")
ROLES = ("counselor", "client")
ROLE_TO_OPENAI = {"client": "user", "counselor": "assistant"}
SPEAKER_LABEL_JA = {"user": "相談者", "assistant": "カウンセラー", "system": "システム"}

REVIEW_ID_KEYS_EN = ("evaluation_id", "evaluation_created_at", "client_id", "counselor_id", "score")
REVIEW_ID_KEYS_JP = ("評価ID", "評価作成日時", "クライアント役ID", "カウンセラー役ID", "点数")

# The 20 criteria, English key -> Japanese key, in file order (the typo "cleraly" is the data's own).
CRITERIA = {
    "felt_heard_and_understood": "聴いてもらえた、わかってもらえたと感じた",
    "felt_respected": "尊重されたと感じた",
    "gained_new_insights": "新しい気づきや体験があった",
    "felt_hopeful_or_expectant": "希望や期待を感じられた",
    "concerns_were_addressed": "取り組みたかったことを扱えた",
    "thought_through_concerns_together": "一緒に考えながら取り組めた",
    "conversation_had_good_rhythm": "やりとりのリズムがあっていた",
    "conversation_felt_comfortable": "居心地のよいやりとりだった",
    "felt_appropriate_and_satisfying": "全体として適切でよかった",
    "conversation_was_valuable": "今回の相談は価値があった",
    "conversation_started_smoothly": "相談開始の円滑さ",
    "conversation_ended_well": "相談終了のタイミング（不必要に聴きすぎていないか）、円滑さ",
    "showed_acceptance_and_empathy": "受容・共感",
    "provided_acknowledgment_and_affirmation": "肯定・承認",
    "asked_effective_questions": "的確な質問による会話の促進",
    "summarized_key_points_effectively": "要約",
    "clarified_issues_cleraly": "問題の明確化",
    "helped_identify_goals": "この相談での目標の明確化",
    "offered_actionable_suggestions": "次の行動につながる提案",
    "encouraged_and_instilled_hope": "勇気づけ・希望の喚起",
}
FLAGS = {
    "harmful_due_to_ignorance": "無理解と軽率さによる傷つけ発言",
    "other_potentially_unethical": "その他の倫理違反が疑われる発言",
    "unwilling_to_continue": "離脱",
}
FLAG_CHECKED = "チェックあり"

# main_en -> main_jp for the 11 main topics, with the corpus's dialogue counts (for reference plots).
TOPICS = {
    "Family Issues (Non-Spousal)": ("家族の問題（配偶者以外）", 1330),
    "Workplace Issues": ("職場の問題", 1123),
    "Mental Health Issues": ("心の健康の問題", 966),
    "School Issues": ("学校の問題", 928),
    "Career and Educational Issues": ("進路・キャリアの問題", 848),
    "Romantic Issues": ("恋愛の問題", 454),
    "Family Issues (Spouse)": ("夫婦の問題", 438),
    "Interpersonal Issues": ("対人関係の問題", 306),
    "Financial Issues": ("お金の問題", 140),
    "Physical Health Issues": ("身体の健康の問題", 49),
    "Others": ("その他", 7),
}

# The paper's training subsets by the client's overall score (inclusive bounds; None = open).
SCORE_SUBSETS = {
    "low": (None, 69),    # Low  (<70):   3,870 dialogues
    "high": (70, 98),     # High (70-98): 2,601 dialogues
    "full": (None, 98),   # Full (<=98):  6,471 dialogues
    "test": (99, None),   # the authors' test set (>=99): 118 dialogues
}

"""03_eval: the same items for every model and their cached replies (evaluate), automatic metrics (metrics), the
LLM judge (judge, judge_endpoint) and how far to trust it (judge_validity), paired comparisons (paired), score
prediction (score_prediction, score_prediction_llm) on whole sessions (sessions), and blind human scoring: the
store that never loses a score (score_store), its widget (scoring_widget), statistics (score_summary) and the
model cards' results (score_cards)."""

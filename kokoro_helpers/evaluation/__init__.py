"""03_eval: the same items for every model (evaluate), automatic metrics, the LLM judge and how far to trust it,
paired comparisons, score prediction, whole sessions, and blind human scoring (scoring)."""

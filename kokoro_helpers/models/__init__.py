"""One interface to every model, hosted or local (base: ChatModel with reply / stream / batch / settings), one
implementation per kind (local: transformers + peft; endpoint: OpenAI, Azure OpenAI, vLLM, the project's server),
the one place that picks the kind from a card, a folder or an endpoint (open), and what is built on it: the
saved-models CLI (saved_models) and the chat widget (chat_widget)."""

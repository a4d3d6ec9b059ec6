"""The local path: open models with transformers + peft — the embedded tiny base, training data as the model sees
it (chat_messages, chat_encoding, windows), TRL training (train_plan, train_lora, train_resume, train_outputs,
sft_config, train_callbacks, memory_plan, base_fingerprint), loading and generation (generate), and the
OpenAI-compatible server (serve)."""

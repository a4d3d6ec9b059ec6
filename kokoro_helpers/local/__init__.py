"""The local path: open models with transformers + peft — the embedded tiny base, training data as the model sees
it (lora_data), TRL training (train_lora, sft_config, train_callbacks, memory_plan, base_fingerprint), loading and
generation (generate), and the OpenAI-compatible server (serve)."""

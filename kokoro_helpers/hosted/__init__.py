"""02_finetune Part A, hosted: OpenAI / Azure OpenAI supervised fine-tuning — its errors, uploads once per content,
jobs created once, the Batch API, and the run that ties them together (openai_ft)."""

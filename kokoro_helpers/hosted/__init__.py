"""02_finetune Part A, hosted: OpenAI / Azure OpenAI supervised fine-tuning — the key and client (client),
pre-flight (preflight), the request (request), uploads once per content (uploads), jobs created once (jobs),
submitting (submit), the job's card (job_card), following it (monitor), its results (results), the Batch
API (batch), one message per failure (errors), and the run that ties them
together (openai_ft)."""

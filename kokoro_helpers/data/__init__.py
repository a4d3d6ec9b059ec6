"""01_data: read KokoroChat (sources), check it (schema, validate), turn it into chat examples (convert), split it
by dialogue (split), count tokens as OpenAI bills them (tokens), and the pipeline that runs these (pipeline)."""

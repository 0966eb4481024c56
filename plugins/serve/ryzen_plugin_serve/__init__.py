"""`ryzen serve`: an OpenAI-compatible completions server with iteration-level continuous batching."""

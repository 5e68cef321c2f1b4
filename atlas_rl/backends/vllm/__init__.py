"""vLLM backend: the production path (custom_class proposer, weight sync)."""

"""Generation backends: vllm (production). The native backend (transformers + our kernels) comes with the kernels."""

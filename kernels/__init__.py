"""Triton kernels and their plain-torch references (installed as atlas_rl.kernels).

Verification on the vLLM backend is vLLM's own rejection sampler (with atlas-rl's CPU
fix in atlas_rl.compat); the kernels here serve the native backend, where atlas-rl
verifies drafts itself."""

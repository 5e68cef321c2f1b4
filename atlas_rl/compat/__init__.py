"""Version-gated, self-checking workarounds for bugs in the libraries atlas-rl stands on
(vLLM's CPU backend: `vllm_cpu`; several vLLM engines in one process: `vllm_engines`).
Their status lives in the vLLM seam's registry (`atlas_rl.backends.vllm.hooks.status`),
beside every other hook."""

from atlas_rl.compat.vllm_cpu import status as vllm_cpu_status

__all__ = ["vllm_cpu_status"]

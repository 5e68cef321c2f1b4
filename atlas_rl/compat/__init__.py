"""Version-gated, self-checking fixes for the libraries atlas-rl stands on."""

from atlas_rl.compat.vllm_cpu import status as vllm_cpu_status

__all__ = ["vllm_cpu_status"]

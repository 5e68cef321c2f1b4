"""Kernels of the verification path and their references (installed as atlas_rl.kernels).

rejection.py: lossless rejection sampling over sparse draft distributions, in torch (CPU
and any torch device); on the vLLM backend it replaces vLLM's rejection step for atlas
engines (atlas_rl.backends.vllm.verifier). It is the reference a Triton kernel of the
same contract will be tested against on a GPU."""

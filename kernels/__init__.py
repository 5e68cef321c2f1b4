"""Kernels of the verification path and their references (installed as atlas_rl.kernels).

rejection.py: lossless rejection sampling over one-hot, sparse and dense draft
distributions, in torch (CPU and any torch device), and the reference of the Triton path;
on the vLLM backend it replaces vLLM's rejection step for atlas engines
(`atlas_rl.backends.vllm.sampler.AtlasRejectionSampler`).

rejection_triton.py: the same verification as Triton kernels end to end (row
log-sum-exp, acceptance chain, residual draw, bonus token, output logprobs; no host
sync), which `rejection.rejection_sample` uses for CUDA tensors. Tested against the
torch reference for identical tokens on the same uniforms: under Triton's interpreter on
the CPU (tests/test_kernels_triton.py, which also compiles every variant for sm_90) and
compiled on a GPU (tests/test_gpu.py, with chi-square and KS checks against p).
See docs/gpu.md.

graphs.py: CUDA graphs per batch bucket (`StaticGraph`, `GraphCache`): the Triton
verification (`rejection_triton.rejection_sample_triton_graphed`, what "auto" picks for
small calls on CUDA) and the neural drafter's drafting loop replay through them; on the
CPU the same static buffers run eagerly.

testing.py: synthetic verification inputs and the comparison of the two backends, for
the tests and the GPU check (`atlas_rl.gpu_bench`)."""

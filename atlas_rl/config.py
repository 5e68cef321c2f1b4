"""AtlasConfig: every knob of the rollout engine, as a dataclass whose fields carry
`help` metadata, so the same class gives CLI flags and YAML (HfArgumentParser / TrlParser)
beside a TRL config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SPECULATION_METHODS = ("atlas", "none", "vllm-ngram", "vllm-suffix")
LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


@dataclass
class AtlasConfig:
    max_lookahead: int = field(default=8, metadata={
        "help": "Most draft tokens per request and step (vLLM num_speculative_tokens); "
                "also the lookahead of the vllm-ngram / vllm-suffix peers."})
    min_confidence: float = field(default=0.1, metadata={
        "help": "A draft is cut where the speculator's estimate that all of it is "
                "accepted falls below this."})
    max_speculation_batch_size: int = field(default=8, metadata={
        "help": "No speculation while more requests than this are running (verifying "
                "k+1 tokens per sequence is compute-bound at large batch)."})
    ngram_sizes: tuple[int, ...] = field(default=(2, 3, 4, 6), metadata={
        "help": "n-gram lengths the suffix speculator matches, longest first."})
    max_corpus_tokens: int = field(default=2_000_000, metadata={
        "help": "Bound on the tokens of past rollouts the suffix speculator keeps (FIFO)."})
    max_model_len: int = field(default=2048, metadata={
        "help": "Longest prompt + completion the engine accepts, in tokens."})
    dtype: str | None = field(default=None, metadata={
        "help": "Weights and activations dtype. Default: bfloat16, except on CPUs without "
                "native bf16 (no AVX512-BF16/AMX), where float32 is about 2x faster."})
    enforce_eager: bool | None = field(default=None, metadata={
        "help": "Skip torch.compile in vLLM. Default: eager on the CPU, where compiling "
                "costs over a minute per engine; compiled on GPUs."})
    cpu_kv_cache_gib: int = field(default=2, metadata={
        "help": "KV cache size in GiB on the CPU backend (VLLM_CPU_KVCACHE_SPACE), unless "
                "that variable is set."})
    seed: int = field(default=0, metadata={"help": "Engine seed (sampling without a per-call seed)."})
    logprobs_mode: str = field(default="processed_logprobs", metadata={
        "help": "processed_logprobs: logprobs of the distribution actually sampled "
                "(after temperature / top-k / top-p), what importance weights need; "
                "raw_logprobs: the model's unprocessed log-softmax."})

    def __post_init__(self):
        if self.max_lookahead < 1:
            raise ValueError(f"max_lookahead must be >= 1, got {self.max_lookahead}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.max_speculation_batch_size < 0:
            raise ValueError("max_speculation_batch_size must be >= 0, got "
                             f"{self.max_speculation_batch_size}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got "
                             f"{self.logprobs_mode!r}")
        if self.cpu_kv_cache_gib < 1 or int(self.cpu_kv_cache_gib) != self.cpu_kv_cache_gib:
            raise ValueError("cpu_kv_cache_gib must be a whole number of GiB >= 1, got "
                             f"{self.cpu_kv_cache_gib}")
        self.ngram_sizes = tuple(int(n) for n in self.ngram_sizes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ngram_sizes"] = list(self.ngram_sizes)
        return d

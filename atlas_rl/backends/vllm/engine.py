"""Building and driving an in-process vLLM engine: speculative configs per method,
spec-decode counters as vLLM's scheduler reports them, where an engine step's time goes.
Weight sync: `weight_sync`. Every hook into vLLM is installed through `hooks` (the seam)."""

from __future__ import annotations

import os
import time

from atlas_rl.backends.vllm import hooks
from atlas_rl.config import AtlasConfig
from atlas_rl.metrics import SpecCounters

PROPOSER_CLASS = "atlas_rl.backends.vllm.proposer.AtlasProposer"
# A KV cache size the user set before atlas-rl ran wins over AtlasConfig.cpu_kv_cache_gib.
_USER_KV_SPACE = os.environ.get("VLLM_CPU_KVCACHE_SPACE")


def speculative_config(method: str, config: AtlasConfig) -> dict | None:
    k = config.max_lookahead
    if method == "none":
        return None
    if method in ("atlas", "atlas-static"):
        return {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": k}
    if method == "vllm-ngram":
        return {"method": "ngram", "num_speculative_tokens": k,
                "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    if method == "vllm-suffix":
        try:
            import arctic_inference  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "speculation='vllm-suffix' needs vLLM's suffix decoding backend, the "
                "package arctic-inference: pip install arctic-inference==0.1.1 "
                "(it is in atlas-rl's [cpu] extra)") from e
        return {"method": "suffix", "num_speculative_tokens": k}
    raise ValueError(f"unknown speculation method {method!r}")


def default_dtype(on_cpu: bool) -> str:
    # Measured on a 2-core AVX-512 Xeon without bf16 units: float32 decodes ~2x faster
    # than emulated bfloat16 at batch 16 (README, "Choosing a dtype").
    from atlas_rl.machine import cpu_has_native_bf16

    return "bfloat16" if not on_cpu or cpu_has_native_bf16() else "float32"


def build_llm(model_path: str, method: str, config: AtlasConfig, **engine_kwargs):
    """An in-process vLLM engine (the worker lives in this process, so the proposer,
    the runner and the weights are reachable without RPC)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = _USER_KV_SPACE or str(int(config.cpu_kv_cache_gib))
    from vllm import LLM
    from vllm.platforms import current_platform

    hooks.install_process_hooks()
    on_cpu = current_platform.is_cpu()
    kwargs = dict(
        model=model_path,
        dtype=config.dtype or default_dtype(on_cpu),
        max_model_len=config.max_model_len,
        seed=config.seed,
        enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
        enable_prefix_caching=True,
        disable_log_stats=False,  # the scheduler's spec-decode stats feed our counters
        logprobs_mode=config.logprobs_mode,
        speculative_config=speculative_config(method, config),
    )
    kwargs.update(engine_kwargs)
    llm = LLM(**kwargs)
    hooks.install_after_build(llm)
    return llm


def model_runner(llm):
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner
    except AttributeError as e:
        raise RuntimeError(
            "atlas-rl needs an in-process vLLM engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) "
            "to reach its model runner; this engine runs its worker elsewhere") from e


def proposer(llm):
    from atlas_rl.backends.vllm.proposer import AtlasProposer

    drafter = getattr(model_runner(llm), "drafter", None)
    return drafter if isinstance(drafter, AtlasProposer) else None


class VllmSpecCounters:
    """Spec-decode counters as vLLM's scheduler reports them, per engine.

    vLLM's Prometheus counters live in one global registry that a second in-process
    engine resets, so we accumulate the scheduler's per-step SpecDecodingStats where the
    engine hands them to its stat loggers."""

    def __init__(self, llm):
        self.counters = SpecCounters()
        manager = llm.llm_engine.logger_manager
        if manager is None:
            raise RuntimeError("build the vLLM engine with disable_log_stats=False")
        record = manager.record

        def record_and_count(*args, scheduler_stats=None, **kwargs):
            stats = getattr(scheduler_stats, "spec_decoding_stats", None)
            if stats is not None:
                self._add(stats)
            return record(*args, scheduler_stats=scheduler_stats, **kwargs)

        hooks.patch(manager, "record", record_and_count, key="spec_counters")
        hooks.record("spec_counters", "applied")

    def _add(self, s) -> None:
        self.counters.add(s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens,
                          s.num_draft_tokens_per_pos, s.num_accepted_tokens_per_pos)


class StepTimes:
    """Where an engine's time goes, per engine step: the model runner's
    ``execute_model`` (inputs and the forward pass over every scheduled token, drafts
    included: the verification forward) and ``sample_tokens`` (logits, sampling, the
    rejection sampler, and the proposer drafting the next step). Instance-level
    wrappers on this engine's runner; two perf_counter calls per step."""

    def __init__(self, llm):
        self.forward_seconds = 0.0
        self.sample_seconds = 0.0
        self.engine_steps = 0
        runner = model_runner(llm)
        execute, sample = runner.execute_model, runner.sample_tokens

        def execute_model(*args, **kwargs):
            start = time.perf_counter()
            try:
                return execute(*args, **kwargs)
            finally:
                self.forward_seconds += time.perf_counter() - start
                self.engine_steps += 1

        def sample_tokens(*args, **kwargs):
            start = time.perf_counter()
            try:
                return sample(*args, **kwargs)
            finally:
                self.sample_seconds += time.perf_counter() - start

        hooks.patch(runner, "execute_model", execute_model, key="step_times")
        hooks.patch(runner, "sample_tokens", sample_tokens, key="step_times")
        hooks.record("step_times", "applied")

    def snapshot(self) -> tuple[float, float, int]:
        return self.forward_seconds, self.sample_seconds, self.engine_steps

"""Building and driving an in-process vLLM engine: speculative configs per method,
spec-decode counters as vLLM's scheduler reports them, where an engine step's time goes.
Weight sync: `weight_sync`. Every hook into vLLM is installed through `hooks` (the seam)."""

from __future__ import annotations

import contextlib
import os
import time

from atlas_rl import compat, machine
from atlas_rl.backends.vllm import hooks
from atlas_rl.backends.vllm.hooks import PROPOSER_CLASS, model_runner  # noqa: F401 (re-exported)
from atlas_rl.config import AtlasConfig
from atlas_rl.metrics import SpecCounters
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


def kv_bytes_per_token(model_config, parallel_config=None, dtype=None) -> tuple[int, str]:
    """(bytes, how) of KV cache one token takes over every attention layer of a vLLM
    ``ModelConfig`` (keys and values; ``dtype``: the cache's, default the model's). An
    upper bound for models whose sliding-window layers keep fewer tokens."""
    import torch
    from vllm.config import ParallelConfig

    parallel = parallel_config or ParallelConfig()
    layers = model_config.get_num_layers_by_block_type(parallel, "attention")
    heads, head_size = model_config.get_num_kv_heads(parallel), model_config.get_head_size()
    dtype = dtype or model_config.dtype
    per_token = 2 * layers * heads * head_size * torch.empty((), dtype=dtype).element_size()
    dtype_name = str(dtype).removeprefix("torch.")
    return per_token, (f"{layers} layers x {heads} KV heads x {head_size} x {dtype_name}, "
                       f"keys and values")


def cpu_kv_cache_gib_for(model_path: str, dtype: str, batches, block_size: int = 128,
                         margin: float = 1.1, max_model_len: int | None = None) -> float:
    """The KV cache (GiB) an in-process CPU engine needs for the largest of ``batches``,
    (sequences, tokens) pairs of a batch's sequences and each one's most tokens (prompt,
    completion and drafts): every sequence rounded up to whole blocks, ``margin``
    on top, at least one sequence of ``max_model_len`` tokens (vLLM refuses to start with
    less) and 64 MiB (`AtlasConfig.cpu_kv_cache_gib`'s least). For callers that
    know their largest batch (the benchmark); vLLM's CPU default is a fixed size whatever
    the batch."""
    vllm_llm_class()  # vLLM's first import on a thread of its own (see there)
    from vllm.engine.arg_utils import EngineArgs

    model = EngineArgs(model=model_path, dtype=dtype).create_model_config()
    per_token, _ = kv_bytes_per_token(model)
    need = max(-(-tokens // block_size) * block_size * sequences
               for sequences, tokens in [*batches, (1, max_model_len or 0)])
    return max(per_token * need * margin / (1 << 30), 1 / 16)


def on_cpu() -> bool:
    """vLLM runs on the CPU backend here."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def default_dtype(on_cpu: bool) -> str:
    # Measured on a 2-core AVX-512 Xeon without bf16 units: float32 decodes ~2x faster
    # than emulated bfloat16 at batch 16 (docs/dtypes.md).
    from atlas_rl.machine import cpu_has_native_bf16

    return "bfloat16" if not on_cpu or cpu_has_native_bf16() else "float32"


def vllm_llm_class():
    """``vllm.LLM``, imported the first time on a thread of its own. The first import of
    vLLM's engine modules pins every frame on the importing stack for the life of the
    process (measured: the frame of a function that first runs ``from vllm import LLM``
    is never freed; its holder is not a Python object we could find), and with those
    frames their locals: the first engine a process built (the caller's ``self``, the
    engine ``build_llm`` returns; ~2 GB with SmolLM2-135M) was never released. A thread's
    stack holds nothing of ours."""
    import sys

    if "vllm.entrypoints.llm" not in sys.modules:
        import importlib
        import threading

        thread = threading.Thread(target=importlib.import_module, args=("vllm.entrypoints.llm",),
                                  name="atlas-rl-import-vllm")
        thread.start()
        thread.join()
    from vllm import LLM  # raises here, with vLLM's own message, if the import failed

    return LLM


def build_llm(model_path: str, method: str, config: AtlasConfig, multiprocess: bool = False,
              **engine_kwargs):
    """A vLLM engine. In-process by default (the worker lives in this process, so the
    proposer, the runner and the weights are reachable without RPC); ``multiprocess``:
    the engine core in its own process, where the proposer sets itself up from the atlas
    fields of its speculative config (the vLLM plugin)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocess else "0"
    if _USER_KV_SPACE:  # vLLM's legacy variable (whole GiB), set by the user: it wins
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = _USER_KV_SPACE
    else:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    LLM = vllm_llm_class()
    from vllm.platforms import current_platform

    compat.install_vllm_fixes()
    spec = speculative_config(method, config)
    if multiprocess and method in ("atlas", "atlas-static"):
        from atlas_rl.backends.vllm import plugin

        plugin.register()  # in this process too: it moves the atlas fields
        fields = {k: v for k, v in config.to_dict().items()}
        spec = plugin.speculative_config(method, auto_learn=False, **fields)
    on_cpu = current_platform.is_cpu()
    if on_cpu and engine_kwargs.get("enable_sleep_mode"):
        raise ValueError(
            "enable_sleep_mode=True (TRL: GRPOConfig(vllm_enable_sleep_mode=True)): sleep "
            "mode frees GPU memory between generations, and vLLM's CPU backend has no "
            "device memory to free and cannot sleep (vLLM refuses it there). Leave it off "
            "on a CPU; on a GPU atlas-rl keeps its drafters across sleep and wake-up")
    kwargs = dict(
        model=model_path,
        dtype=config.dtype or default_dtype(on_cpu),
        max_model_len=config.max_model_len,
        seed=config.seed,
        enforce_eager=on_cpu if config.enforce_eager is None else config.enforce_eager,
        enable_prefix_caching=True,
        disable_log_stats=False,  # the scheduler's spec-decode stats feed our counters
        logprobs_mode=config.logprobs_mode,
        speculative_config=spec,
    )
    if on_cpu and not _USER_KV_SPACE:
        kwargs["kv_cache_memory_bytes"] = int(config.cpu_kv_cache_gib * (1 << 30))
    if multiprocess:  # weight syncs go through atlas_files (remote.RemoteWeightSync)
        from atlas_rl.backends.vllm import weight_transfer as wt

        kwargs["weight_transfer_config"] = {"backend": wt.BACKEND}
        extra = dict(kwargs.get("additional_config") or {})
        extra[wt.CONFIG_KEY] = {"directory": wt.default_directory(), "engine": True,
                                "allow_nonfinite": config.allow_nonfinite_weights,
                                "keep_previous": config.sync_rollback}
        kwargs["additional_config"] = extra
    kwargs.update(engine_kwargs)
    if multiprocess:
        import vllm.envs as envs

        if not envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError(
                "multiprocess=True, but an in-process vLLM engine already ran in this "
                "process and vLLM froze its environment (VLLM_ENABLE_V1_MULTIPROCESSING=0): "
                "build multiprocess engines before in-process ones, or in another process")
    reuse = machine.engine_processes_reuse_freed_memory() if (
        multiprocess and on_cpu and config.cpu_reuse_freed_memory) else contextlib.nullcontext()
    with reuse:  # the engine core process keeps freed blocks for its steps (machine.py)
        llm = LLM(**kwargs)
    if not multiprocess:  # else the worker applies them where its kernels live
        compat.install_vllm_fixes_after_build(llm)
    return llm


def transfer_directory(llm) -> str:
    """The weight-transfer directory `build_llm` gave a multiprocess engine."""
    from atlas_rl.backends.vllm import weight_transfer as wt

    return str(wt.transfer_directory(llm.llm_engine.vllm_config))


def nonfinite_logit_rows(llm) -> int | None:
    """Logits rows atlas-rl's sampler saw NaN or inf (`sampler.AtlasRejectionSampler`);
    None where it is out of reach (multiprocess) or not installed."""
    try:
        sampler = model_runner(llm).rejection_sampler
    except (RuntimeError, AttributeError):
        return None
    return getattr(sampler, "atlas_nonfinite_rows", None)


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


class NoStepTimes:
    """Where the runner is out of reach (multiprocess): no step timings."""

    def snapshot(self) -> tuple[float, float, int]:
        return 0.0, 0.0, 0


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

"""Fixes for vLLM's CPU backend, each version-gated and self-checking.

Every fix first checks whether the bug is present in the running vLLM; where it is
not (a fixed release, a GPU platform), the fix does nothing and says so in `status()`.

1. ``expand_kernel`` (vLLM 0.32 CPU, temperature > 0 with any speculative method).
   On the CPU, the rejection sampler's Triton ``expand_kernel`` is replaced by a C++
   override whose adapter converts its *output* buffer with ``.to(torch.int64)``. For
   float outputs (temperature, top-p, top-k expanded to draft positions) that makes a
   copy; the C++ op fills the copy, the copy is dropped, and sampling reads
   uninitialised memory: word salad and NaN logprobs at temperature 1, greedy
   unaffected (vllm #55005). We give the override an implementation that writes into
   the output it is handed: a repeat-interleave of the per-request values by the draft
   counts, with ``replace_from`` mapped to ``replace_to``.

2. Repeated kernel registration (vLLM 0.32 CPU, a second in-process engine).
   Every worker init calls ``register_triton_kernel_overrides``, which rescans
   ``sys.modules`` to rebind kernel references; on the second scan some modules
   imported meanwhile hold objects whose ``vars()`` is not a dict and the scan raises
   ``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``. The overrides
   are process-global and already in place after the first registration, so later
   calls are made no-ops. Without this, a benchmark cannot hold two engines at once.

3. Recovered-token noise on steps without drafts (vLLM 0.32, any platform; it costs on
   the CPU). With a speculative config, every step goes through the rejection sampler,
   which draws [batch, vocab] exponential noise for "recovered" tokens even when no
   request has a draft. On 2 CPU cores at batch 16 that is ~18 ms a step, ~14% of the
   step: the price of speculation being *off* (the controller's large-batch choice).
   With zero draft tokens there is nothing to recover, so we return the (empty) result
   without drawing noise. Seeded requests draw nothing there either (vLLM already skips
   their generators for rows without drafts), so outputs are unchanged.

4. Seeded requests whose prefill is chunked (vLLM 0.32 CPU). When a batch's prompts
   exceed the step's token budget (``max_num_batched_tokens``, 4096 by default: e.g.
   64 prompts of 70 tokens), a prompt is prefilled over two steps and the token sampled
   after the partial chunk is discarded. vLLM then rewinds that request's generator
   with ``gen.set_offset(gen.get_offset() - 4)`` so that the discarded draw does not
   shift the request's random stream; a CPU generator has no offset and raises
   ``RuntimeError: CPU Generator does not use offset``, killing the engine. We take the
   generators of the discarded rows out of the batch for that sampling step (the row
   samples from the global generator; its token is thrown away anyway) and put them
   back after, so the request's own stream is untouched: the effect the rewind has on
   GPUs. Seeded outputs are then the same with and without chunking.

5. A tied LM head keeps its old weights after a weight reload (vLLM 0.32 CPU, models
   with ``tie_word_embeddings``, e.g. SmolLM2). The CPU backend computes logits through
   a GEMM handle it packs from the LM head's weight once, after loading
   (``dispatch_cpu_unquantized_gemm``: a oneDNN or sgl-kernel copy). ``reload_weights``
   re-processes every layer it loaded a weight for, but the tied head has no checkpoint
   weight of its own ("lm_head.weight" is skipped), so its packed copy is never rebuilt:
   after a sync the embeddings are new and the logits come from the old head. Measured
   on a tiny Llama after perturbing only the embeddings: returned logprobs off by 1.3
   (vs 1e-6 for every other weight). After each reload we rebuild the head's GEMM handle
   from its (shared, updated) weight.

Switch all fixes off with ``ATLAS_RL_COMPAT=off`` (used by the test that shows the
sampling bug is real and that our exactness test detects it).
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"
# Releases where both bugs were seen. Outside this range the self-checks still run:
# a fix is only ever applied where its check shows the bug.
_AFFECTED = ((0, 32), (0, 32))

_status: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get("ATLAS_RL_COMPAT", "on").lower() not in {"0", "off", "false", "no"}


def _vllm_version() -> tuple[int, int]:
    import vllm

    parts = vllm.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return (0, 0)


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def status() -> dict[str, str]:
    """What each fix did in this process: 'applied', 'not needed: ...', 'off', ..."""
    return dict(_status)


# --- 1. expand_kernel -------------------------------------------------------------

def _expand_into_output(output, input_val, cu_num_tokens, replace_from, replace_to,
                        MAX_NUM_TOKENS=None):  # noqa: N803 (the kernel's own name)
    # E.g. input [a, b, c], cu_num_tokens [2, 5, 6] -> output [a, a, b, b, b, c].
    counts = torch.diff(cu_num_tokens.to(torch.int64),
                        prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def _expand_is_correct() -> bool:
    """Run vLLM's own expand path on float values and check the result."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    x = torch.tensor([0.123, 7.25, 3.5], dtype=torch.float32)
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    want = torch.tensor([0.123, 0.123, 7.25, 7.25, 7.25, 3.5])
    for _ in range(3):  # uninitialised memory could match once by chance, not thrice
        got = expand_batch_to_tokens(x, cu, 6, replace_from=0, replace_to=1)
        if not torch.equal(got, want):
            return False
    return True


def fix_expand_kernel() -> str:
    """Apply fix 1 if the running vLLM needs it. Call after an engine was built (the
    override is registered during worker init)."""
    if not enabled():
        _status["expand_kernel"] = "off (ATLAS_RL_COMPAT=off)"
        return _status["expand_kernel"]
    if not _is_cpu_platform():
        _status["expand_kernel"] = "not needed: not the CPU platform"
        return _status["expand_kernel"]
    if _expand_is_correct():
        _status.setdefault("expand_kernel", f"not needed: vLLM {'.'.join(map(str, _vllm_version()))} expands floats correctly")
        return _status["expand_kernel"]
    from vllm.triton_utils.dispatcher import KernelOverride
    import vllm.v1.sample.rejection_sampler as rs

    override = rs.expand_kernel
    if not isinstance(override, KernelOverride):
        raise RuntimeError(
            "vLLM's CPU expand kernel gives wrong float results, but it is not the "
            "KernelOverride atlas-rl knows how to fix (vLLM "
            f"{'.'.join(map(str, _vllm_version()))}): sampling at temperature > 0 with "
            "speculation would be wrong. Use temperature 0 or speculation='none'."
        )
    override._impl = _expand_into_output
    override.func = _expand_into_output
    if not _expand_is_correct():
        raise RuntimeError("atlas-rl's expand_kernel fix did not take effect")
    if not (_AFFECTED[0] <= _vllm_version() <= _AFFECTED[1]):
        logger.warning("vLLM %s still has the CPU expand_kernel bug; atlas-rl fixed it",
                       _vllm_version())
    _status["expand_kernel"] = "applied"
    logger.info("atlas-rl: fixed vLLM CPU expand_kernel (float outputs were dropped)")
    return _status["expand_kernel"]


# --- 2. repeated kernel registration ---------------------------------------------

def fix_repeated_registration() -> str:
    """Apply fix 2 (before building an engine): register CPU kernel overrides once."""
    if not enabled():
        _status["repeated_registration"] = "off (ATLAS_RL_COMPAT=off)"
        return _status["repeated_registration"]
    if not _is_cpu_platform():
        _status["repeated_registration"] = "not needed: not the CPU platform"
        return _status["repeated_registration"]
    from vllm.platforms.cpu import CpuPlatform
    from vllm.triton_utils import dispatcher

    original = CpuPlatform.register_triton_kernel_overrides
    if getattr(original, "_atlas_once", False):
        return _status["repeated_registration"]
    if not hasattr(dispatcher, "_registry"):
        _status["repeated_registration"] = "not needed: vLLM has no kernel registry"
        return _status["repeated_registration"]
    func = original.__func__

    def register_once(cls) -> None:
        # The overrides are process-global: once the expand kernel is registered, the
        # rebinding scan has run and a second one can only fail.
        if _EXPAND_KERNEL in dispatcher._registry:
            return
        func(cls)

    register_once._atlas_once = True
    CpuPlatform.register_triton_kernel_overrides = classmethod(register_once)
    _status["repeated_registration"] = "applied"
    return _status["repeated_registration"]


# --- 3. recovered-token noise on steps without drafts ---------------------------

_RECOVERED_PARAMS = ("max_spec_len", "num_draft_tokens", "cu_num_draft_tokens",
                     "draft_token_ids", "draft_probs", "target_probs", "sampling_metadata",
                     "device", "use_fp64_gumbel")


def fix_recovered_noise_without_drafts() -> str:
    """Apply fix 3: skip the recovered-token sampling when no request has a draft."""
    if not enabled():
        _status["recovered_noise"] = "off (ATLAS_RL_COMPAT=off)"
        return _status["recovered_noise"]
    import inspect

    import vllm.v1.sample.rejection_sampler as rs

    original = getattr(rs, "sample_recovered_tokens", None)
    if getattr(original, "_atlas_skip_empty", False):
        return _status["recovered_noise"]
    if original is None or tuple(inspect.signature(original).parameters) != _RECOVERED_PARAMS:
        _status["recovered_noise"] = "not applicable: vLLM's rejection sampler changed"
        return _status["recovered_noise"]

    def sample_recovered_tokens(max_spec_len, num_draft_tokens, cu_num_draft_tokens,
                                draft_token_ids, *args, **kwargs):
        if draft_token_ids.shape[0] == 0:  # no drafts: no position to recover
            return torch.empty_like(draft_token_ids)
        return original(max_spec_len, num_draft_tokens, cu_num_draft_tokens,
                        draft_token_ids, *args, **kwargs)

    sample_recovered_tokens._atlas_skip_empty = True
    rs.sample_recovered_tokens = sample_recovered_tokens
    _status["recovered_noise"] = "applied"
    return _status["recovered_noise"]


# --- 4. seeded requests with a chunked prefill ----------------------------------

def _cpu_generator_has_offset() -> bool:
    try:
        torch.Generator("cpu").get_offset()
        return True
    except RuntimeError:
        return False


def fix_seeded_chunked_prefill() -> str:
    """Apply fix 4 (before building an engine): never rewind a CPU generator."""
    if not enabled():
        _status["seeded_chunked_prefill"] = "off (ATLAS_RL_COMPAT=off)"
        return _status["seeded_chunked_prefill"]
    if not _is_cpu_platform():
        _status["seeded_chunked_prefill"] = "not needed: not the CPU platform"
        return _status["seeded_chunked_prefill"]
    if _cpu_generator_has_offset():
        _status["seeded_chunked_prefill"] = "not needed: CPU generators have offsets"
        return _status["seeded_chunked_prefill"]
    import inspect

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.sample_tokens
    if getattr(original, "_atlas_no_rewind", False):
        return _status["seeded_chunked_prefill"]
    try:
        rewinds = "set_offset" in inspect.getsource(GPUModelRunner._bookkeeping_sync)
    except (AttributeError, OSError, TypeError):
        rewinds = False
    if not rewinds or not hasattr(GPUModelRunner, "sample_tokens"):
        _status["seeded_chunked_prefill"] = "not needed: vLLM does not rewind generators"
        return _status["seeded_chunked_prefill"]

    def sample_tokens(self, *args, **kwargs):
        batch = getattr(self, "input_batch", None)
        mask = getattr(self, "discard_request_mask", None)
        held = {}
        if batch is not None and mask is not None and batch.generators:
            num_reqs = batch.num_reqs
            for i in mask.np[:num_reqs].nonzero()[0].tolist():
                gen = batch.generators.get(i)
                if gen is not None and gen.device.type == "cpu":
                    held[i] = batch.generators.pop(i)
        try:
            return original(self, *args, **kwargs)
        finally:
            if held:
                batch.generators.update(held)

    sample_tokens._atlas_no_rewind = True
    GPUModelRunner.sample_tokens = sample_tokens
    _status["seeded_chunked_prefill"] = "applied"
    return _status["seeded_chunked_prefill"]


# --- 5. a tied LM head after a weight reload -------------------------------------

def refresh_tied_lm_head(model) -> str:
    """Apply fix 5 after a weight reload: rebuild the CPU GEMM handle of an LM head that
    shares its weight with the input embeddings."""
    if not enabled():
        _status["tied_lm_head"] = "off (ATLAS_RL_COMPAT=off)"
        return _status["tied_lm_head"]
    if not _is_cpu_platform():
        _status["tied_lm_head"] = "not needed: not the CPU platform"
        return _status["tied_lm_head"]
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    tied = (head is not None and embed is not None
            and getattr(head, "weight", None) is getattr(embed, "weight", None))
    if not tied or not hasattr(head, "cpu_linear"):
        _status["tied_lm_head"] = "not needed: no tied LM head with a packed CPU GEMM"
        return _status["tied_lm_head"]
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(head, remove_weight=False)
    _status["tied_lm_head"] = "applied"
    return _status["tied_lm_head"]

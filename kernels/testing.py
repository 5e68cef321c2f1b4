"""Synthetic verification inputs and the comparison of the two verification backends
(`rejection.rejection_sample` in torch, the reference; `rejection_triton`), shared by
the tests (tests/test_kernels_triton.py, tests/test_gpu.py) and the GPU check
(`atlas_rl.gpu_bench`)."""

from __future__ import annotations

import math

import torch

from atlas_rl.kernels.rejection import rejection_sample


def verification_case(kind: str, counts, vocab: int, *, support: int = 64, device="cpu",
                      seed: int = 0, accept: float = 0.7, dtype=torch.float32) -> dict:
    """Inputs of `rejection_sample` for ``counts`` draft tokens per request: logits with
    std-2 noise where each draft token x is lifted to p(x) ~ ``accept`` x U(0.4, 1.6) (a
    drafter worth verifying), a sparse q on ``support`` distinct ids containing x (dense: the same q
    scattered over the vocabulary), uniforms, bonus tokens and bonus logits."""
    device = torch.device(device)
    gen = torch.Generator(device).manual_seed(seed)
    n, num_reqs = sum(counts), len(counts)
    logits = torch.randn(n, vocab, generator=gen, device=device) * 2
    x = torch.randint(0, vocab, (n,), generator=gen, device=device)
    rows = torch.arange(n, device=device)
    # p(x) around `accept`, spread over rows (x's own term left out of the logsumexp: ~1/V)
    target = (accept * (0.4 + 1.2 * torch.rand(n, generator=gen, device=device))).clamp(0.02, 0.98)
    logits[rows, x] = torch.logsumexp(logits, -1) + torch.log(target / (1 - target))
    case = dict(draft_token_ids=x, num_draft_tokens=list(counts), target_logits=logits.to(dtype),
                bonus_token_ids=torch.randint(0, vocab, (num_reqs,), generator=gen, device=device),
                uniform=torch.rand(n, generator=gen, device=device, dtype=torch.float64),
                recovery_uniform=torch.rand(num_reqs, generator=gen, device=device,
                                            dtype=torch.float64),
                max_spec_len=max(counts, default=0),
                bonus_logits=(torch.randn(num_reqs, vocab, generator=gen, device=device)
                              * 2).to(dtype))
    if kind != "one-hot":
        s = min(support, vocab)
        step = vocab // s  # distinct ids: x + j * step (mod vocab), j < s
        ids = (x[:, None] + torch.arange(s, device=device) * step) % vocab
        q = torch.softmax(torch.randn(n, s, generator=gen, device=device), -1)
        q[:, 0] += 1.5  # q(x) ~ 0.6: p(x) / q(x) ranges over (0, 1.6), some rows reject
        q /= q.sum(-1, keepdim=True)
        if kind == "sparse":
            case.update(draft_probs=q, draft_ids=ids)
        else:
            case["draft_probs"] = torch.zeros(n, vocab, device=device).scatter_(1, ids, q)
    return case


def draft_q_kwargs(kind: str, q_rows, repeat: int, device="cpu") -> dict:
    """`rejection_sample`'s q arguments for drafts whose position j was drawn from the dense
    distribution ``q_rows[j]``, for ``repeat`` requests: nothing (one-hot), the dense rows,
    or the sparse form (support: q's nonzero tokens, padded with id 0, probability 0)."""
    if kind == "dense":
        return {"draft_probs": torch.stack(q_rows).to(device).repeat(repeat, 1)}
    if kind != "sparse":
        return {}
    vocab = q_rows[0].shape[-1]
    ids, qs = [], []
    for q in q_rows:
        nz = q.nonzero().squeeze(1)
        ids.append(torch.cat([nz, torch.zeros(vocab - len(nz), dtype=torch.long)]))
        qs.append(torch.cat([q[nz], torch.zeros(vocab - len(nz))]))
    return {"draft_ids": torch.stack(ids).to(device).repeat(repeat, 1),
            "draft_probs": torch.stack(qs).to(device).repeat(repeat, 1)}


def logprob_tolerance(vocab: int, lse: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """How far two float32 log-softmax values of the same logit may differ when they sum
    the V exponentials in different orders (Triton chunk sums vs torch's reduction):
    each exp(l - m) is off by <= (2 + |l - m|) ulp, a tree sum of V terms by <= log2(V)
    ulp relative, and log(.) + m adds an ulp of |lse|; twice (both sides), with a factor
    2 of slack: 4u(2 + 2 log2 V + |lse| + |l|)."""
    u = torch.finfo(torch.float32).eps / 2
    return 4 * u * (2 + 2 * math.log2(vocab) + lse.abs() + logit.abs())


def compare_backends(case: dict, chunk: int | None = None, graphed: bool = False) -> dict:
    """Run torch and Triton on the same case (N > 0 draft tokens); tokens must be
    identical, logprobs within `logprob_tolerance`. ``graphed``: the Triton launches
    replayed as a CUDA graph too (`rejection_triton.rejection_sample_triton_graphed`; on
    the CPU its padded static buffers, run eagerly), which must return exactly what the
    eager launches return (``graph_equal``)."""
    from atlas_rl.kernels.rejection_triton import (
        rejection_sample_triton,
        rejection_sample_triton_graphed,
    )

    ref, ref_lp = rejection_sample(**case, backend="torch", return_logprobs=True,
                                   recovery_dtype=torch.float64)  # the Triton path's precision
    tri, tri_lp = rejection_sample_triton(**case, return_logprobs=True, chunk=chunk)
    graph_equal = None
    if graphed:
        g_out, g_lp = rejection_sample_triton_graphed(**case, return_logprobs=True, chunk=chunk)
        g_one = rejection_sample_triton_graphed(**case, chunk=chunk)  # the variant without
        graph_equal = bool(torch.equal(g_out, tri) and torch.equal(g_lp, tri_lp)
                           and torch.equal(g_one, tri))
    logits, device = case["target_logits"], ref.device
    counts = torch.tensor(case["num_draft_tokens"], device=device)
    tokens = ref.long().clamp(min=0)
    pos = torch.arange(ref.shape[1], device=device)
    rows = (torch.cumsum(counts, 0) - counts)[:, None] + pos
    logit = torch.where(pos[None, :] < counts[:, None],  # the logit each logprob came from
                        logits[rows.clamp(max=logits.shape[0] - 1), tokens].float(),
                        case["bonus_logits"].gather(1, tokens).float())
    tol = logprob_tolerance(logits.shape[-1], logit - ref_lp, logit).cpu()
    ref, ref_lp, tri, tri_lp, counts = (t.cpu() for t in (ref, ref_lp, tri, tri_lp, counts))
    out_len = (ref != -1).sum(1)
    accepted = int((out_len - 1).sum())
    recovered = int((out_len - 1 < counts).sum())
    valid = ref != -1
    err = (ref_lp - tri_lp).abs()
    return {"equal": bool(torch.equal(ref, tri)),
            "logprob_max_err": float(err[valid].max()) if valid.any() else 0.0,
            "logprob_within_tolerance": bool((err <= tol)[valid].all()),
            "logprob_tolerance_min": float(tol[valid].min()) if valid.any() else 0.0,
            "placeholders_match": bool(torch.equal(ref == -1, tri == -1)),
            "accepted": accepted, "recovered": recovered, "graph_equal": graph_equal,
            "bonus": int((out_len - 1 == counts).sum())}

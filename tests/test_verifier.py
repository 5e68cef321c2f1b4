"""atlas-rl's rejection sampler (atlas_rl.kernels.rejection): every output token follows
the target distribution p exactly, whatever the draft distribution q (dense, sparse or
one-hot), and drafts are accepted with probability sum(min(p, q)) = 1 - TV(p, q).

Statistical checks on synthetic distributions, seeded (a pass is reproducible): chi-square
against p with 60,000 draws per position; a verifier that forgets to subtract q from
the residual, or accepts with p(x) instead of p(x)/q(x), fails them by a wide margin."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from atlas_rl.kernels.rejection import (PLACEHOLDER_TOKEN_ID, is_packed, pack_sparse_q,
                                        rejection_sample, unpack_sparse_q)
from atlas_rl.kernels.testing import draft_q_kwargs

V = 7
B = 60_000
ALPHA = 1e-4


def _dist(g, sharp=1.0, zero=None):
    p = torch.softmax(torch.randn(V, generator=g) * 2 * sharp, 0)
    if zero is not None:
        p[zero] = 0
        p /= p.sum()
    return p


def _chi2_p(samples, p):
    counts = torch.bincount(samples.long(), minlength=len(p)).double()
    expected = p.double() * len(samples)
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled a token of probability 0: {counts}"
    expected = expected[support] * (counts.sum() / expected[support].sum())  # rounding
    return stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue


def _run(kind, g, p_rows, q_rows, k=2):
    """B requests, k draft tokens each; position j's draft is drawn from q_rows[j] (dense
    [V]) and verified against p_rows[j]; the bonus from p_rows[k]."""
    logits = torch.log(torch.stack(p_rows).clamp_min(1e-30))  # [k+1, V]
    drafts = torch.stack([torch.multinomial(q, B, replacement=True, generator=g)
                          for q in q_rows], 1)  # [B, k]
    if kind == "one-hot":  # a deterministic drafter: q = delta at its token
        drafts = torch.stack([torch.full((B,), int(q.argmax())) for q in q_rows], 1)
    target = logits[:k].repeat(B, 1)  # [B*k, V], request-major
    bonus = torch.multinomial(p_rows[k], B, replacement=True, generator=g)
    uniform = torch.rand(B * k, generator=g, dtype=torch.float64)
    recovery = torch.rand(B, generator=g, dtype=torch.float64)
    kwargs = draft_q_kwargs(kind, q_rows, B)
    out = rejection_sample(drafts.reshape(-1), [k] * B, target, bonus, uniform, recovery,
                           max_spec_len=k, **kwargs)
    return drafts, out


@pytest.mark.parametrize("kind", ["dense", "sparse", "one-hot"])
def test_output_tokens_follow_p_and_acceptance_is_one_minus_tv(kind):
    g = torch.Generator().manual_seed({"dense": 1, "sparse": 2, "one-hot": 3}[kind])
    p_rows = [_dist(g), _dist(g, zero=[1, 4]), _dist(g)]
    # q overlaps p only partly; position 1's q puts mass on a token p forbids
    q_rows = [_dist(g, sharp=1.5), _dist(g, zero=[0, 2])]
    drafts, out = _run(kind, g, p_rows, q_rows)
    assert out.shape == (B, 3) and out.dtype == torch.int32

    # position 0 always holds a token, distributed as p0
    assert _chi2_p(out[:, 0], p_rows[0]) > ALPHA
    accepted0 = out[:, 0] == drafts[:, 0]
    # reached position 1 <=> position 0 accepted; there, the token is distributed as p1
    reached = out[:, 1] != PLACEHOLDER_TOKEN_ID
    assert torch.equal(reached, accepted0)
    assert _chi2_p(out[reached, 1], p_rows[1]) > ALPHA
    # the bonus only after two accepted tokens, and it is the given bonus token
    both = reached & (out[:, 1] == drafts[:, 1])
    assert torch.equal(out[:, 2] != PLACEHOLDER_TOKEN_ID, both)

    q0 = q_rows[0] if kind != "one-hot" else torch.nn.functional.one_hot(
        q_rows[0].argmax(), V).float()
    expected = float(torch.minimum(p_rows[0], q0).sum())  # 1 - TV(p, q)
    rate = accepted0.double().mean().item()
    assert abs(rate - expected) < 4 * (expected * (1 - expected) / B) ** 0.5 + 1e-3, (rate, expected)


def test_drafting_from_p_itself_is_always_accepted():
    g = torch.Generator().manual_seed(5)
    p = [_dist(g), _dist(g), _dist(g)]
    drafts, out = _run("dense", g, p, p[:2])
    assert torch.equal(out[:, :2], drafts.int())  # q = p: every draft token accepted


def test_padding_and_requests_without_drafts():
    logits = torch.log_softmax(torch.randn(3, V), -1)
    bonus = torch.tensor([[5], [6], [4]])
    # request 0: two drafts; request 1: none; request 2: one padded (-1) draft token
    out = rejection_sample(torch.tensor([2, 3, -1]), [2, 0, 1], logits, bonus,
                           torch.zeros(3, dtype=torch.float64), torch.full((3,), 0.5), 2)
    assert out[1].tolist() == [6, PLACEHOLDER_TOKEN_ID, PLACEHOLDER_TOKEN_ID]  # bonus only
    assert out[2, 0] != PLACEHOLDER_TOKEN_ID and out[2, 1] == PLACEHOLDER_TOKEN_ID
    # uniform 0 accepts any token of positive probability
    assert out[0].tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match="draft tokens"):
        rejection_sample(torch.tensor([1, 2]), [1], logits[:2], bonus[:1],
                         torch.zeros(2), torch.zeros(1), 2)


def test_nonfinite_logits_rows_are_reported():
    """A NaN or inf target row (a diverged policy) is counted where the verifier already
    has its log-sum-exp; finite rows report 0. (Uniforms 0: every finite position is
    accepted, so the verifier reads every row; past a rejection it reads none.)"""
    logits = torch.randn(4, V)
    args = (torch.tensor([0, 1, 2, 3]), [2, 2])
    rest = (torch.tensor([1, 1]), torch.zeros(4, dtype=torch.float64), torch.rand(2), 2)
    report = {}
    rejection_sample(*args, logits, *rest, report=report)
    assert report["nonfinite_rows"] == 0
    assert torch.allclose(report["target_lse"], torch.logsumexp(logits, -1))
    logits[1] = float("nan")
    logits[3, 2] = float("inf")
    rejection_sample(*args, logits, *rest, report=report)
    assert report["nonfinite_rows"] == 2


@pytest.mark.parametrize("kind", ["dense", "sparse", "one-hot"])
def test_the_lazy_chain_decides_as_the_whole_batch_does(kind):
    """On CPU tensors the acceptance chain reads a position's rows only for requests
    still accepting (`accept_drafts_lazy`); it accepts and rejects exactly what the
    chain over every row (`accept_drafts_torch`, the Triton path's reference) does on the
    same uniforms, and its log-sum-exp agrees on every row it read."""
    from atlas_rl.kernels.rejection import accept_drafts_lazy, accept_drafts_torch

    g = torch.Generator().manual_seed(11)
    vocab, counts_list = 50, [3, 0, 1, 3, 2, 3, 1, 0, 3]
    counts = torch.tensor(counts_list)
    starts = torch.cumsum(counts, 0) - counts
    n = int(counts.sum())
    logits = torch.randn(n, vocab, generator=g) * 1.5
    p = torch.softmax(logits, -1)
    x = torch.multinomial(p, 1, generator=g).squeeze(1)  # often accepted
    x[::4] = torch.randint(0, vocab, (len(x[::4]),), generator=g)
    x[5] = -1  # a padded draft token: always rejected
    q_rows = [torch.softmax(torch.randn(vocab, generator=g), 0) for _ in range(n)]
    kwargs = draft_q_kwargs(kind, q_rows, 1)  # row i: the q that draft token i came from
    q, ids = kwargs.get("draft_probs"), kwargs.get("draft_ids")
    assert q is None or q.shape[0] == n
    for trial in range(20):
        uniform = torch.rand(n, generator=g, dtype=torch.float64)
        out_all = torch.full((len(counts_list), 4), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
        out_lazy = out_all.clone()
        lse = torch.logsumexp(logits, -1)
        first_all = accept_drafts_torch(out_all, x, counts, starts, logits, lse, uniform, q, ids)
        first_lazy, lse_lazy, bad = accept_drafts_lazy(out_lazy, x, counts, starts, logits,
                                                       uniform, q, ids)
        assert torch.equal(first_all, first_lazy) and torch.equal(out_all, out_lazy)
        read = torch.cat([torch.arange(s, s + min(f + 1, c)) for s, f, c in
                          zip(starts.tolist(), first_lazy.tolist(), counts_list)])
        assert torch.allclose(lse_lazy[read], lse[read]) and bad == 0


def test_bonus_tokens_drawn_by_the_verifier_follow_the_bonus_row():
    """Without bonus_token_ids the verifier draws the bonus token from bonus_logits, only
    for requests whose drafts were all accepted (and those without drafts): it follows
    softmax(bonus row); requests that rejected a draft get their recovered token only."""
    g = torch.Generator().manual_seed(21)
    p_rows = [_dist(g), _dist(g), _dist(g, zero=[2])]  # two draft positions, the bonus row
    logits = torch.log(torch.stack(p_rows).clamp_min(1e-30))
    n_req = B
    drafts = torch.stack([torch.multinomial(p, n_req, replacement=True, generator=g)
                          for p in p_rows[:2]], 1)  # drafted from p itself: always accepted
    half = n_req // 2  # the second half: no drafts at all
    counts = [2] * half + [0] * (n_req - half)
    target = logits[:2].repeat(half, 1)
    bonus_logits = logits[2].expand(n_req, V).contiguous()
    report = {}
    out = rejection_sample(drafts[:half].reshape(-1), counts, target, None,
                           torch.rand(2 * half, generator=g, dtype=torch.float64),
                           torch.rand(n_req, generator=g, dtype=torch.float64), 2,
                           draft_probs=torch.stack(p_rows[:2]).repeat(half, 1),
                           bonus_logits=bonus_logits, report=report)
    assert torch.equal(out[:half, :2], drafts[:half].int())  # q = p: all accepted
    assert _chi2_p(out[:half, 2], p_rows[2]) > ALPHA
    assert _chi2_p(out[half:, 0], p_rows[2]) > ALPHA  # no drafts: the bonus is the token
    assert (out[half:, 1:] == PLACEHOLDER_TOKEN_ID).all()
    assert torch.allclose(report["bonus_lse"], torch.logsumexp(bonus_logits, -1))
    with pytest.raises(ValueError, match="bonus_logits"):
        rejection_sample(drafts[:2].reshape(-1), [2, 2], logits[:2].repeat(2, 1), None,
                         torch.rand(4, dtype=torch.float64), torch.rand(2), 2)


def test_target_logits_are_not_modified():
    logits = torch.randn(4, V)
    before = logits.clone()
    q = torch.softmax(torch.randn(4, V), -1)
    rejection_sample(torch.tensor([0, 1, 2, 3]), [2, 2], logits, torch.tensor([1, 1]),
                     torch.full((4,), 0.99, dtype=torch.float64), torch.rand(2), 2,
                     draft_probs=q)
    assert torch.equal(logits, before)


def test_packed_sparse_q_round_trip_and_width():
    ids = torch.tensor([[[3, 9, 0], [1, 2, 7]]])
    q = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]])
    packed = pack_sparse_q(ids, q, vocab_size=50)
    assert packed.shape == (1, 2, 6) and is_packed(packed, 50)
    back_ids, back_q = unpack_sparse_q(packed)
    assert torch.equal(back_ids, ids) and torch.equal(back_q, q)
    # a packed width equal to the vocabulary would read as a dense q: it is padded
    wide = pack_sparse_q(ids, q, vocab_size=6)
    assert wide.shape[-1] == 8 and is_packed(wide, 6)
    assert not is_packed(torch.zeros(2, 50), 50)
    with pytest.raises(ValueError, match="2\\*\\*24"):
        pack_sparse_q(ids, q, vocab_size=2 ** 24)


def test_logprobs_of_output_tokens_match_vllms():
    """The verifier's logprobs path (output positions only) returns what vLLM's
    `_get_logprobs_tensors` returns at every position that holds an output token."""
    from types import SimpleNamespace

    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    from atlas_rl.backends.vllm import sampler as atlas_sampler

    vocab = 300
    drafts = [[5, 7, 9], [11], [], [3, 4]]
    meta = SpecDecodeMetadata.make_dummy(drafts, torch.device("cpu"))
    target_idx, bonus_idx, start = [], [], 0
    for d in drafts:  # request b's logits rows: its draft positions, then its bonus row
        target_idx += range(start, start + len(d))
        bonus_idx.append(start + len(d))
        start += len(d) + 1
    meta.target_logits_indices = torch.tensor(target_idx, dtype=torch.int32)
    meta.bonus_logits_indices = torch.tensor(bonus_idx, dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(start, vocab, generator=g) * 3
    target, bonus = logits[meta.target_logits_indices.long()], logits[meta.bonus_logits_indices.long()]
    P = PLACEHOLDER_TOKEN_ID
    sampled = torch.tensor([[5, 7, 42, P], [11, 8, P, P], [17, P, P, P], [200, P, P, P]],
                           dtype=torch.int32)

    sampler = RejectionSampler(Sampler(logprobs_mode="processed_logprobs"))
    expected = {k: sampler._get_logprobs_tensors(k, meta, logits, target, bonus, sampled)
                for k in (0, 1, 3)}
    assert atlas_sampler.attach(SimpleNamespace(rejection_sampler=sampler), atlas_verifies=True)
    assert isinstance(sampler, atlas_sampler.AtlasRejectionSampler)
    valid = (sampled != P).flatten()
    for k, want in expected.items():
        got = sampler._get_logprobs_tensors(k, meta, logits, target, bonus, sampled)
        assert got.logprobs.shape == want.logprobs.shape == (sampled.numel(), k + 1)
        assert torch.equal(got.logprob_token_ids[valid], want.logprob_token_ids[valid])
        assert torch.allclose(got.logprobs[valid], want.logprobs[valid], atol=1e-5)
        assert torch.equal(got.selected_token_ranks[valid], want.selected_token_ranks[valid])
    from atlas_rl.backends.vllm import hooks

    assert hooks.status()["atlas_sampler"].startswith("applied")


def _triton_probe(device: str, interpret: bool) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).parent / "probes" / "triton_rejection_probe.py"
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    proc = subprocess.run([sys.executable, str(probe), device], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_triton_matches_torch(results):
    for kind, r in results.items():
        assert r["equal"], (kind, r["torch"], r["triton"])
        assert r["accepted"] >= 3, (kind, r)  # the acceptance path itself was exercised


def test_triton_acceptance_kernel_matches_torch_reference_interpreted():
    """The Triton kernel, run by Triton's interpreter on the CPU: same output tokens as
    the torch reference for one-hot, sparse and dense q on the same uniforms."""
    pytest.importorskip("triton")
    _check_triton_matches_torch(_triton_probe("cpu", interpret=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_acceptance_kernel_matches_torch_reference_on_gpu():
    _check_triton_matches_torch(_triton_probe("cuda", interpret=False))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_an_empty_residual_draws_from_p(kind):
    """Where q covers p everywhere (q = p: rejection had probability ~0, reachable only
    by rounding), the residual max(p - q, 0) is empty and the recovered token is drawn
    from p itself."""
    from atlas_rl.kernels.rejection import _recovered_tokens

    g = torch.Generator().manual_seed(31)
    p = _dist(g, zero=[3])
    logits = torch.log(p.clamp_min(1e-30))[None].repeat(B, 1)
    lse = torch.logsumexp(logits, -1)
    q = torch.exp(logits - lse[:, None])  # p, as the verifier computes it: bitwise
    kwargs = ({"draft_probs": q} if kind == "dense" else
              {"draft_probs": q, "draft_ids": torch.arange(V).expand(B, V)})
    rows = torch.arange(B)
    out = _recovered_tokens(logits, rows, torch.zeros(B, dtype=torch.long),
                            kwargs["draft_probs"], kwargs.get("draft_ids"),
                            torch.rand(B, generator=g, dtype=torch.float64), torch.float32, lse)
    assert _chi2_p(out, p) > ALPHA

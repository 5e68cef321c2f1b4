"""AtlasRejectionSampler's first choice: a step in which no request has a draft is
sampled the way an engine without speculation samples it (vLLM's plain sampler, not the
rejection sampler).

An atlas engine whose controller drafts nothing must then give exactly what a
speculation='none' engine gives: the same tokens and bit-identical logprobs (through the
rejection sampler they came out up to ~1e-6 off: a second log_softmax). Timings are not
asserted here (see atlas_rl.backends.vllm.sampler and BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "one two three four one two three four one two three",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "import os\nimport sys\nimport json\n",
]


@pytest.fixture(scope="module")
def silent(make_engine, tiny_model_path):
    """An atlas engine that never drafts: its hard cap allows no batch at all. float32 on
    every CPU: the comparisons below are token for token and logprob for logprob."""
    return make_engine(tiny_model_path, "atlas", dtype="float32", max_speculation_batch_size=0)


@pytest.fixture(scope="module")
def baseline(make_engine, tiny_model_path):
    return make_engine(tiny_model_path, "none", dtype="float32")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@pytest.mark.parametrize("seed, top_p", [(0, 1.0), (21, 0.9)])
def test_atlas_drafting_nothing_samples_exactly_like_no_speculation(silent, baseline, seed, top_p):
    from atlas_rl.backends.vllm import hooks

    got = silent.generate(PROMPTS, n=4, temperature=1.0, top_p=top_p, max_tokens=24, seed=seed)
    want = baseline.generate(PROMPTS, n=4, temperature=1.0, top_p=top_p, max_tokens=24, seed=seed)
    assert got.stats["num_draft_tokens"] == 0  # the premise: nothing was drafted
    if _on_cpu():
        assert "processed_logprobs: plain sampler" in hooks.status()["atlas_sampler"]
    assert got.completion_ids == want.completion_ids
    assert [c.logprobs for c in got] == [c.logprobs for c in want]  # exact, not approx
    assert [c.top1_logprobs for c in got] == [c.top1_logprobs for c in want]


def test_greedy_drafting_nothing_matches_too(silent, baseline):
    got = silent.generate(PROMPTS, n=2, temperature=0.0, max_tokens=16)
    want = baseline.generate(PROMPTS, n=2, temperature=0.0, max_tokens=16)
    assert got.completion_ids == want.completion_ids
    assert [c.logprobs for c in got] == [c.logprobs for c in want]


def test_self_check_and_guards(silent):
    """The fix's self-check passes on this engine's samplers, and steps it must leave to
    the rejection sampler (a draft anywhere, the dummy metadata of a warmup) are left."""
    if not _on_cpu():
        pytest.skip("the plain path is CPU-only")
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    from atlas_rl.backends.vllm import sampler
    from atlas_rl.backends.vllm.engine import model_runner

    rs = model_runner(silent.llm).rejection_sampler
    assert isinstance(rs, sampler.AtlasRejectionSampler)
    vocab = silent.vocab_size
    rng = torch.get_rng_state()
    assert sampler.plain_matches_rejection(rs, vocab) is None
    assert torch.equal(torch.get_rng_state(), rng)  # the check leaves the global RNG alone

    metadata, logits, make_sm = sampler.synthetic_batch(vocab, all_random=True)
    assert sampler.plain_sampling_applies(rs, metadata, None, logits, make_sm())
    dummy = SpecDecodeMetadata.make_dummy([[], [], [], []], device=logits.device)
    assert not sampler.plain_sampling_applies(rs, dummy, None, logits, make_sm())
    drafted = SpecDecodeMetadata.make_dummy([[5], [], [], []], device=logits.device)
    assert not sampler.plain_sampling_applies(rs, drafted, None, logits, make_sm())


def test_vllm_peers_keep_vllms_stock_sampler(make_engine, tiny_model_path):
    """The speed changes are atlas engines' own: an engine built without atlas-rl's
    speculative config (the benchmark's vLLM peers) samples with vLLM's stock classes."""
    from vllm.v1.sample.rejection_sampler import RejectionSampler

    from atlas_rl.backends.vllm import sampler
    from atlas_rl.backends.vllm.engine import model_runner

    peer = make_engine(tiny_model_path, "vllm-ngram", dtype="float32")
    rs = model_runner(peer.llm).rejection_sampler
    assert type(rs) is RejectionSampler and not isinstance(rs, sampler.AtlasRejectionSampler)
    assert "propose_draft_token_ids" not in vars(model_runner(peer.llm))

"""Engine and proposer mechanics on a tiny random Llama (real vLLM, no real weights).

Random weights say nothing about speed or acceptance; they exercise the plumbing:
per-request variable lookahead, acceptance feedback, counters cross-checked with vLLM's
scheduler, a failing speculator, seeds, prompt forms, bad input."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.exactness import greedy_mismatches
from atlas_rl.speculators.base import Arm

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "one two three four one two three four one two three",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "import os\nimport sys\nimport json\nimport re\nimport os\n",
]
# float32 on every CPU (with or without bf16 units): greedy identity with and without
# speculation and logprobs against transformers are float32 claims; in bf16, verifying k+1
# tokens at once rounds differently from decoding them one by one and near-ties flip.
SPEC = dict(dtype="float32", speculate_always=True)


@pytest.fixture(scope="module")
def atlas(make_engine, tiny_model_path):
    engine = make_engine(tiny_model_path, "atlas", **SPEC)
    if engine.speculators["neural"].vocab is None:
        # no static drafter for this model: the neural drafter takes its draft vocabulary
        # from a first batch of rollouts (before it, it drafts nothing)
        engine.update(engine.generate(PROMPTS, n=2, max_tokens=32, seed=0))
    return engine


@pytest.fixture(scope="module")
def baseline(make_engine, tiny_model_path):
    return make_engine(tiny_model_path, "none", dtype="float32")


def test_proposer_plumbing_variable_lookahead_feedback_and_counters(atlas, baseline):
    seen = []
    originals = {name: spec.feedback for name, spec in atlas.speculators.items()}
    for spec in atlas.speculators.values():
        spec.feedback = (lambda f: lambda key, draft, n: (seen.append((len(draft), n)), f(key, draft, n)))(spec.feedback)
    try:
        batch = atlas.generate(PROMPTS * 2, temperature=0.0, max_tokens=64)
    finally:
        for name, f in originals.items():
            atlas.speculators[name].feedback = f
    s = batch.stats
    assert s["num_draft_tokens"] > 0 and s["num_drafts"] > 0
    # Our feedback bookkeeping agrees with what vLLM's scheduler counted.
    assert s["proposer_num_draft_tokens"] == s["num_draft_tokens"]
    assert s["proposer_num_accepted_tokens"] == s["num_accepted_tokens"]
    assert sum(n for _, n in seen) == s["num_accepted_tokens"]
    assert all(0 <= n <= d for d, n in seen)
    # Lookahead varies per request and step (0 = no draft is one of the choices).
    hist = s["lookahead_hist"]
    assert sum(1 for k, count in enumerate(hist) if k > 0 and count > 0) >= 2
    assert s["request_steps"] == sum(hist)
    assert s["acceptance_length"] == pytest.approx(1 + s["num_accepted_tokens"] / s["num_drafts"])
    assert 1.0 <= s["acceptance_length"] <= 1 + atlas.config.max_lookahead
    # Lossless: identical greedy output to no speculation.
    ref = baseline.generate(PROMPTS * 2, temperature=0.0, max_tokens=64)
    assert greedy_mismatches(ref.completion_ids, batch.completion_ids) == []


def test_failing_speculator_degrades_to_no_drafts(atlas, baseline):
    def boom(*args, **kwargs):
        raise RuntimeError("speculator exploded")

    def break_(spec):  # both ways of drafting (the suffix index drafts through propose_both)
        spec.propose = spec.propose_both = boom

    def mend(spec):  # the instance attributes go: the class's methods again
        del spec.propose, spec.propose_both

    ref = baseline.generate(PROMPTS, temperature=0.0, max_tokens=32)
    # One speculator failing: the other still drafts, nothing is lost.
    break_(atlas.speculators["suffix"])
    try:
        batch = atlas.generate(PROMPTS, temperature=0.0, max_tokens=32)
    finally:
        mend(atlas.speculators["suffix"])
    assert batch.stats["speculator_errors"] > 0 and batch.stats["drafts_neural"] + batch.stats["drafts_neural-dist"] == 1.0
    assert batch.completion_ids == ref.completion_ids
    # All of them failing: no drafts, the same rollouts.
    for spec in atlas.speculators.values():
        break_(spec)
    try:
        batch = atlas.generate(PROMPTS, temperature=0.0, max_tokens=32)
    finally:
        for spec in atlas.speculators.values():
            mend(spec)
    assert batch.stats["speculator_errors"] > 0
    assert batch.stats["num_draft_tokens"] == 0
    assert all(len(c.completion_ids) > 0 for c in batch)
    assert batch.completion_ids == ref.completion_ids
    # And it recovers on the next call.
    again = atlas.generate(PROMPTS, temperature=0.0, max_tokens=32)
    assert again.stats["speculator_errors"] == 0 and again.stats["num_draft_tokens"] > 0


def test_batch_fields_and_logprobs(atlas):
    batch = atlas.generate(PROMPTS[:2], n=3, temperature=1.0, max_tokens=16, seed=1)
    assert len(batch) == 6
    assert [c.prompt_index for c in batch] == [0, 0, 0, 1, 1, 1]
    for c in batch:
        assert len(c.logprobs) == len(c.completion_ids) == len(c.top1_logprobs) > 0
        assert all(lp <= 0.0 for lp in c.logprobs)
        assert all(t >= lp - 1e-6 for t, lp in zip(c.top1_logprobs, c.logprobs))
        assert c.finish_reason in {"stop", "length"}
    for key in ("acceptance_length", "acceptance_rate", "lookahead", "tokens_per_s",
                "rollout_seconds", "oracle_acceptance_length"):
        assert key in batch.stats
    assert batch.stats["num_tokens"] == batch.num_tokens
    assert batch.stats["tokens_per_s"] == pytest.approx(batch.num_tokens / batch.stats["rollout_seconds"])


def test_seeds_reproduce_and_group_completions_differ(atlas, baseline):
    """A seed reproduces the call where what is drafted is the same: without speculation
    always. With speculation the tokens drawn depend on the drafts (rejection sampling
    is exact in distribution, not per draw), and an adaptive drafter and controller
    draft differently from one call to the next: the distribution is what holds (the
    sampling tests of test_exactness)."""
    a = baseline.generate(PROMPTS[:2], n=4, temperature=1.0, max_tokens=24, seed=7)
    b = baseline.generate(PROMPTS[:2], n=4, temperature=1.0, max_tokens=24, seed=7)
    assert a.completion_ids == b.completion_ids
    for engine in (baseline, atlas):
        a = engine.generate(PROMPTS[:2], n=4, temperature=1.0, max_tokens=24, seed=7)
        c = engine.generate(PROMPTS[:2], n=4, temperature=1.0, max_tokens=24, seed=8)
        assert a.completion_ids != c.completion_ids
        group = [tuple(x) for x in a.completion_ids[:4]]
        assert len(set(group)) > 1, "the n completions of one prompt must differ"


def test_prompt_forms(atlas):
    ids = atlas.tokenizer.encode(PROMPTS[0])
    from_text = atlas.generate([PROMPTS[0]], temperature=0.0, max_tokens=8)
    from_ids = atlas.generate([ids], temperature=0.0, max_tokens=8)
    assert from_text.prompt_ids[0] == ids == from_ids.prompt_ids[0]
    assert from_text.completion_ids == from_ids.completion_ids


def test_empty_prompt_list_gives_empty_batch(atlas):
    batch = atlas.generate([], n=2)
    assert len(batch) == 0 and batch.stats["num_tokens"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(n=0), "n .* must be an integer >= 1"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_sampling_arguments(atlas, kwargs, match):
    with pytest.raises(ValueError, match=match):
        atlas.generate(PROMPTS[:1], **kwargs)


def test_bad_prompts(atlas):
    with pytest.raises(ValueError, match=r"prompt 0 has 1100 tokens, .*max_model_len is 1024"):
        atlas.generate([[5] * 1100])
    with pytest.raises(ValueError, match="no chat template"):
        atlas.generate([[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        atlas.generate([[1, 2, 10**9]])
    with pytest.raises(TypeError, match="expected a non-empty string"):
        atlas.generate([3.5])
    with pytest.raises(TypeError, match="must be a list"):
        atlas.generate("a bare string")


def test_unknown_speculation_and_model(tiny_model_path):
    from atlas_rl import AtlasRolloutEngine

    with pytest.raises(ValueError, match="unknown speculation 'eagle9'.*atlas, atlas-static, none"):
        AtlasRolloutEngine(tiny_model_path, speculation="eagle9")
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*smollm2-135m-instruct"):
        AtlasRolloutEngine("gpt-17")


def test_update_save_load(atlas, make_engine, tiny_model_path, tmp_path):
    atlas.generate(PROMPTS, temperature=0.0, max_tokens=32)  # drafts verified: calibration data
    batch = atlas.generate(PROMPTS, n=2, temperature=1.0, max_tokens=24, seed=3)
    info = atlas.update(batch)
    assert info["index_sequences"] >= len(batch)
    atlas.save(tmp_path)
    assert (tmp_path / "suffix.safetensors").is_file() and (tmp_path / "atlas_config.json").is_file()
    other = make_engine(tiny_model_path, "atlas", **{**SPEC, "explore": 0.06})
    other.load(tmp_path)
    assert (tmp_path / "neural.safetensors").is_file()
    a_net, o_net = atlas.speculators["neural"].net, other.speculators["neural"].net
    assert all(torch.equal(a, b) for a, b in zip(a_net.state_dict().values(), o_net.state_dict().values()))
    assert atlas.speculators["neural"].version > 0  # the drafter trained in update()
    seq = batch.completions[0].prompt_ids + batch.completions[0].completion_ids
    ctx = seq[: len(batch.completions[0].prompt_ids) + 4]
    for spec in (atlas.speculator, other.speculator):
        spec.begin_batch()
    assert other.controller.state_dict() == atlas.controller.state_dict()
    assert sum(c.total_trials for c in other.controller.calibration[Arm("suffix")].positions) > 0
    mine = atlas.speculator.propose(["x"], [ctx], [6])[0]
    theirs = other.speculator.propose(["x"], [ctx], [6])[0]
    assert mine.tokens and mine.tokens == theirs.tokens


def test_seeded_sampling_with_a_chunked_prefill_matches_unchunked(tiny_model_path, baseline):
    """compat fix 4: prompts that exceed the step's token budget are prefilled in chunks;
    vLLM's generator rewind crashed on CPU generators. With the fix the run completes,
    and the seeded samples equal those of an engine that never chunks."""
    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.compat import vllm_cpu

    chunked = AtlasRolloutEngine(
        tiny_model_path, "none", AtlasConfig(dtype="float32", cpu_kv_cache_gib=1,
                                             max_model_len=1024),
        max_num_batched_tokens=64, max_num_seqs=8)
    assert vllm_cpu.status()["seeded_chunked_prefill"] in (
        "applied", "not needed: CPU generators have offsets", "not needed: not the CPU platform")
    prompts = PROMPTS * 2  # ~200 prompt tokens against a 64-token budget per step
    got = chunked.generate(prompts, n=2, temperature=1.0, max_tokens=24, seed=11)
    want = baseline.generate(prompts, n=2, temperature=1.0, max_tokens=24, seed=11)
    assert got.completion_ids == want.completion_ids
    del chunked


def test_sync_weights_reaches_every_weight_tied_lm_head_included(tiny_model_path):
    """After sync_weights, the engine's logprobs are the new policy's, for every kind of
    weight. The tied LM head is the one that once stayed stale on the CPU (compat fix 5)
    when the weights come as named_parameters() (TRL's way: no separate lm_head.weight):
    perturbing only the embeddings moved returned logprobs by 1.3."""
    import torch
    from transformers import AutoModelForCausalLM

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.exactness import check_sampling

    engine = AtlasRolloutEngine(tiny_model_path, "atlas", AtlasConfig(
        dtype="float32", cpu_kv_cache_gib=1, max_model_len=1024))
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    torch.manual_seed(3)
    for group in ("embed_tokens", "self_attn", "mlp", "norm"):
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if group in name:
                    p.add_(torch.randn_like(p) * 0.05)
        engine.sync_weights(list(policy.named_parameters()))
        batch = engine.generate(PROMPTS[:2], n=2, temperature=1.0, max_tokens=16, seed=5)
        err = check_sampling(policy, batch).logprob_max_abs_err
        assert err < 1e-4, (group, err)
    del engine


@pytest.mark.parametrize("speculation, end", [("none", "dropped"), ("atlas", "closed")])
def test_an_engine_that_synced_frees_its_model(tiny_model_path, speculation, end):
    """vLLM 0.32 keeps every loaded layer in its reload table, and a sync ties the
    layers to it for good: without atlas-rl's release a synced engine's model (and its
    memory: ~0.8 GB for SmolLM2-135M in float32) outlived the engine. Dropped (two
    collections: the runner's finalizer unties the model, the next one frees it) or
    closed, the model goes, and vLLM's table holds none of its layers."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.backends.vllm import hooks
    from atlas_rl.backends.vllm.engine import model_runner
    from vllm.model_executor.model_loader.reload import layerwise

    engine = AtlasRolloutEngine(tiny_model_path, speculation, AtlasConfig(
        dtype="float32", cpu_kv_cache_gib=0.25, max_model_len=512))
    engine.sync_weights(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32))
    model = model_runner(engine.llm).get_model()
    layers = [weakref.ref(m) for m in model.modules()]
    gone = weakref.ref(model)
    assert any(layer() in layerwise.LAYERWISE_INFO for layer in layers)
    del model
    assert hooks.status()["reload_state"] == "applied"
    if end == "closed":
        engine.close()
        assert not any(layer() in layerwise.LAYERWISE_INFO for layer in layers if layer())
    del engine
    gc.collect()
    gc.collect()
    assert gone() is None, "the engine's model outlived it"
    assert all(layer() is None for layer in layers)


def test_nan_logits_fail_the_generate_call_and_the_engine_recovers(make_engine, tiny_model_path):
    """A policy whose logits are NaN (weights the sync was told to let through, standing
    for a bf16 overflow the weight checks cannot see) fails the generate call with a
    message that says so, instead of returning tokens drawn from NaN; sound weights
    synced afterwards generate as before."""
    from transformers import AutoModelForCausalLM

    from atlas_rl.engine import NonFiniteLogitsError

    engine = make_engine(tiny_model_path, "atlas", **SPEC, allow_nonfinite_weights=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    want = engine.generate(PROMPTS[:2], temperature=0.0, max_tokens=12).completion_ids
    bad = dict(good, **{"model.norm.weight": torch.full_like(good["model.norm.weight"],
                                                             float("nan"))})
    engine.sync_weights(bad)
    with pytest.raises(NonFiniteLogitsError, match="NaN or inf logits: 8 of 8 completions"):
        engine.generate(PROMPTS[:2], n=4, max_tokens=12, seed=0)
    with pytest.raises(NonFiniteLogitsError, match="completion 0, token 0"):
        engine.generate(PROMPTS[:2], temperature=0.0, max_tokens=12)
    assert engine.stats()["nonfinite_generate_calls"] == 2
    # Below the engine: vLLM itself failed each request at its first token (the scheduler
    # finished it with an error), on steps with drafts and without, logprobs asked or not.
    from vllm import SamplingParams

    assert engine.stats()["vllm_hooks"]["failed_requests"] == "applied"
    for params in (SamplingParams(temperature=1.0, max_tokens=12, seed=1),
                   SamplingParams(temperature=0.0, max_tokens=12, logprobs=1)):
        for out in engine.llm.generate(PROMPTS[:2], params, use_tqdm=False):
            assert out.outputs[0].finish_reason == "error", out.outputs[0]
            assert len(out.outputs[0].token_ids) <= 1, out.outputs[0].token_ids
    # Finite weights whose activations overflow (what the sync's checks cannot see): the
    # same failure.
    overflow = dict(good, **{"model.norm.weight": torch.full_like(good["model.norm.weight"],
                                                                  3e38)})
    engine.sync_weights(overflow)
    with pytest.raises(NonFiniteLogitsError, match="8 of 8 completions"):
        engine.generate(PROMPTS[:2], n=4, max_tokens=12, seed=0)
    engine.sync_weights(good)
    assert engine.generate(PROMPTS[:2], temperature=0.0, max_tokens=12).completion_ids == want


def test_the_drafters_survive_sleep_and_wake_up(atlas):
    """TRL's sleep mode (level 2 between generations) discards on a GPU the device memory
    allocated while the model loaded, the drafter's weights included. The CPU backend's
    worker cannot sleep (it ignores the call), so the discard is done here by hand,
    between vLLM's real sleep and wake-up calls: the drafter comes back as it was, reads
    the policy again, and drafts."""
    from atlas_rl.backends.vllm import hooks
    from atlas_rl.speculation import state_digest

    atlas.generate(PROMPTS, max_tokens=8, seed=0)
    neural = atlas.speculators["neural"]
    before = state_digest(atlas.speculators)
    atlas.llm.sleep(level=2)
    with torch.no_grad():  # what a level-2 sleep leaves in that memory on a GPU
        for p in neural.net.parameters():
            p.zero_()
    assert state_digest(atlas.speculators) != before
    atlas.llm.wake_up()
    assert hooks.status()["sleep_mode"] == "applied"
    assert state_digest(atlas.speculators) == before
    assert atlas.proposer.drafter_reads_policy() is True
    # the controller may have benched the drafter's arms for acceptance collapses on this
    # random tiny model in earlier tests of the module: not what is under test here
    atlas.controller.benched.clear()
    stats = atlas.generate(PROMPTS, max_tokens=16, seed=1).stats
    assert stats["drafts_neural"] + stats["drafts_neural-dist"] > 0


def test_sleep_mode_is_refused_on_a_cpu_with_the_reason(tiny_model_path):
    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    with pytest.raises(ValueError, match="vllm_enable_sleep_mode.*cannot sleep"):
        AtlasRolloutEngine(tiny_model_path, "atlas", AtlasConfig(dtype="float32"),
                           enable_sleep_mode=True)


def test_closing_one_engine_leaves_the_others_in_the_process_working(tiny_model_path):
    """vLLM's engine core tears down the process's parallel groups when it shuts down;
    they are shared by every in-process engine, so closing (or dropping) one engine broke
    the others ("pipeline model parallel group is not initialized" at their next step).
    The teardown now waits for the last engine; after it a new engine still builds."""
    import gc

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.backends.vllm import hooks
    from atlas_rl.compat.vllm_engines import live_engine_cores
    from vllm.distributed import parallel_state

    def build(speculation):
        return AtlasRolloutEngine(tiny_model_path, speculation, AtlasConfig(
            dtype="float32", cpu_kv_cache_gib=0.25, max_model_len=512))

    others = live_engine_cores()
    first, second = build("none"), build("atlas")
    assert live_engine_cores() == others + 2
    expected = second.generate(PROMPTS[:2], temperature=0.0, max_tokens=8).completion_ids
    first.close()
    del first
    gc.collect()
    assert hooks.status()["shared_parallel_state"] == "applied"
    assert parallel_state.model_parallel_is_initialized()
    assert second.generate(PROMPTS[:2], temperature=0.0, max_tokens=8).completion_ids == expected
    second.close()
    del second
    gc.collect()
    # the module's other engines (fixtures) may still live: the groups go with the last
    assert parallel_state.model_parallel_is_initialized() == (live_engine_cores() > 0)
    third = build("none")
    assert len(third.generate(PROMPTS[:1], temperature=0.0, max_tokens=4).completion_ids[0]) == 4
    third.close()

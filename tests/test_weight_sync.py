"""sync_weights is all or nothing, on the real model: bad weights are refused before they
reach vLLM, a load that fails midway is rolled back, and after each failure the engine
still serves the previous weights (greedy output of the last good sync, token for token).

The engine runs in float32 so that greedy output is a function of the weights alone."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.backends.vllm.weight_sync import WeightSyncError

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
TOKENS = 24


@pytest.fixture(scope="module")
def policy(real_model_path):
    """The real policy in transformers, perturbed so that its greedy output differs from
    the checkpoint's: a rollback to the checkpoint on disk instead of to the last synced
    weights would then be seen."""
    from conftest import perturbed_policy

    return perturbed_policy(real_model_path, seed=1)


@pytest.fixture(scope="module")
def synced(make_engine, real_model_path, policy):
    """An engine that has synced `policy` once, and its greedy output after that sync."""
    engine = make_engine(real_model_path, "atlas", dtype="float32")
    original = engine.generate(PROMPTS, temperature=0.0, max_tokens=TOKENS).completion_ids
    engine.sync_weights(policy)
    greedy = engine.generate(PROMPTS, temperature=0.0, max_tokens=TOKENS).completion_ids
    assert greedy != original, "the perturbed policy must change the greedy output"
    return engine, greedy


# --- the drafter after a sync (another RL stack lost all acceptance there: AL 2.71 -> 1.00)


def _neural_acceptance(engine, before) -> tuple[int, float]:
    """(drafts, accepted tokens per draft) of the neural drafter's arms since `before`."""
    from atlas_rl.metrics import ARMS

    now = engine.proposer.counters.since(before)
    arms = [ARMS.index("neural"), ARMS.index("neural-dist")]
    drafts = sum(now.arm_drafts[i] for i in arms)
    accepted = sum(now.arm_accepted_tokens[i] for i in arms)
    return drafts, accepted / max(drafts, 1)


def test_the_drafter_reads_the_policy_after_every_sync(make_engine, real_model_path):
    """A sync of the same weights leaves the drafter's acceptance as it was (within what
    the controller's arm choices move); a sync of new weights (embedding and tied head included)
    puts the new head rows under the drafter, never a stale or zeroed copy."""
    from conftest import perturbed_policy

    engine = make_engine(real_model_path, "atlas-static", dtype="float32",
                         speculate_always=True, explore=0.0)
    neural = engine.speculators["neural"]

    def run():
        before = engine.proposer.counters.copy()
        out = engine.generate(PROMPTS, temperature=0.0, max_tokens=48).completion_ids
        return out, _neural_acceptance(engine, before)

    first, (drafts, accepted) = run()
    assert drafts > 10 and accepted > 0.2, "the static drafter must draft and be accepted"
    checkpoint = perturbed_policy(real_model_path, scale=0.0)
    engine.sync_weights(checkpoint)
    old_embed = checkpoint.get_input_embeddings().weight.detach().clone()
    del checkpoint  # one policy in memory at a time
    assert engine.proposer.drafter_reads_policy() is True
    again, (drafts_again, accepted_again) = run()
    assert again == first
    # the controller's arm choices move with its calibration, so the drafts differ a
    # little; a stale or zeroed head would take the accepted tokens to ~0
    assert drafts_again > 10 and abs(accepted_again - accepted) < 0.1

    new = perturbed_policy(real_model_path, seed=3)
    with torch.no_grad():
        embed = new.get_input_embeddings().weight
        embed.add_(torch.randn(embed.shape, generator=torch.Generator().manual_seed(4))
                   * 0.1 * embed.std())
    engine.sync_weights(new)
    assert engine.proposer.drafter_reads_policy() is True
    ids, rows = neural.draft_head_rows()
    assert torch.equal(rows, embed.detach().index_select(0, ids).float()), \
        "the drafter drafts through the synced head rows"
    assert not torch.equal(rows, old_embed.index_select(0, ids).float())


def _greedy(engine):
    return engine.generate(PROMPTS, temperature=0.0, max_tokens=TOKENS).completion_ids


def _state(policy):
    """The policy's tensors by name, not copies (a test that changes one replaces it:
    a clone of the whole model per test was the module's peak memory)."""
    return dict(policy.state_dict())


def test_wrong_shape_is_refused_and_engine_keeps_serving(synced, policy):
    engine, greedy = synced
    state = _state(policy)
    name = "model.layers.7.mlp.up_proj.weight"
    state[name] = torch.randn(10, 576)
    with pytest.raises(WeightSyncError) as err:
        engine.sync_weights(state)
    assert name in str(err.value) and "(10, 576)" in str(err.value)
    assert "(1536, 576)" in str(err.value), "the message names the expected shape"
    assert _greedy(engine) == greedy


def test_unknown_name_is_refused_and_engine_keeps_serving(synced, policy):
    engine, greedy = synced
    state = _state(policy)
    state["model.layers.7.mlp.not_a_weight"] = torch.zeros(3)
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 576)
    with pytest.raises(WeightSyncError) as err:
        engine.sync_weights(state)
    msg = str(err.value)
    assert "'model.layers.7.mlp.not_a_weight': not a parameter" in msg
    assert "merge the adapter" in msg, "a PEFT name gets the PEFT hint"
    assert "2 of" in msg
    assert _greedy(engine) == greedy


def test_nonfinite_weights_are_refused_and_engine_keeps_serving(synced, policy):
    engine, greedy = synced
    state = _state(policy)
    name = "model.layers.3.self_attn.o_proj.weight"
    state[name] = state[name].clone()
    state[name][0, :5] = float("nan")
    state[name][1, 0] = float("inf")
    with pytest.raises(WeightSyncError) as err:
        engine.sync_weights(state)
    assert f"'{name}': 6 of {state[name].numel()} values are NaN or inf" in str(err.value)
    assert "allow_nonfinite_weights" in str(err.value)
    assert _greedy(engine) == greedy


def test_non_float_dtype_is_refused(synced, policy):
    engine, greedy = synced
    state = _state(policy)
    name = "model.norm.weight"
    state[name] = state[name].to(torch.int32)
    with pytest.raises(WeightSyncError, match="'model.norm.weight': dtype int32, expected a floating"):
        engine.sync_weights(state)
    assert _greedy(engine) == greedy


@pytest.mark.parametrize("failure", ["vllm-assert", "iterator-raises"])
def test_failure_during_load_rolls_back_to_previous_weights(synced, policy, failure):
    """Past the checks (so that the failure happens inside vLLM's layer-by-layer reload,
    after some layers were already replaced): the previous weights come back."""
    engine, greedy = synced
    sync = engine._weight_sync
    items = list(_state(policy).items())
    bad_at = len(items) // 2

    def weights():
        for i, (name, tensor) in enumerate(items):
            if i == bad_at:
                if failure == "vllm-assert":  # vLLM's own loader rejects the shape
                    yield name, torch.randn(10, *tensor.shape[1:])
                    continue
                raise RuntimeError("the trainer's gather failed midway")
            # different weights, so that a layer loaded before the failure would show
            yield name, tensor * 1.5 if tensor.dim() == 2 else tensor

    with pytest.raises((AssertionError, RuntimeError)):
        sync.load(weights())
    assert not sync.broken
    assert _greedy(engine) == greedy


def test_good_sync_after_failures_still_lands(synced, policy, real_model_path):
    """After refused and rolled-back syncs, the engine takes new weights as before:
    greedy output equals transformers' on the new weights."""
    engine, _ = synced
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "self_attn.v_proj" in name:
                p.mul_(1.3)
    engine.sync_weights(model)
    assert set(engine._weight_sync.last_timings) == {"check_seconds", "load_seconds"}
    for c in engine.generate(PROMPTS, temperature=0.0, max_tokens=TOKENS):
        out = model.generate(torch.tensor([c.prompt_ids]), max_new_tokens=TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=2)
        assert c.completion_ids == out[0, len(c.prompt_ids):].tolist()[:len(c.completion_ids)]


def test_a_peft_lora_model_syncs_merged_and_its_base_is_untouched(synced, real_model_path):
    """`sync_weights(peft_model)`: the engine serves base + scale x B A (greedy output equals
    transformers' on the merged model), no PEFT name reaches the checks, and the base
    weights stay bit-equal (no merge-then-unmerge rounding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from atlas_rl.backends.vllm.weight_sync import lora_only_peft_model, named_weights

    engine, _ = synced
    base = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero: give every adapter a real delta
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    assert lora_only_peft_model(model) and not lora_only_peft_model(base)
    names = [n for n, _ in named_weights(model)]
    assert names and not any("lora_" in n or "base_layer" in n or "base_model" in n
                             for n in names)
    engine.sync_weights(model)
    after = {n.replace(".base_layer.", ".").removeprefix("base_model.model."): p
             for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(after[n], p0) for n, p0 in before.items())
    merged = model.merge_and_unload().eval()  # the reference: the merged model itself
    for c in engine.generate(PROMPTS, temperature=0.0, max_tokens=TOKENS):
        out = merged.generate(torch.tensor([c.prompt_ids]), max_new_tokens=TOKENS,
                              do_sample=False, eos_token_id=None, pad_token_id=2)
        assert c.completion_ids == out[0, len(c.prompt_ids):].tolist()[:len(c.completion_ids)]

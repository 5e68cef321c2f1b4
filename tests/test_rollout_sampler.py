"""The static-cache sampler of the GPU distillation (`speculators.rollout_sampler`): the
logits it samples from are the policy's (a full transformers forward over the finished
sequences, step by step, left padding and grouped-query heads included), its draws follow
softmax(logits), and a policy it cannot run is named and falls back to `generate`."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from atlas_rl.speculators.rollout_sampler import (StaticCacheSampler, sample_rollouts,
                                                  unsupported_reason)


def _max_logit_error(model, prompts, steps, eos, pad, prefill_rows=2):
    sampler = StaticCacheSampler(model, prefill_rows=prefill_rows)
    comps, seen = sampler.sample(prompts, steps, eos, pad, torch.Generator().manual_seed(0),
                                 return_logits=True)
    worst = 0.0
    for i, (p, c) in enumerate(zip(prompts, comps)):
        assert c, "every prompt gets a completion"
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([p + c])).logits[0].float()
        for t in range(len(c)):
            worst = max(worst, float((ref[len(p) - 1 + t] - seen[t][i]).abs().max()))
    return comps, worst


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_static_cache_logits_are_the_policys(config_cls):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    # prompts of different lengths (left padding), three prefill slices of at most 2 rows
    comps, worst = _max_logit_error(model, [[3, 4, 5, 6], [7], [8, 9, 10, 11, 12, 13, 14],
                                            [20, 21]], steps=15, eos=96, pad=0)
    assert worst < 1e-4, worst
    assert all(len(c) <= 15 for c in comps)


def test_static_cache_logits_are_the_real_policys(real_model_path):
    model = AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()
    eos = int(model.config.eos_token_id)
    comps, worst = _max_logit_error(model, [[1, 504, 3458, 314, 253], [1, 20, 30],
                                            [1, 5, 6, 7, 8, 9, 10, 11, 12]],
                                    steps=10, eos=eos, pad=eos)
    assert worst < 1e-3, worst
    for c in comps:  # a completion ends at its first EOS, or at max_tokens
        assert eos not in c[:-1] and (c[-1] == eos or len(c) == 10)


def test_exponential_race_draws_follow_the_softmax():
    """Draws at one step of a one-token model follow softmax(logits): a chi-square test."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a peaked, non-uniform distribution
        p = model(input_ids=torch.tensor([[3, 4]])).logits[0, -1].float().softmax(-1)
    n = 20000
    comps = StaticCacheSampler(model).sample([[3, 4]] * n, 1, eos=7, pad=0,
                                             generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(torch.tensor([c[0] for c in comps]), minlength=8).double()
    expected = p.double() * n
    keep = expected > 5
    chi2 = float((((counts - expected) ** 2 / expected)[keep]).sum())
    assert chi2 < 24.3, (chi2, counts.tolist(), expected.tolist())  # df <= 7, p = 0.001
    assert float(p.max()) < 0.9 and int(keep.sum()) >= 3  # the test has teeth


def test_sample_rollouts_pairs_completions_with_their_prompts():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    out = sample_rollouts(model, prompts, completions=3, max_tokens=6, eos=49, pad=0,
                          batch_prompts=3, seed=5)
    assert [p for p, _ in out] == [p for p in prompts for _ in range(3)]
    again = sample_rollouts(model, prompts, completions=3, max_tokens=6, eos=49, pad=0,
                            batch_prompts=3, seed=5)
    assert again == out  # seeded
    assert len({tuple(c) for _, c in out}) > 1


def test_a_policy_outside_the_llama_family_is_named_and_refused():
    from transformers import GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                        vocab_size=50))
    reason = unsupported_reason(model)
    assert reason is not None and "gpt2" in reason
    with pytest.raises(ValueError, match="gpt2"):
        StaticCacheSampler(model)
    sliding = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=2)
    sliding.model_type = "mistral"
    sliding.sliding_window = 16
    model = AutoModelForCausalLM.from_config(sliding)
    assert "sliding" in (unsupported_reason(model) or "")


def test_distillation_falls_back_to_generate_for_other_policies(caplog):
    from transformers import GPT2Config

    from atlas_rl.speculators.eagle3_distill import Eagle3DistillConfig, generate

    class Tok:
        pad_token_id, eos_token_id = 0, 49

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                        vocab_size=50)).eval()
    cfg = Eagle3DistillConfig(model="", prompts=[], out="", completions=2, max_tokens=4,
                              generator="static-cache")
    with caplog.at_level(logging.WARNING):
        out = generate(model, Tok(), [[1, 2], [3]], cfg, lambda *a: None, seed=0)
    assert "static-cache sampler cannot run" in caplog.text and "gpt2" in caplog.text
    assert len(out) == 4 and all(1 <= len(c) <= 4 for _, c in out)

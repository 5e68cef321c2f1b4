"""`atlas-rl bench`'s drift figures (the policy's KL from the initial policy, the frozen
drafter's acceptance length per step) and the epochs workload (prompts come back)."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.bench import (
    BenchConfig,
    PolicyUpdater,
    _domain_pools,
    _step_prompts,
    drift_summary,
    format_drift,
)
from atlas_rl.metrics import (
    BENCH_DRIFT_METRICS,
    BENCH_DRIFT_STEP_KEYS,
    BENCH_DRIFT_SUMMARY_KEYS,
    POLICY_KL,
    STATIC_ACCEPTANCE_LENGTH,
)
from atlas_rl.rollout import Completion

# --- the policy's KL from the initial policy ----------------------------------------

def _group(prompt, completions):
    return [Completion(0, list(prompt), list(c), [0.0] * len(c), "length") for c in completions]


def test_policy_kl_is_zero_for_the_initial_policy_and_positive_after_an_update(tiny_model_path):
    policy = PolicyUpdater(tiny_model_path, lr=1e-3, seed=0)
    # completions of different lengths: the batched forward pads them
    group = _group([1, 5, 9, 11], [[20, 21, 22, 23, 24], [30, 31], [40, 41, 42], [50]])
    assert policy.policy_kl(group, 1.0) == 0.0  # no update yet: pi is pi_0
    assert policy.policy_kl(_group([1], [[]]), 1.0) is None  # no completion tokens
    policy.updates = 1  # as if updated, weights unchanged: the two forwards agree
    assert policy.policy_kl(group, 1.0) == pytest.approx(0.0, abs=1e-6)
    policy.updates = 0
    info = policy.step(group, [1.0, 0.0, 0.5, 0.0], temperature=1.0)
    assert info["updated"]
    kl = policy.policy_kl(group, 1.0)
    assert kl > 1e-6 and policy.param_delta_norm() > 0
    assert policy.policy_kl(group, 0.5) != pytest.approx(kl)  # at the sampling temperature


def test_lora_policy_drifts_through_its_adapter_only(tiny_model_path):
    """--policy-lora-rank: no copy of the initial weights is kept (the adapter switched
    off is pi_0), only the adapter trains, the base stays bit-equal, and the drift
    measures are those of the merged weights."""
    from atlas_rl.backends.vllm.weight_sync import named_weights

    policy = PolicyUpdater(tiny_model_path, lr=5e-2, seed=0, lora_rank=4)
    assert policy._initial == [] and policy.params and "LoRA adapter of rank 4" in policy.describe()
    assert all("lora_" in n for n, p in policy.model.named_parameters() if p.requires_grad)
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters()
            if "lora_" not in n}
    group = _group([1, 5, 9, 11], [[20, 21, 22, 23, 24], [30, 31], [40, 41, 42], [50]])
    assert policy.policy_kl(group, 1.0) == 0.0 and policy.param_delta_norm() == 0.0
    for _ in range(2):  # the first step moves B off zero, the second moves the weights
        assert policy.step(group, [1.0, 0.0, 0.5, 0.0], temperature=1.0)["updated"]
    assert policy.policy_kl(group, 1.0) > 1e-6
    assert all(torch.equal(p, base[n]) for n, p in policy.model.named_parameters()
               if "lora_" not in n)
    merged = dict(named_weights(policy.model))
    initial = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
               for n, p in base.items()}
    delta = torch.sqrt(sum(((merged[n] - initial[n]) ** 2).sum() for n in merged))
    assert float(delta) > 0 and policy.param_delta_norm() == pytest.approx(float(delta), rel=1e-4)
    with pytest.raises(ValueError, match="policy_lora_rank must be 0"):
        BenchConfig(policy_lora_rank=-1)


def test_kv_cache_is_sized_to_the_largest_batch(tiny_model_path):
    """`cpu_kv_cache_gib_for`: whole blocks per sequence, the largest batch, the margin,
    at the model's bytes per token (layers x KV heads x head size x 2 x dtype)."""
    from transformers import AutoConfig

    from atlas_rl.backends.vllm.engine import cpu_kv_cache_gib_for

    c = AutoConfig.from_pretrained(tiny_model_path)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_hidden_layers * heads * head * 4  # float32
    # 64 x 130 tokens: 2 blocks of 128 each; 4 x 300 tokens: 3 blocks each (smaller)
    gib = cpu_kv_cache_gib_for(tiny_model_path, "float32", [(64, 130), (4, 300)],
                               margin=1.0)
    assert gib == pytest.approx(max(per_token * 64 * 256 / (1 << 30), 1 / 16))
    big = cpu_kv_cache_gib_for(tiny_model_path, "float32", [(4096, 2048)], margin=1.0)
    assert big == pytest.approx(per_token * 4096 * 2048 / (1 << 30))
    half = cpu_kv_cache_gib_for(tiny_model_path, "bfloat16", [(4096, 2048)], margin=1.0)
    assert half == pytest.approx(big / 2)
    assert cpu_kv_cache_gib_for(tiny_model_path, "float32", [(1, 1)]) == 1 / 16  # the least
    # at least one sequence of max_model_len tokens, which vLLM needs to start
    assert cpu_kv_cache_gib_for(tiny_model_path, "float32", [(1, 1)], margin=1.0,
                                max_model_len=1 << 20) == pytest.approx(per_token * (1 << 20) / (1 << 30))


def test_drift_summary_and_table():
    rows = [{"step": s, "domain": "code", POLICY_KL: kl, "param_delta_norm": d,
             STATIC_ACCEPTANCE_LENGTH: al}
            for s, (kl, d, al) in enumerate([(0.0, 0.0, 1.60), (0.05, 1.0, 1.50),
                                             (0.20, 2.0, 1.20)])]
    assert set(rows[0]) == set(BENCH_DRIFT_STEP_KEYS)
    s = drift_summary(rows, final_kl=0.3, final_delta_norm=2.5)
    assert set(s) == set(BENCH_DRIFT_SUMMARY_KEYS)
    assert set(BENCH_DRIFT_STEP_KEYS[2:]) | set(s) <= set(BENCH_DRIFT_METRICS)  # all defined
    assert s["static_acceptance_drop"] == pytest.approx(0.25)
    assert s["policy_kl_last_step"] == 0.20 and s["policy_kl_final"] == 0.3
    table = format_drift({"drift": {"steps": rows, **s}})
    assert "| 3 | code | 0.2000 | 2.00 | 1.20 |" in table
    assert "1.60 (first step) -> 1.20 (last): 25% lost" in table
    # without atlas-static in the run: no acceptance figures, no drop
    none = drift_summary([{**r, STATIC_ACCEPTANCE_LENGTH: None} for r in rows], None, 0.0)
    assert none["static_acceptance_drop"] is None
    assert format_drift({"drift": {"steps": []}}) == ""


# --- the epochs workload -------------------------------------------------------------

def test_epochs_workload_revisits_the_same_prompts():
    cfg = BenchConfig(workload="epochs", steps=6, epoch_steps=2, prompts_per_step=4)
    assert cfg.drift_step is None and [cfg.epoch(s) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    (domain, pool), = _domain_pools(cfg)
    assert domain == "mixed" and len(pool) == 2 * (4 + 2)
    drawn = [_step_prompts(pool, cfg.prompt_slot(s), 4 + 2) for s in range(6)]
    key = [[repr(p.prompt) for p in d] for d in drawn]
    assert key[0] == key[2] == key[4] and key[1] == key[3] == key[5]  # each epoch the same
    assert not set(key[0]) & set(key[1])  # within an epoch, distinct prompts
    assert {p.domain for d in drawn for p in d} == {"code", "math"}
    # the other workloads never revisit a prompt within a domain
    plain = BenchConfig(workload="code", steps=4)
    assert [plain.prompt_slot(s) for s in range(4)] == [0, 1, 2, 3]
    assert plain.epoch(3) is None


def test_epochs_workload_over_a_prompt_file(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(f'{{"prompt": "def f{i}():\\n"}}\n'
                                              for i in range(40)))
    cfg = BenchConfig(workload="epochs", prompt_files=[str(tmp_path / "p.jsonl")], steps=3,
                      prompts_per_step=2)
    assert cfg.workload == "epochs"
    (domain, pool), = _domain_pools(cfg)
    assert domain == "p" and len(pool) == 2 * (2 + 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"workload": "epochs", "steps": 2, "epoch_steps": 2}, "steps > epoch_steps"),
    ({"workload": "epochs", "epoch_steps": 0}, "epoch_steps must be >= 1"),
    ({"workload": "epochs", "prompt_files": ["a", "b"]}, "give --prompts once"),
])
def test_epochs_config_errors_say_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_cli_selects_the_epochs_workload():
    from atlas_rl.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    args = sub.choices["bench"].parse_args(["--workload", "epochs", "--epoch-steps", "3"])
    cfg = BenchConfig.from_args(args)
    assert cfg.workload == "epochs" and cfg.epoch_steps == 3


def test_epochs_run_end_to_end(tiny_model_path, tmp_path):
    """A two-step epochs run through the CLI (the second step revisits the first's
    prompts): its records say the epoch, and the drift section is there."""
    import json
    import os
    import subprocess
    import sys

    from conftest import DIST_ENV

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="ERROR")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_rl.cli", "bench", "--model", tiny_model_path, "--quick",
         "--workload", "epochs", "--methods", "none", "--max-tokens", "8",
         "--large-batch-steps", "", "--out", str(out), "--no-progress"],
        check=False, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["config"]["workload"] == "epochs" and results["config"]["epoch_steps"] == 1
    steps = results["methods"]["none"]["steps"]
    assert [(s["epoch"], s["domain"]) for s in steps] == [(0, "mixed"), (1, "mixed")]
    assert results["drift"]["steps"][0]["policy_kl"] == 0.0
    assert results["drift"]["static_acceptance_drop"] is None  # no atlas-static in the run
    assert "epochs of 1 step (prompts come back)" in proc.stdout


def test_the_update_reward_has_no_empty_answer_and_an_optional_brevity_term():
    """Under large policy steps GRPO learns the easiest reward first: an empty code
    completion (the stub compiles) and brevity; neither may be the optimum."""
    from atlas_rl.rewards import rollout_reward, syntax_reward

    stub = 'def f(x):\n    """Doc."""\n'
    assert syntax_reward(stub, "", finished=True) == 0.0
    assert syntax_reward(stub, "  \n", finished=True) == 0.0
    assert syntax_reward(stub, "    return x\n", finished=True) == 1.0
    empty = rollout_reward("", None, 0, 128, True, stub)
    body = rollout_reward("    return x\n", None, 4, 128, True, stub)
    assert body > empty
    short = rollout_reward("Answer: 18", "18", 4, 128, True, length_weight=0.0)
    long = rollout_reward("9 * 2 = 18\nAnswer: 18", "18", 100, 128, True, length_weight=0.0)
    assert short == long == pytest.approx(1.0 + 0.2 + 0.1)
    assert BenchConfig().length_reward == 0.2


# --- the exactness check's memory at a large vocabulary ---------------------------------

def test_sampling_check_works_a_chunk_of_positions_at_a_time(tiny_model_path, monkeypatch):
    """`sampling_values` turns at most PIT_CHUNK_ROWS positions into float64 rows at once
    (not [positions, vocab], 0.8 GB at 128 x 262,144), and the values are those of the
    whole-completion computation: the same logprob errors, PIT values in the same rows."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from atlas_rl import exactness

    model = PolicyUpdater(tiny_model_path, lr=1e-3).model
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    comps = []
    for n in (40, 7):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        comps.append(Completion(0, [1, 5, 9], ids, [-1.0] * n, "length"))

    class LargestFloat64(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.dim() == 2:
                    LargestFloat64.rows = max(LargestFloat64.rows, t.shape[0])
            return out

    monkeypatch.setattr(exactness, "PIT_CHUNK_ROWS", 8)
    with LargestFloat64():
        u8, err8 = exactness.sampling_values(model, comps, 1.0, torch.Generator().manual_seed(1))
    assert LargestFloat64.rows == 8  # a chunk, never the 40 positions at once
    monkeypatch.setattr(exactness, "PIT_CHUNK_ROWS", 1000)
    u, err = exactness.sampling_values(model, comps, 1.0, torch.Generator().manual_seed(1))
    assert len(u8) == len(u) == 47 and torch.equal(err8, err)
    assert bool(((u8 >= 0) & (u8 <= 1)).all())
    # the PIT value of a row lies in [P(X < x), P(X <= x)] whatever the uniform draw
    logp = exactness.logits_to_logprobs(
        model(torch.tensor([[1, 5, 9] + comps[0].completion_ids])).logits[0, 2:-1].detach(), 1.0)
    p = logp.exp()
    idx = torch.tensor(comps[0].completion_ids)[:, None]
    below = (p.cumsum(-1).gather(1, idx) - p.gather(1, idx))[:, 0]
    assert bool((u8[:40] >= below - 1e-9).all() and (u8[:40] <= below + p.gather(1, idx)[:, 0] + 1e-9).all())

"""AtlasRolloutEngine(multiprocess=True) in a fresh process (vLLM freezes its environment
once an in-process engine ran, so a test session full of them cannot build one): prints
one JSON line of what it saw. Used by tests/test_vllm_plugin.py."""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           ("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\n"
            "Answer: Let's think step by step.")]


GREEDY = ["The capital of France is", "def fibonacci(n):"]
TOKENS = 24


def weight_syncs(engine, model: str) -> dict:
    """sync_weights through the worker: new weights land (greedy = transformers' greedy on
    them), the drafter re-reads the policy, bad syncs are refused with the in-process
    engine's messages and a failing iterator loads nothing; the engine keeps serving."""
    import torch

    from atlas_rl.backends.vllm.weight_sync import WeightSyncError
    from conftest import perturbed_policy

    def greedy():
        return engine.generate(GREEDY, temperature=0.0, max_tokens=TOKENS).completion_ids

    seen = {}
    before = greedy()
    policy = perturbed_policy(model, seed=1)
    engine.sync_weights(policy)
    after = greedy()
    seen["sync_changed_greedy"] = after != before
    expected = []
    for prompt_ids in (engine.tokenizer.encode(p) for p in GREEDY):
        out = policy.generate(torch.tensor([prompt_ids]), max_new_tokens=TOKENS, do_sample=False,
                              eos_token_id=None, pad_token_id=2)
        expected.append(out[0, len(prompt_ids):].tolist())
    seen["sync_matches_transformers"] = all(
        got == want[:len(got)] for got, want in zip(after, expected))
    stats = engine.proposer.stats()
    seen["weight_syncs"] = stats["weight_syncs"]
    seen["drafter_reads_policy"] = stats["drafter_reads_policy"]

    state = {k: v.clone() for k, v in policy.state_dict().items()}
    bad_shape = dict(state, **{"model.layers.7.mlp.up_proj.weight": torch.randn(10, 576)})
    nonfinite = {k: v.clone() for k, v in state.items()}
    nonfinite["model.layers.3.self_attn.o_proj.weight"][0, :5] = float("nan")

    def failing():
        for i, item in enumerate(state.items()):
            if i == len(state) // 2:
                raise RuntimeError("the trainer's gather failed midway")
            yield item[0], item[1] * 1.5

    for name, weights in (("shape", bad_shape), ("nonfinite", nonfinite),
                          ("iterator", failing())):
        try:
            engine.sync_weights(weights)
            seen[f"{name}_error"] = None
        except (WeightSyncError, RuntimeError) as e:
            seen[f"{name}_error"] = f"{type(e).__name__}: {e}"
        seen[f"{name}_kept_weights"] = greedy() == after
    engine.sync_weights(perturbed_policy(model, seed=1, scale=0.0))  # the checkpoint again
    seen["sync_after_refusals_lands"] = greedy() == before
    seen["weight_syncs_at_end"] = engine.proposer.stats()["weight_syncs"]
    return seen


def main(model: str) -> None:
    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    engine = AtlasRolloutEngine(model, "atlas", AtlasConfig(
        dtype="float32", cpu_kv_cache_gib=1, max_model_len=1024), multiprocess=True)
    seen = {}
    try:
        seen["speculation"] = engine.proposer.stats()["speculation"]
        batch = engine.generate(PROMPTS, n=4, temperature=1.0, max_tokens=32, seed=1)
        seen["completions"] = len(batch)
        seen["num_draft_tokens"] = batch.stats["num_draft_tokens"]
        seen["proposer_num_draft_tokens"] = batch.stats["proposer_num_draft_tokens"]
        update = engine.update(batch)
        seen["update_seconds"] = update.get("update_seconds", 0.0)
        seen["learns"] = engine.proposer.stats()["learns"]
        with tempfile.TemporaryDirectory() as tmp:
            engine.save(tmp)
            saved = engine.proposer.digest()
            engine.update(engine.generate(PROMPTS, n=4, temperature=1.0, max_tokens=32, seed=2))
            seen["digest_changed_after_learning"] = engine.proposer.digest() != saved
            engine.load(tmp)
            seen["digest_restored"] = engine.proposer.digest() == saved
        seen.update(weight_syncs(engine, model))
    finally:
        engine.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])

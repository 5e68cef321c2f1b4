"""AtlasRolloutEngine(multiprocess=True) in a fresh process (vLLM freezes its environment
once an in-process engine ran, so a test session full of them cannot build one): prints
one JSON line of what it saw. Used by tests/test_vllm_plugin.py."""

import json
import sys
import tempfile

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           ("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\n"
            "Answer: Let's think step by step.")]


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
        try:
            engine.sync_weights({})
        except NotImplementedError as e:
            seen["sync_weights_error"] = str(e)
    finally:
        engine.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])

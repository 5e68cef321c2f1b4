"""The rollout loop of an RL step with atlas-rl, in one file.

    python examples/quickstart.py            # SmolLM2-135M-Instruct on the CPU

generate -> (rewards, policy update: yours) -> engine.update -> engine.sync_weights
"""

import torch
from transformers import AutoModelForCausalLM

from atlas_rl import AtlasConfig, AtlasRolloutEngine
from atlas_rl.workloads import extract_answer, math_prompts


def main():
    # The sampler computes in the trainer's dtype, so that batch.logprobs are the ones the
    # policy computes (importance ratios, KL); the engine's own default follows speed.
    engine = AtlasRolloutEngine("smollm2-135m-instruct", speculation="atlas",
                                config=AtlasConfig(dtype="float32"))
    policy = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)
    problems = math_prompts(4, seed=0)

    for step in range(2):
        batch = engine.generate([p.prompt for p in problems], n=4, temperature=1.0,
                                max_tokens=96, seed=step)
        rewards = [float(extract_answer(c.text) == problems[c.prompt_index].answer) for c in batch]
        # ... your trainer turns rewards and batch.logprobs into a policy update here ...
        engine.update(batch)          # the adaptive speculator learns these rollouts
        engine.sync_weights(policy)   # the new policy weights go into vLLM
        s = batch.stats
        print(f"step {step}: {len(batch)} completions, reward {sum(rewards) / len(rewards):.2f}, "
              f"{s['tokens_per_s']:.1f} tok/s, acceptance length {s['acceptance_length']:.2f}, "
              f"acceptance rate {s['acceptance_rate']:.2f}")

    print("engine totals:", {k: v for k, v in engine.stats().items()
                             if k in ("acceptance_length", "tokens_per_s", "num_tokens")})


if __name__ == "__main__":
    main()

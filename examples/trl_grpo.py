"""A stock TRL GRPO script with atlas-rl: the two lines marked `atlas-rl` are all it adds.

GRPO with LoRA on arithmetic word problems with checkable answers, colocated vLLM on the
CPU (on a GPU drop ``use_cpu=True`` and set ``bf16=True``):

    python examples/trl_grpo.py                                # SmolLM2-135M-Instruct, ~3-5 min on 2 cores
    python examples/trl_grpo.py --model DIR --max-steps 4      # your own model (a transformers folder)

Every logged step carries ``atlas/*`` metrics (acceptance length, lookahead, tokens/s, the
speculator's update time) beside TRL's own; ``sampling/sampling_logp_difference/max`` is
TRL's check that vLLM's logprobs are the policy's.
"""

from __future__ import annotations

import argparse

from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer

from atlas_rl import workloads
from atlas_rl.integrations.trl import enable_atlas  # atlas-rl
from atlas_rl.models import resolve_model
from atlas_rl.rewards import answer_format, correctness


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="a known short name (`atlas-rl models list`) or a transformers folder")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--output-dir", default="outputs/trl-grpo-example")
    args = parser.parse_args(argv)

    enable_atlas()  # atlas-rl: TRL's colocated vLLM engine now speculates with atlas

    prompts = workloads.math_prompts(64, seed=0)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in prompts],
                                 "answer": [p.answer for p in prompts]})
    trainer = GRPOTrainer(
        model=resolve_model(args.model),
        reward_funcs=[correctness, answer_format],
        args=GRPOConfig(output_dir=args.output_dir, use_vllm=True, vllm_mode="colocate",
                        use_cpu=True, bf16=False, per_device_train_batch_size=8,
                        num_generations=4, max_completion_length=args.max_completion_length,
                        learning_rate=1e-4, max_steps=args.max_steps, logging_steps=1,
                        save_strategy="no", report_to="none", seed=0),
        train_dataset=dataset,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    trainer.train()
    last = [row for row in trainer.state.log_history if "atlas/acceptance_length" in row][-1]
    print(f"last step: reward {last.get('reward', float('nan')):.3f}, acceptance length "
          f"{last['atlas/acceptance_length']:.2f}, rollout tokens/s {last['atlas/tokens_per_s']:.1f}")


if __name__ == "__main__":
    main()

"""Run under `torchrun --nproc_per_node 2`: GRPO through the atlas-rl drop-in on the CPU
(gloo), then each rank writes what its speculator learned and saves its state."""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import atlas_rl.integrations.trl as atlas_trl  # noqa: E402
from atlas_rl import AtlasConfig, AtlasRolloutEngine  # noqa: E402

model, out = sys.argv[1], sys.argv[2]
local_tokens = []
learn = AtlasRolloutEngine.learn


def counting_learn(self, sequences, *args, **kwargs):  # what this rank generated
    local_tokens.append(sum(len(s) for s in sequences))
    return learn(self, sequences, *args, **kwargs)


AtlasRolloutEngine.learn = counting_learn
atlas_trl.enable_atlas(AtlasConfig(max_model_len=512, speculate_always=True, cpu_kv_cache_gib=1))
prompts = ["one two three four one two three", "def add(a, b):\n    return",
           "The quick brown fox", "import os\nimport sys\nimport"]
args = GRPOConfig(output_dir=out, use_vllm=True, vllm_mode="colocate", use_cpu=True,
                  per_device_train_batch_size=4, num_generations=4, max_completion_length=16,
                  max_steps=2, logging_steps=1, report_to="none", learning_rate=1e-3,
                  bf16=False, save_strategy="no", seed=0)
trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [len(c) / 100.0 for c in completions],
                      args=args, train_dataset=Dataset.from_dict({"prompt": prompts * 4}))
trainer.train()
engine = trainer.vllm_generation.atlas_engine
rank = trainer.accelerator.process_index
engine.save(os.path.join(out, f"state{rank}"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world": trainer.accelerator.num_processes,
               "local_tokens": local_tokens,
               "corpus_tokens": engine.speculator._past.num_tokens}, f)

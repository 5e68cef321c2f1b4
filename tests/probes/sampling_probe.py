"""Run in a fresh process (the compat fixes are process-global): sample at temperature 1
with speculation and print the exactness check as JSON on the last line.

    ATLAS_RL_COMPAT=off python tests/probes/sampling_probe.py vllm-ngram
"""

import json
import sys

from atlas_rl import AtlasConfig, AtlasRolloutEngine
from atlas_rl.compat import vllm_cpu_status
from atlas_rl.engine import NonFiniteLogitsError
from atlas_rl.exactness import check_sampling, load_reference_model
from atlas_rl.workloads import code_prompts

method = sys.argv[1] if len(sys.argv) > 1 else "vllm-ngram"
engine = AtlasRolloutEngine("smollm2-135m-instruct", speculation=method, config=AtlasConfig(
    dtype="float32", max_model_len=1024, cpu_kv_cache_gib=1, max_speculation_batch_size=64))
prompts = [p.prompt for p in code_prompts(8, seed=11)]
try:
    batch = engine.generate(prompts, n=2, temperature=1.0, max_tokens=48, seed=5)
except NonFiniteLogitsError as e:  # NaN logprobs: the engine refuses the rollout itself
    print(json.dumps({"passed": False, "nonfinite": str(e),
                      "num_draft_tokens": engine.stats()["num_draft_tokens"],
                      "compat": vllm_cpu_status()}))
    sys.exit(0)
check = check_sampling(load_reference_model(engine.model_path), batch)
print(json.dumps({**check.as_dict(), "passed": check.passed(),
                  "num_draft_tokens": batch.stats["num_draft_tokens"],
                  "compat": vllm_cpu_status()}))

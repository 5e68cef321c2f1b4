"""What a checked, all-or-nothing `sync_weights` costs against vLLM's bare reload.

    python scripts/time_sync.py --dtype float32      # SmolLM2-135M on this machine

Per round, interleaved: the bare reload (vLLM's ``reload_weights`` + the tied-head fix +
prefix-cache reset: what a sync was before the checks), `sync_weights(model)` (checks,
load, rollback copy), and `sync_weights(named_parameters(), copy=True)` (TRL's path).
Prints the medians over the rounds after the first (warm-up) as one JSON line."""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.backends.vllm.engine import model_runner
    from atlas_rl.compat import vllm_cpu
    from atlas_rl.machine import machine_info

    engine = AtlasRolloutEngine(args.model, "none", AtlasConfig(
        dtype=args.dtype, cpu_kv_cache_gib=1, max_model_len=1024))
    policy = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch.float32)

    def bare():
        runner = model_runner(engine.llm)
        runner.reload_weights(weights_iterator=iter(
            (k, v.detach()) for k, v in policy.state_dict().items()))
        vllm_cpu.refresh_tied_lm_head(runner.get_model())
        engine.llm.reset_prefix_cache()

    runs = {"bare_reload": bare,
            "sync_weights": lambda: engine.sync_weights(policy),
            "sync_weights_copy": lambda: engine.sync_weights(policy.named_parameters(), copy=True)}
    seconds = {name: [] for name in runs}
    checks = []
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            if name == "sync_weights":
                checks.append(engine._weight_sync.last_timings["check_seconds"])
    seconds["checks_alone"] = checks
    print(json.dumps({"machine": machine_info(args.dtype), "model": args.model,
                      "median_seconds": {k: round(statistics.median(v[1:]), 3)
                                         for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()

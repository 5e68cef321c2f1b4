"""What one draft position of the EAGLE-3 drafter costs against a policy forward, at batch
1-8 on this machine (issue 17: "a small, measured fraction of a policy forward").

    python scripts/time_drafter.py [--drafter DIR] [--batches 1 2 4 8] [--dtype float32]

Drafter: `Eagle3Speculator.propose` at lookahead 1 and 4 (median wall time of 30 calls,
after a warm-up), each request with a 32-position history of keys/values. Policy: vLLM
without speculation decoding B sequences (forward seconds per engine step, engine stats).
Run it alone: two processes on 2 cores distort each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    from safetensors.torch import load_file

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.machine import machine_info
    from atlas_rl.models import resolve_model
    from atlas_rl.speculators.eagle3 import Eagle3Speculator
    from atlas_rl.speculators.neural import BUNDLED_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--drafter", default=None, help="EAGLE-3 drafter dir (default: bundled)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    path = resolve_model(args.model)
    drafter = args.drafter or str(BUNDLED_DIR / "smollm2-135m-instruct")
    weights = load_file(f"{path}/model.safetensors")
    embed = weights["model.embed_tokens.weight"].float()
    spec = Eagle3Speculator.from_dir(drafter, frozen=True)
    spec.attach_target(embed, embed)
    d = embed.shape[1]
    g = torch.Generator().manual_seed(0)
    rows = {}
    for B in args.batches:
        keys = [f"r{i}" for i in range(B)]
        for k in keys:
            aux = torch.randn(32, 3 * d, generator=g)
            spec.capture(k, torch.randn(32, d, generator=g), list(range(100, 132)), 10, aux=aux)
        out = {}
        for k in (1, 4):
            for _ in range(3):
                spec.propose(keys, [[0]] * B, [k] * B)
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                spec.propose(keys, [[0]] * B, [k] * B)
                times.append(time.perf_counter() - t0)
            out[f"propose_k{k}_ms"] = 1e3 * statistics.median(times)
        rows[B] = out
    engine = AtlasRolloutEngine(path, "none", AtlasConfig(dtype=args.dtype))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8 + i] for i in range(max(args.batches))]
    for B in args.batches:
        engine.generate(prompts[:B], max_tokens=8, temperature=1.0, seed=0)  # warm-up
        batch = engine.generate(prompts[:B], max_tokens=64, temperature=1.0, seed=1,)
        s = batch.stats
        step_ms = 1e3 * s["forward_seconds"] / max(1, s["engine_steps"])
        rows[B]["policy_forward_ms"] = step_ms
        rows[B]["one_position_share"] = rows[B]["propose_k1_ms"] / step_ms
        rows[B]["per_extra_position_share"] = (rows[B]["propose_k4_ms"] - rows[B]["propose_k1_ms"]) / 3 / step_ms
    print(json.dumps({"machine": machine_info(args.dtype), "dtype": args.dtype, "drafter": drafter,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""`atlas-rl demo` / `make demo`: GRPO-style rollouts on the real model at temperature 1,
with and without speculation, interleaved, exactness checked, and a results table.

Two regimes per round, both with groups of completions per prompt:
- group: all prompts' groups at once (the start of an RL step: a large batch),
- tail: one group (the end of an RL step, when a few sequences are still running).
Methods alternate order every round (A B, B A, ...) on the same prompts and seeds; the
adaptive speculator learns each round's rollouts (`engine.update`) before the next.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

METHODS = ("none", "atlas")


def machine_info(dtype: str) -> dict:
    import torch
    import vllm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__, "dtype": dtype}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def run_demo(model: str = "smollm2-135m-instruct", num_prompts: int = 8, completions: int = 4,
             max_tokens: int = 128, rounds: int = 3, dtype: str | None = None,
             compile: bool = False, json_out: str | None = None) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.exactness import check_sampling, greedy_mismatches, load_reference_model
    from atlas_rl.models import resolve_model
    from atlas_rl.workloads import mixed_prompts

    def say(msg):
        print(f"[atlas-rl demo] {msg}", flush=True)

    t0 = time.perf_counter()
    say(f"model {model}: resolving (first run downloads and converts it) ...")
    path = resolve_model(model)
    config = AtlasConfig(dtype=dtype, enforce_eager=False if compile else None)
    engines = {}
    for method in METHODS:
        say(f"building the vLLM engine, speculation={method!r} ...")
        engines[method] = AtlasRolloutEngine(path, speculation=method, config=config)
        # One short call first, so that no method pays first-call costs in the timings.
        engines[method].generate(["Warm-up."], n=2, max_tokens=8, seed=0)
    dtype = str(engines["none"].llm.llm_engine.model_config.dtype).replace("torch.", "")

    results = {m: {"group": [], "tail": []} for m in METHODS}
    sampled = []  # atlas batches, for the exactness check
    for r in range(rounds):
        prompts = [p.prompt for p in mixed_prompts(num_prompts, seed=100 + r)]
        regimes = {"group": prompts, "tail": prompts[:1]}
        order = METHODS if r % 2 == 0 else METHODS[::-1]
        for regime, regime_prompts in regimes.items():
            for method in order:
                engine = engines[method]
                batch = engine.generate(regime_prompts, n=completions, temperature=1.0,
                                        max_tokens=max_tokens, seed=1000 * r + 7)
                if method == "atlas":
                    engine.update(batch)
                    sampled.append(batch)
                results[method][regime].append(batch.stats)
                s = batch.stats
                say(f"round {r + 1}/{rounds} {regime:<5} {method:<5} "
                    f"{len(batch):>3} seqs {s['num_tokens']:>5} tokens "
                    f"{s['tokens_per_s']:7.1f} tok/s  acceptance length {s['acceptance_length']:.2f}")

    say("exactness: greedy identity and the sampled tokens' distribution ...")
    probe = [p.prompt for p in mixed_prompts(2, seed=999)]
    greedy = {m: engines[m].generate(probe, temperature=0.0, max_tokens=64) for m in METHODS}
    mismatches = greedy_mismatches(greedy["none"].completion_ids, greedy["atlas"].completion_ids)
    reference = load_reference_model(path)
    from atlas_rl.rollout import RolloutBatch

    pooled = RolloutBatch([c for b in sampled for c in b.completions])
    check = check_sampling(reference, pooled)
    # float32 engines match the float32 reference to ~1e-4; emulated bf16 rounds more.
    tol = 1e-3 if dtype == "float32" else 0.5
    exact = check.ks_pvalue > 1e-3 and check.logprob_max_abs_err < tol and not mismatches

    rows = []
    for regime in ("group", "tail"):
        base = results["none"][regime]
        for method in METHODS:
            runs = results[method][regime]
            speedups = [s["tokens_per_s"] / b["tokens_per_s"] for s, b in zip(runs, base)]
            rows.append({
                "regime": regime, "method": method,
                "sequences": runs[0]["num_completions"],
                "tokens_per_s": _median([s["tokens_per_s"] for s in runs]),
                "acceptance_length": _median([s["acceptance_length"] for s in runs]),
                "acceptance_rate": _median([s["acceptance_rate"] for s in runs]) if method != "none" else None,
                "oracle_acceptance_length": _median([s.get("oracle_acceptance_length") for s in runs]),
                "speedup": _median(speedups) if (exact or method == "none") else None,
            })

    info = machine_info(dtype)
    print()
    print(f"atlas-rl demo: {model}, temperature 1.0, {num_prompts} prompts x {completions} "
          f"completions, {max_tokens} tokens max, {rounds} interleaved rounds (medians)")
    print(f"machine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}; "
          f"torch {info['torch']}, vLLM {info['vllm']}, dtype {dtype}")
    print()
    print("| regime | method | seqs | tokens/s | acceptance length | acceptance rate | oracle (k=8) | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['regime']} | {row['method']} | {row['sequences']} | {_fmt(row['tokens_per_s'], '.1f')} | "
              f"{_fmt(row['acceptance_length'])} | {_fmt(row['acceptance_rate'])} | "
              f"{_fmt(row['oracle_acceptance_length'])} | {_fmt(row['speedup'])}x |")
    print()
    print(f"exactness: greedy identical on {len(probe) - len(mismatches)}/{len(probe)} probe prompts; "
          f"sampled tokens vs transformers: KS p={check.ks_pvalue:.3f} over {check.num_tokens} "
          f"tokens, logprob max |err| {check.logprob_max_abs_err:.2e} (tolerance {tol:g}) -> "
          f"{'EXACT' if exact else 'NOT EXACT: no speedup reported'}")
    print(f"(group: the whole batch; atlas speculates only while <= "
          f"{config.max_speculation_batch_size} sequences run. tail: one group. "
          f"oracle: ceiling of one-hot drafting.)  total {time.perf_counter() - t0:.0f} s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": info, "rows": rows, "exactness": {
                **check.as_dict(), "greedy_mismatches": mismatches, "exact": exact},
                "raw": results}, f, indent=2)
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(run_demo())

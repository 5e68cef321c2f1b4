"""`atlas-rl demo` / `make demo`: real GRPO (TRL's trainer, LoRA) on the real model on the
CPU, the prompt domain switching halfway, rollouts through atlas-rl; then the same run
without speculation; a table per step, the end-to-end step-time speedup and a PNG of
reward curves and acceptance length.

Each run has a process of its own (`in_fresh_process`), as a user's training run does. Run
one after the other in one process, the runs were not alike: on an Intel Xeon with AMX
(2026-12-05) TRL's training steps, generation aside, took 45.9 s over 6 steps in the run
that came first (atlas) against 34.7 s in the second (`none`); in the other order, 27.8 s
and 27.9 s over 5 steps.
"""

from __future__ import annotations

import json
import os
import sys
import time

from atlas_rl.metrics import TRL_LOGP_GAP, TRL_REWARD, TRL_STEP_TIME, atlas_name, fmt, median

ROLLOUT_SECONDS = atlas_name("rollout_seconds")
ACCEPTANCE_LENGTH = atlas_name("acceptance_length")

# The largest gap between the sampler's logprobs and the trainer's (TRL's
# sampling/sampling_logp_difference/max) that the demo accepts, by the sampler's dtype; the
# trainer computes in float32 (TRL's default). float32 against float32: the two differ only
# by the order of float32 operations (measured ~6e-5 on SmolLM2-135M; the bound is the
# exactness tests' tolerance). A bfloat16 sampler against a float32 trainer: bf16 keeps 8
# mantissa bits, so logits of magnitude ~20-30 move by ~0.1 each and a token's logprob by
# up to ~0.5 (measured 0.30-0.54, with and without speculation); speculation must not
# widen that, and the no-speculation run's gap is printed beside it.
LOGP_GAP_BOUND = {"float32": 1e-3, "bfloat16": 1.0}


def _grpo_run(method: str, model_path: str, steps: int, max_tokens: int, out_dir: str,
              dtype: str | None, seed: int, say) -> tuple[list[dict], str]:
    """One GRPO run (LoRA, builtin drift prompts, fixed order); its per-step logs and the
    dtype its sampler computed in."""
    import gc

    from peft import LoraConfig
    from trl import GRPOConfig

    from atlas_rl import AtlasConfig
    from atlas_rl.integrations.trl import AtlasGRPOTrainer
    from atlas_rl.integrations.trl.grpo import GRPOScriptArguments, build_dataset
    from atlas_rl.rewards import get_reward_funcs

    prompts_per_step, group = 2, 4
    dataset = build_dataset(GRPOScriptArguments(dataset="builtin:drift",
                                                num_prompts=steps * prompts_per_step))
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, method), use_cpu=True, bf16=False, use_vllm=True,
        vllm_mode="colocate", vllm_max_model_length=1024, shuffle_dataset=False,
        per_device_train_batch_size=prompts_per_step * group, num_generations=group,
        max_completion_length=max_tokens, temperature=1.0, learning_rate=1e-4,
        lr_scheduler_type="constant", max_steps=steps, logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"])
    say(f"GRPO with speculation={method!r}: {steps} steps of {prompts_per_step} prompts x "
        f"{group} completions, {max_tokens} tokens max, LoRA r=16 ...")
    trainer = AtlasGRPOTrainer(
        model=model_path, reward_funcs=get_reward_funcs(["correctness", "answer_format", "brevity"]),
        args=args, train_dataset=dataset, peft_config=lora, speculation=method,
        atlas_config=AtlasConfig(dtype=dtype, cpu_kv_cache_gib=1, max_model_len=1024))
    trainer.train()
    logs = [row for row in trainer.state.log_history if ROLLOUT_SECONDS in row]
    engine = trainer.vllm_generation.atlas_engine
    sampler_dtype = str(engine.llm.llm_engine.model_config.dtype).removeprefix("torch.")
    del trainer, engine
    gc.collect()
    return logs, sampler_dtype


def _say(msg: str) -> None:
    print(f"[atlas-rl demo] {msg}", flush=True)


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (spawned: nothing of this one's state, its
    allocator's heap, threads or vLLM's process-wide settings, carries over); its result
    returned, its exception raised here. ``fn`` and ``args`` must pickle (module-level)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_demo(model: str = "smollm2-135m-instruct", steps: int = 10, max_tokens: int = 64,
             dtype: str | None = None, out_dir: str = "demo-results", seed: int = 0,
             json_out: str | None = None) -> int:
    """GRPO on the real model with LoRA, the prompt domain switching halfway (code, then
    math), rollouts through atlas-rl; then the same run without speculation (same seed);
    a table per step, the step-time speedup, and a PNG."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from atlas_rl.models import resolve_model

    say = _say
    t0 = time.perf_counter()
    say(f"model {model}: resolving (first run downloads and converts it) ...")
    path = resolve_model(model)
    logs, dtypes = {}, {}
    for method in ("atlas", "none"):
        logs[method], dtypes[method] = in_fresh_process(
            _grpo_run, method, path, steps, max_tokens, out_dir, dtype, seed, _say)
    switch = steps // 2
    rows = _rows(logs, steps, switch)
    report = _compare(rows, sampler_dtype=dtypes["atlas"])

    from atlas_rl.plots import plot_demo

    png = plot_demo(rows, switch, os.path.join(out_dir, "demo.png"))
    from atlas_rl.machine import machine_info

    info = machine_info(report["sampler_dtype"])
    _print_report(model, steps, max_tokens, switch, rows, report, info)
    print(f"(runs are sequential, each in a process of its own, not interleaved: single-step "
          f"times swing on this machine; "
          f"`make bench` is the measurement of record.)  plot: {png}  total "
          f"{time.perf_counter() - t0:.0f} s")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"machine": info, "rows": rows, "step_speedup": report["step_speedup"],
                       "rollout_speedup": report["rollout_speedup"],
                       "max_logp_gap": report["gaps"], "logp_gap_bound": report["bound"],
                       "lossless": report["lossless"]}, f, indent=2)
    return 0 if report["lossless"] else 1


def _rows(logs: dict[str, list[dict]], steps: int, switch: int) -> list[dict]:
    """A row per step: both runs' figures side by side."""
    rows = []
    for i in range(steps):
        a, b = logs["atlas"][i], logs["none"][i]
        rows.append({
            "step": i + 1, "domain": "code" if i < switch else "math",
            "rollout_seconds": {"none": b[ROLLOUT_SECONDS], "atlas": a[ROLLOUT_SECONDS]},
            "step_seconds": {"none": b.get(TRL_STEP_TIME), "atlas": a.get(TRL_STEP_TIME)},
            "acceptance_length": a[ACCEPTANCE_LENGTH],
            "reward": {"none": b[TRL_REWARD], "atlas": a[TRL_REWARD]},
            "logp_gap": {"none": b.get(TRL_LOGP_GAP), "atlas": a.get(TRL_LOGP_GAP)},
        })
    return rows


def _compare(rows: list[dict], sampler_dtype: str) -> dict:
    """Median step and rollout times of both runs, their ratios, and the lossless check:
    the largest logprob gap of each run against the bound for the sampler's dtype."""
    med = {key: {m: median([r[key][m] for r in rows]) for m in ("none", "atlas")}
           for key in ("step_seconds", "rollout_seconds")}
    gaps = {m: max((r["logp_gap"][m] for r in rows if r["logp_gap"][m] is not None),
                   default=None) for m in ("atlas", "none")}
    bound = LOGP_GAP_BOUND.get(sampler_dtype, 1.0)
    return {"step_median": med["step_seconds"],
            "step_speedup": med["step_seconds"]["none"] / med["step_seconds"]["atlas"],
            "rollout_speedup": med["rollout_seconds"]["none"] / med["rollout_seconds"]["atlas"],
            "gaps": gaps, "bound": bound, "sampler_dtype": sampler_dtype,
            "lossless": gaps["atlas"] is not None and gaps["atlas"] <= bound}


def _print_report(model: str, steps: int, max_tokens: int, switch: int, rows: list[dict],
                  report: dict, info: dict) -> None:
    sampler_dtype, gaps = report["sampler_dtype"], report["gaps"]
    print()
    print(f"atlas-rl demo: GRPO on {model} with LoRA, {steps} steps of 2 prompts x 4 "
          f"completions at temperature 1, {max_tokens} tokens max; code prompts, then math "
          f"from step {switch + 1}; the same run with and without speculation (same seed)")
    print(f"machine: {info['cpu']} ({'with' if info['cpu_bf16_units'] else 'without'} bf16 "
          f"units), {info['cores']} cores, GPU: {info['gpu'] or 'none'}; torch {info['torch']}, "
          f"vLLM {info['vllm']}; sampler dtype {sampler_dtype}, trainer float32")
    print()
    print("| step | domain | rollout s (none) | rollout s (atlas) | acceptance length (atlas) "
          "| reward (none) | reward (atlas) | step s (none) | step s (atlas) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['domain']} | {r['rollout_seconds']['none']:.1f} | "
              f"{r['rollout_seconds']['atlas']:.1f} | {r['acceptance_length']:.2f} | "
              f"{r['reward']['none']:.3f} | {r['reward']['atlas']:.3f} | "
              f"{fmt(r['step_seconds']['none'], '.1f')} | {fmt(r['step_seconds']['atlas'], '.1f')} |")
    print()
    print(f"end-to-end step time: median {report['step_median']['none']:.1f} s "
          f"without speculation, {report['step_median']['atlas']:.1f} s with "
          f"atlas -> speedup {report['step_speedup']:.2f}x (rollouts alone: "
          f"{report['rollout_speedup']:.2f}x)")
    print(f"lossless check (TRL's {TRL_LOGP_GAP}, largest over the "
          f"steps): atlas {fmt(gaps['atlas'], '.1e')}, no speculation {fmt(gaps['none'], '.1e')}; "
          f"bound for a {sampler_dtype} sampler against a float32 trainer {report['bound']:.0e}: "
          f"{'PASS' if report['lossless'] else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(run_demo())

"""Where a tail step's time goes: one method's engine steps, phase by phase.

    python scripts/profile_step.py [--method atlas-static] [--sequences 4] [--tokens 128]
                                   [--rounds 3] [--cprofile FILE]

Builds ``none`` and the method's engine on the real model (in-process), generates the tail
regime (one prompt, ``--sequences`` completions at temperature 1, fixed length: EOS
ignored, so both methods do the same work) interleaved for ``--rounds`` rounds, and prints
per engine step: the forward, plain sampling or sampling + rejection, and the proposer's
phases (acceptance bookkeeping, capture, plan, drafting, choice, hand-over) with the
speculation overhead (everything a step costs beyond the forward and plain sampling).
``--cprofile FILE`` also writes a cProfile of the method's generate calls (the top of it
is printed). Run it alone on the machine: two processes on 2 cores distort each other.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--method", default="atlas-static")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="AtlasConfig field for the method's engine (repeatable)")
    ap.add_argument("--cprofile", default=None)
    args = ap.parse_args()

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.bench import _as_engine_prompt
    from atlas_rl.config import parse_field_settings
    from atlas_rl.machine import machine_info
    from atlas_rl.models import resolve_model
    from atlas_rl.workloads import math_prompts

    path = resolve_model(args.model)
    overrides = parse_field_settings(args.set)
    # checked by name and type before any engine is built (the method's engine only)
    method_config = AtlasConfig.from_dict({"dtype": args.dtype, **overrides}, where="--set")
    engines = {m: AtlasRolloutEngine(path, speculation=m, config=method_config if m != "none"
                                     else AtlasConfig(dtype=args.dtype))
               for m in ("none", args.method)}
    tok = engines["none"].tokenizer
    prompt = _as_engine_prompt(math_prompts(1, seed=3)[0].prompt,
                               bool(getattr(tok, "chat_template", None)), [])
    for eng in engines.values():  # warm-up, and the cost model's first steps
        eng.generate([prompt], n=args.sequences, max_tokens=32, seed=0, ignore_eos=True)
    profiler = cProfile.Profile() if args.cprofile else None
    rows = {m: [] for m in engines}
    for r in range(args.rounds):
        for m in (engines if r % 2 == 0 else reversed(list(engines))):
            eng = engines[m]
            profiled = profiler is not None and (m != "none" or args.method == "none")
            if profiled:
                profiler.enable()
            batch = eng.generate([prompt], n=args.sequences, max_tokens=args.tokens,
                                 seed=100 + r, ignore_eos=True)
            if profiled:
                profiler.disable()
            eng.update(batch)
            rows[m].append(batch.stats)
    dtype = str(engines["none"].llm.llm_engine.model_config.dtype).replace("torch.", "")
    info = machine_info(dtype)
    print(f"machine: {info['cpu']} (bf16 units: {info['cpu_bf16_units']}), {info['cores']} "
          f"cores, torch {info['torch']}, vLLM {info['vllm']}, {dtype}")
    print(f"tail: 1 prompt x {args.sequences} sequences, {args.tokens} tokens (EOS ignored), "
          f"T=1, {args.rounds} rounds interleaved")
    for m, stats in rows.items():
        print(f"\n{m}: " + format_phases(stats))
    ctl = engines[args.method].controller
    if ctl is not None:
        print("\n" + format_optimum(ctl, engines[args.method].stats(), rows[args.method],
                                      args.sequences))
    if profiler is not None:
        profiler.dump_stats(args.cprofile)
        pstats.Stats(args.cprofile).sort_stats("cumulative").print_stats(45)


def step_phases(s: dict) -> dict:
    n = max(1, s["engine_steps"])
    ms = 1e3 / n
    out = {"steps": s["engine_steps"], "tokens/step": s["num_tokens"] / n,
           "forward": s["forward_seconds"] * ms,
           "sampling+rejection": (s["sample_seconds"] - s.get("propose_seconds", 0.0)) * ms,
           "propose": s.get("propose_seconds", 0.0) * ms,
           "of which drafting": s.get("draft_seconds", 0.0) * ms,
           "other": (s["rollout_seconds"] - s["forward_seconds"] - s["sample_seconds"]) * ms,
           "step": s["rollout_seconds"] * ms, "tokens/s": s["tokens_per_s"],
           "AL": s.get("acceptance_length", 1.0) or 1.0, "lookahead": s.get("lookahead", 0.0) or 0.0}
    for k, v in s.get("phase_seconds", {}).items():
        out[k] = v * ms
    return out


def format_optimum(ctl, cumulative: dict, stats: list[dict], num_seqs: int) -> str:
    """The controller's lookahead against the offline optimum: expected tokens/s at each
    lookahead from this run's measured per-position acceptance and the controller's own
    step-cost model (`controller.lookahead_goodput`)."""
    from atlas_rl.controller import lookahead_goodput
    from atlas_rl.metrics import POS_PREFIX

    base = ctl.cost.base_seconds(num_seqs)
    cost = ctl.cost.spec_cost(num_seqs)
    if base is None or cost is None:
        return "offline optimum: the cost model has no measurement at this batch size"
    acc = []
    while (a := cumulative.get(f"{POS_PREFIX}{len(acc)}")) is not None:
        acc.append(a)
    draft = max(ctl.draft_position_seconds.values(), default=0.0)
    goodput = lookahead_goodput(acc, num_seqs, base, cost[0], cost[1], draft)
    best = max(range(len(goodput)), key=goodput.__getitem__)
    look = statistics.median(s.get("lookahead", 0.0) or 0.0 for s in stats)
    lo = min(int(look), len(goodput) - 1)
    hi = min(lo + 1, len(goodput) - 1)
    at = goodput[lo] + (goodput[hi] - goodput[lo]) * (look - lo)  # at the mean lookahead
    return (f"cost model at {num_seqs} sequences: base {base * 1e3:.1f} ms, speculation "
            f"overhead {cost[0] * 1e3:.1f} ms + {cost[1] * 1e3:.2f} ms per verified token, "
            f"drafting {draft * 1e3:.2f} ms per position ("
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in ctl.draft_position_seconds.items())
            + ")\n"
            f"acceptance per position (cumulative): {', '.join(f'{a:.3f}' for a in acc)}\n"
            f"expected tokens/s by lookahead: "
            f"{', '.join(f'{k}: {g:.1f}' for k, g in enumerate(goodput))}\n"
            f"offline optimum: lookahead {best} ({goodput[best]:.1f} tokens/s); the controller's "
            f"mean lookahead {look:.2f} ({at:.1f} tokens/s, {at / goodput[best]:.0%} of the "
            f"optimum's goodput)")


def format_phases(stats: list[dict]) -> str:
    """Per engine step: the medians over rounds of each phase (ms)."""
    phases = [step_phases(s) for s in stats]
    keys = phases[0].keys()
    med = {k: statistics.median(p[k] for p in phases) for k in keys}
    return ", ".join(f"{k} {v:.2f}" for k, v in med.items())


if __name__ == "__main__":
    main()

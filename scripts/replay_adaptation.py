"""Adaptation replayed offline on the domain-gap workload's rollouts (`atlas_rl.replay`):
the static drafter, the adaptive one under each recipe, and the domain oracle, scored on
every batch before the adaptive drafter learns it (first-position acceptance of a
distribution draft, against the policy's full-vocabulary p).

    python scripts/replay_adaptation.py                       # the engine's recipe
    python scripts/replay_adaptation.py --recipe default --recipe lr3e-3:lr=3e-3,max_epochs=4 \
        --json replay.json

The rollouts are captured once (vLLM, ~4 min for the default 16 steps here) and cached;
the domain oracle is the bench's (`atlas-rl bench --workload domain-gap` builds the same
one, cached under the same key). Recipe fields: see `atlas_rl.replay.RECIPE_DEFAULTS`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    from atlas_rl.replay import RECIPE_DEFAULTS, Recipe, ReplayConfig

    d = ReplayConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--domains", default=",".join(d.domains),
                    help="the domain-gap workload's domains, in order")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--completions", type=int, default=d.completions)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--dtype", default=d.dtype)
    ap.add_argument("--static", default="auto",
                    help="the static drafter's directory (auto: the bundled one; none)")
    ap.add_argument("--oracle", default="auto",
                    help="the domain oracle's directory (auto: the bench's, distilled and "
                         "cached as `atlas-rl bench --workload domain-gap` does; none)")
    ap.add_argument("--recipe", action="append", default=None, metavar="NAME[:F=V,...]",
                    help=f"an adaptation recipe (repeatable; default: the engine's). "
                         f"Fields: {', '.join(f'{k} ({v})' for k, v in RECIPE_DEFAULTS.items())}")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the capture's engine

    from atlas_rl.models import resolve_model
    from atlas_rl.replay import (capture, format_domain_summary, format_replay, policy_tensors,
                                 replay)
    from atlas_rl.speculators.neural import static_speculator_dir

    recipes = [Recipe.parse(r) for r in (args.recipe or ["default"])]
    cfg = ReplayConfig(model=args.model, domains=args.domains.split(","), steps=args.steps,
                       completions=args.completions, max_tokens=args.max_tokens,
                       seed=args.seed, dtype=args.dtype)
    path = resolve_model(cfg.model)
    static = static_speculator_dir(args.static, path, "mlp")
    oracle = None if args.oracle == "none" else args.oracle
    if oracle == "auto":
        from atlas_rl.bench import build_domain_oracle
        from transformers import AutoTokenizer

        chat = bool(getattr(AutoTokenizer.from_pretrained(path), "chat_template", None))
        oracle, _ = build_domain_oracle(cfg.bench_config(), path, cfg.dtype, chat, print)
    batches, where = capture(cfg)
    embed, head = policy_tensors(cfg.model)
    result = replay(batches, embed, head, None if static is None else str(static), oracle,
                    recipes, seed=cfg.seed)
    result.update(config=vars(cfg) | {"static": str(static), "oracle": oracle,
                                      "capture": str(where)})
    print(format_replay(result, "length"))
    print(format_replay(result, "accept1"))
    print(format_domain_summary(result, "length"))
    print(format_domain_summary(result, "accept1"))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

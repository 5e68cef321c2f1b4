"""A policy from further into RL: GRPO with a LoRA adapter on the benchmark's domains,
trained ahead so that `atlas-rl bench` can measure speculation where a user's run will
be after many steps (lower entropy, shorter and surer completions), not only at the
instruct model it starts from.

    python scripts/grpo_policy_point.py                       # SmolLM2-135M-Instruct, 24 steps (~17 min)
    python scripts/grpo_policy_point.py --steps 2 --prompts-per-step 2 --out /tmp/adapter

Per step: `--prompts-per-step` prompts, half arithmetic word problems and half JavaScript
functions (the benchmark's two domains, drawn from another seed than the benchmark's
prompts), `--group` completions each at temperature 1 (vLLM through AtlasRolloutEngine,
no speculation, float32: the logprobs are the policy's), the benchmark's reward
(`atlas_rl.rewards.rollout_reward`: correctness and format for the arithmetic, a function
that closes for JavaScript, plain text; brevity off by default) plus a self-certainty term
(`--confidence-reward` x the completion's mean sampled-token logprob, as in RENT and
Intuitor: on 2 CPU cores a run has a few dozen steps, and the task reward alone moved
neither reward nor entropy in 18 of them), group-normalised advantages and one
on-policy GRPO step (the clipped ratio is 1 on-policy: REINFORCE with those advantages,
the loss normalised by the step's token count; no KL term, as in TRL's default beta=0).
The merged weights go into the engine after every step.

What it writes to `--out`: the adapter in float16 (PEFT's `adapter_config.json` and
`adapter_model.safetensors`, a few MB) and `train_report.json`: the settings, the machine,
and per step the mean reward, the mean completion length, the share of completions that
stopped, and the policy's per-token entropy estimated from its samples (nats). The
adapter of record ships in `atlas_rl/assets/policies/`; `atlas-rl bench --model
smollm2-135m-instruct-grpo` merges it into the base model (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from atlas_rl import AtlasConfig, AtlasRolloutEngine
from atlas_rl.bench import _as_engine_prompt, reinforce_backward, sampled_entropy
from atlas_rl.models import POLICY_ADAPTERS_DIR, resolve_model
from atlas_rl.rewards import rollout_reward
from atlas_rl.workloads import javascript_prompts, math_prompts


def grpo_step(model, optimizer, params, completions, rewards, group: int) -> dict:
    """One on-policy GRPO step: advantages normalised within each prompt's group."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    loss = reinforce_backward(model, completions, adv.tolist())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm}


def save_adapter(peft_model, out: Path, report: dict) -> None:
    """PEFT's files with the weights in float16 and the base model as it was named (not a
    local cache path), and the training report."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    weights = out / "adapter_model.safetensors"
    state = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = report["base_model"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
    (out / "train_report.json").write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="known short name or a local HF folder (the base policy)")
    ap.add_argument("--steps", type=int, default=24,
                    help="GRPO steps (at the defaults entropy falls from ~2.1 to ~0.8 "
                         "nats/token in 21 steps, ~0.05 a step, still falling)")
    ap.add_argument("--prompts-per-step", type=int, default=8,
                    help="prompts per step, half arithmetic and half JavaScript")
    ap.add_argument("--group", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per completion at most")
    ap.add_argument("--lr", type=float, default=5e-4,
                    help="AdamW learning rate of the adapter (LoRA takes ~10x the learning "
                         "rate of full fine-tuning; the benchmark's full-weight GRPO runs at 1e-4)")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated module names the adapter wraps (default: every "
                         "linear layer of a Llama-style block)")
    ap.add_argument("--length-reward", type=float, default=0.0,
                    help="weight of the reward's brevity term (the benchmark's is 0.2; at 0.2 "
                         "and a LoRA learning rate, stopping early is all the policy learns)")
    ap.add_argument("--confidence-reward", type=float, default=0.5,
                    help="weight of a self-certainty term in the reward: the completion's "
                         "mean sampled-token logprob (RENT / Intuitor style). It speeds up the "
                         "entropy collapse that long GRPO runs show, so that a few dozen CPU "
                         "steps reach a policy of the entropy hundreds of task-reward steps "
                         "would; 0 takes it out")
    ap.add_argument("--seed", type=int, default=1,
                    help="seed of the prompts and the sampling (the benchmark uses 0)")
    ap.add_argument("--out", default=str(POLICY_ADAPTERS_DIR / "smollm2-135m-instruct-grpo"),
                    help="where the adapter and its report go")
    args = ap.parse_args(argv)
    if args.prompts_per_step < 2 or args.prompts_per_step % 2:
        ap.error(f"--prompts-per-step must be even and >= 2 (half per domain), got "
                 f"{args.prompts_per_step}")
    if args.group < 2:
        ap.error(f"--group must be >= 2 (advantages are relative to the group), got {args.group}")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from atlas_rl.machine import machine_info

    torch.manual_seed(args.seed)
    path = resolve_model(args.model)
    engine = AtlasRolloutEngine(path, speculation="none", config=AtlasConfig(
        dtype="float32", seed=args.seed, cpu_kv_cache_gib=1, sync_rollback=False))
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()  # no dropout in these models
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=[t for t in args.lora_targets.split(",") if t],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    half = args.prompts_per_step // 2
    pools = [math_prompts(args.steps * half, seed=args.seed),
             javascript_prompts(args.steps * half, seed=args.seed)]
    warned: list = []
    curve = []
    t_start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        prompts = [p for pool in pools for p in pool[step * half:(step + 1) * half]]
        batch = engine.generate([_as_engine_prompt(p.prompt, chat, warned) for p in prompts],
                                n=args.group, temperature=1.0, max_tokens=args.max_tokens,
                                seed=args.seed * 1_000_003 + step)
        rewards = []
        for i, c in enumerate(batch.completions):
            p = prompts[i // args.group]
            code = p.prompt if p.domain == "javascript" and isinstance(p.prompt, str) else None
            rewards.append(rollout_reward(
                c.text, p.answer, len(c.completion_ids), args.max_tokens,
                c.finish_reason == "stop", code, length_weight=args.length_reward,
                language="javascript" if p.domain == "javascript" else "python")
                + args.confidence_reward * (statistics.fmean(c.logprobs) if c.logprobs else 0.0))
        gen_s = time.perf_counter() - t0
        info = grpo_step(model, optimizer, params, batch.completions, rewards, args.group)
        engine.sync_weights(model)  # a PEFT LoRA model: its merged weights
        row = {"step": step + 1, "reward": statistics.fmean(rewards),
               "completion_tokens": statistics.fmean(len(c.completion_ids)
                                                     for c in batch.completions),
               "stopped": statistics.fmean(c.finish_reason == "stop"
                                           for c in batch.completions),
               "entropy": sampled_entropy(batch.completions),
               "generate_seconds": gen_s, "step_seconds": time.perf_counter() - t0, **info}
        curve.append(row)
        print(f"step {step + 1}/{args.steps}: reward {row['reward']:.3f}, "
              f"{row['completion_tokens']:.0f} tokens, stopped {row['stopped']:.2f}, "
              f"entropy {row['entropy']:.2f} nats/token, {row['step_seconds']:.1f} s",
              flush=True)
    report = {"how": "scripts/grpo_policy_point.py: on-policy GRPO (group-normalised "
                     "advantages, no KL term) with a LoRA adapter on the benchmark's domains "
                     "(other prompts), its task reward without the brevity term plus a "
                     "self-certainty term",
              "command": "python scripts/grpo_policy_point.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "base_model": args.model, "machine": machine_info("float32"),
              "minutes": (time.perf_counter() - t_start) / 60, "steps": curve}
    save_adapter(model, Path(args.out), report)
    engine.close()
    print(f"adapter and report in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

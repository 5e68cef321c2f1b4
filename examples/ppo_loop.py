"""A compact PPO loop (policy with a value head, GAE, clipped objective, KL penalty to a
reference) whose rollouts come from AtlasRolloutEngine. TRL 1.16 no longer ships a
PPOTrainer; this is the loop in ~150 lines, on the CPU by default.

    python examples/ppo_loop.py                              # SmolLM2-135M, arithmetic prompts
    python examples/ppo_loop.py --iterations 2 --max-tokens 16 --model /path/to/model

Per iteration: rollouts (vLLM, speculative, lossless: the returned logprobs are the
behaviour policy's), a terminal reward per completion plus a per-token KL penalty,
values from the value head, GAE advantages, a few PPO epochs, then the speculator learns
the rollouts and the new weights go into the engine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

from atlas_rl import AtlasConfig, AtlasRolloutEngine
from atlas_rl.models import resolve_model
from atlas_rl.rewards import rollout_reward
from atlas_rl.workloads import math_prompts


class PolicyWithValueHead(torch.nn.Module):
    """The causal LM and a scalar value head on its last hidden states."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.value_head = torch.nn.Linear(model.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.bias)
        torch.nn.init.normal_(self.value_head.weight, std=1e-3)

    def forward(self, ids, temperature: float):
        out = self.model(ids, output_hidden_states=True)
        logits = out.logits[0, :-1].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        values = self.value_head(out.hidden_states[-1][0, :-1]).squeeze(-1)
        return logp, values


def gae(rewards, values, gamma: float, lam: float):
    """Generalised advantage estimates and returns for one sequence (the episode ends
    after the last token: its next value is 0)."""
    adv = torch.zeros_like(rewards)
    last = 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--completions", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--clip", type=float, default=0.2)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--speculation", default="atlas")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    # The sampler in the policy's dtype: vLLM's logprobs are the "old" logprobs of the PPO
    # ratio, so they must be what the float32 policy computes (bf16 moves them by up to ~0.4).
    engine = AtlasRolloutEngine(path, speculation=args.speculation,
                                config=AtlasConfig(max_model_len=1024, cpu_kv_cache_gib=1,
                                                   dtype="float32"))
    torch.manual_seed(0)
    policy = PolicyWithValueHead(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    start = {n: q.detach().clone() for n, q in policy.named_parameters()}
    chat = bool(getattr(engine.tokenizer, "chat_template", None))

    for it in range(args.iterations):
        tasks = math_prompts(args.prompts, seed=it)
        prompts = [t.prompt if chat else t.meta["question"] + "\nAnswer:" for t in tasks]
        batch = engine.generate(prompts, n=args.completions, temperature=args.temperature,
                                max_tokens=args.max_tokens, seed=it)
        # rollout: old logprobs (vLLM's), values, rewards with the KL penalty, GAE
        samples = []
        with torch.no_grad():
            for c in batch:
                if not c.completion_ids:
                    continue
                ids = torch.tensor([c.prompt_ids + c.completion_ids])
                n_prompt, toks = len(c.prompt_ids), torch.tensor(c.completion_ids)
                logp, values = policy(ids, args.temperature)
                ref_logp = torch.log_softmax(
                    reference(ids).logits[0, :-1].float() / args.temperature, dim=-1)
                sl = slice(n_prompt - 1, None)
                old = torch.tensor(c.logprobs, dtype=torch.float32)
                kl = old - ref_logp[sl].gather(1, toks[:, None])[:, 0]
                rewards = -args.kl_coef * kl
                score = rollout_reward(c.text, tasks[c.prompt_index].answer, len(toks),
                                       args.max_tokens, c.finish_reason == "stop")
                rewards[-1] += score
                adv, returns = gae(rewards, values[sl], args.gamma, args.lam)
                samples.append((ids, n_prompt, toks, old, adv, returns, values[sl], score,
                                float(kl.mean())))
        all_adv = torch.cat([s[4] for s in samples])
        mean, std = all_adv.mean(), all_adv.std() + 1e-6

        for _ in range(args.ppo_epochs):
            for ids, n_prompt, toks, old, adv, returns, old_values, _, _ in samples:
                logp, values = policy(ids, args.temperature)
                sl = slice(n_prompt - 1, None)
                new = logp[sl].gather(1, toks[:, None])[:, 0]
                a = (adv - mean) / std
                ratio = torch.exp(new - old)
                pg = -torch.min(ratio * a, ratio.clamp(1 - args.clip, 1 + args.clip) * a).mean()
                v = values[sl]
                v_clipped = old_values + (v - old_values).clamp(-args.clip, args.clip)
                vf = 0.5 * torch.max(F.mse_loss(v, returns, reduction="none"),
                                     F.mse_loss(v_clipped, returns, reduction="none")).mean()
                loss = (pg + 0.1 * vf) / len(samples)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        engine.update(batch)                 # the adaptive speculator learns the rollouts
        engine.sync_weights(policy.model)    # the engine samples from the new policy
        s = batch.stats
        print(f"iteration {it + 1}/{args.iterations}: reward "
              f"{sum(x[7] for x in samples) / len(samples):.3f}  kl {sum(x[8] for x in samples) / len(samples):.4f}"
              f"  policy loss {float(pg):.4f}  value loss {float(vf):.4f}  "
              f"acceptance length {s['acceptance_length']:.2f}  {s['tokens_per_s']:.1f} tok/s",
              flush=True)

    moved = {n: float((q.detach() - start[n]).norm()) for n, q in policy.named_parameters()}
    print(json.dumps({"iterations": args.iterations,
                      "policy_delta": sum(v for n, v in moved.items() if not n.startswith("value_head")),
                      "value_head_delta": sum(v for n, v in moved.items() if n.startswith("value_head")),
                      "engine": {k: engine.stats()[k] for k in ("acceptance_length", "num_tokens")}}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    sys.exit(main())

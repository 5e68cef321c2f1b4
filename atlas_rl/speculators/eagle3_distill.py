"""Offline distillation of the EAGLE-3-class drafter (`drafter_net.Eagle3Net`) from a
transformers policy: no vLLM, so it runs on a GPU machine as well as on this CPU.

    python -m atlas_rl.speculators.eagle3_distill --model DIR --prompts A.jsonl B.jsonl.gz \
        --out DIR [--device cuda] [--time-budget 240] [--completions 8] [--max-tokens 256]

1. The policy samples completions of broad prompts at temperature 1 (no top-k/top-p:
   the drafter learns the distribution RL samples from).
2. One teacher forward per batch of rollouts gives, at every completion position, the
   residual stream at three layers (the features vLLM's EAGLE-3 path captures:
   `aux_layers`, vLLM's layer numbering = the input of that layer = transformers'
   ``hidden_states[layer]``) and the final normed hidden state, whose LM-head softmax is
   p.
3. The drafter (initialised from the policy's top decoder layer) is trained unrolled
   (training-time test: each draft step fed its own previous output) on TV(p, q) + a
   small cross-entropy term, weighted by draft position (`distill.unrolled_loss`), until
   the time budget; held-out acceptance per draft position is recorded against the
   distillation tokens seen (the curve in ``train_report.json``).

The draft vocabulary is the most frequent tokens of the completions; its coverage of the
policy's p and of the sampled tokens is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from atlas_rl.models import check_tokenizer
from atlas_rl.speculators.distill import (expected_length, unrolled_acceptance, unrolled_loss,
                                          vocab_targets)
from atlas_rl.speculators.drafter_net import Eagle3Net

logger = logging.getLogger(__name__)


@dataclass
class Eagle3DistillConfig:
    model: str
    prompts: list[str]
    out: str
    device: str = "cpu"
    num_prompts: int | None = None     # None: every prompt of the files
    completions: int = 4
    max_tokens: int = 256
    gen_batch: int = 64                # prompts per generate call
    train_batch: int = 32              # rollouts per training step
    steps: int = 4                     # draft positions unrolled (training-time test)
    window: int = 32
    draft_vocab_size: int = 8192
    aux_layers: list[int] | None = None  # None: (2, L // 2, L - 3), vLLM's EAGLE-3 default
    lr: float = 5e-4
    kl_weight: float = 0.1
    decay: float = 0.8
    holdout: float = 0.05              # fraction of prompts held out
    heldout_rollouts: int = 256        # at most this many held-out rollouts are evaluated
    time_budget: float = 240.0         # seconds of training
    deadline: float | None = None      # seconds for the whole run: training stops in time
    eval_every: int = 50               # training steps between held-out evaluations
    seed: int = 0
    dtype: str = "float32"
    generator: str = "transformers"    # or "vllm" (atlas-rl's engine, no speculation: faster
                                       # on a CPU); rollouts only, the teacher stays float32
    generator_dtype: str | None = None # the vLLM sampler's dtype (None: the engine's default)
    rollouts_cache: str | None = None  # JSON file: generated rollouts are saved / reused
    train_autocast: str | None = None  # e.g. bfloat16: matmuls of training in it (CPUs with
                                       # bf16 units; the weights stay float32)


@dataclass
class Rollouts:
    """Per rollout, the completion region: positions L-1 .. L+M-2 (the last prompt
    position first), each with the token sampled there."""

    tokens: list[torch.Tensor] = field(default_factory=list)   # [M] long (x_{t+1})
    start: list[int] = field(default_factory=list)             # L - 1
    aux: list[torch.Tensor] = field(default_factory=list)      # [M, 3d]
    final: list[torch.Tensor] = field(default_factory=list)    # [M, d]


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's EAGLE-3 default (2, L // 2, L - 3), kept distinct and below L for small
    models (a 2-layer policy: layers 0 and 1)."""
    return sorted({min(2, num_layers - 1), num_layers // 2 if num_layers > 2 else 1,
                   max(num_layers - 3, 0)})


def _prompt_ids(tokenizer, prompt, bos: int | None = None) -> list[int]:
    """``bos``: prepend it to plain text (a tokenizer that forgets the BOS its model
    expects: `models.check_tokenizer`)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids
    ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def load_prompts(files: list[str], count: int | None, seed: int) -> list:
    """`count` prompts drawn round-robin over `files` (every prompt with None), as
    `atlas-rl train-speculator` draws them for the MLP drafter."""
    from atlas_rl.train_speculator import _draw_prompts

    return _draw_prompts(files, count if count is not None else 1 << 62, seed)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], cfg: Eagle3DistillConfig,
             say) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids incl. EOS) per rollout, sampled at temperature 1."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=cfg.max_tokens, num_return_sequences=cfg.completions,
                           pad_token_id=pad, eos_token_id=eos)
    out, start = [], time.perf_counter()
    for b in range(0, len(prompt_ids), cfg.gen_batch):
        chunk = prompt_ids[b:b + cfg.gen_batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              generation_config=gen).cpu()
        for r, row in enumerate(seqs):
            comp = row[width:].tolist()
            if eos in comp:
                comp = comp[:comp.index(eos) + 1]
            if comp:
                out.append((chunk[r // cfg.completions], comp))
        say(f"generate: {min(b + cfg.gen_batch, len(prompt_ids))}/{len(prompt_ids)} prompts, "
            f"{sum(len(c) for _, c in out)} tokens, {time.perf_counter() - start:.0f} s")
    return out


def generate_vllm(prompt_ids: list[list[int]], cfg: Eagle3DistillConfig,
                  say) -> list[tuple[list[int], list[int]]]:
    """As `generate`, through atlas-rl's vLLM engine with speculation off."""
    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    engine = AtlasRolloutEngine(cfg.model, "none", AtlasConfig(
        dtype=cfg.generator_dtype, seed=cfg.seed,
        max_model_len=max(len(p) for p in prompt_ids) + cfg.max_tokens + 8))
    out, start = [], time.perf_counter()
    try:
        for b in range(0, len(prompt_ids), cfg.gen_batch):
            chunk = prompt_ids[b:b + cfg.gen_batch]
            batch = engine.generate(chunk, n=cfg.completions, max_tokens=cfg.max_tokens,
                                    temperature=1.0, seed=cfg.seed + b)
            out += [(list(c.prompt_ids), list(c.completion_ids)) for c in batch
                    if c.completion_ids]
            say(f"generate (vLLM): {min(b + cfg.gen_batch, len(prompt_ids))}/{len(prompt_ids)} "
                f"prompts, {sum(len(c) for _, c in out)} tokens, {time.perf_counter() - start:.0f} s")
    finally:
        del engine
    return out


@torch.no_grad()
def features(model, rollouts_ids, aux_layers: list[int], batch: int, say,
             store_dtype=torch.bfloat16) -> Rollouts:
    """The teacher forward: aux features and final hidden states over completion regions."""
    device = next(model.parameters()).device
    data = Rollouts()
    # similar lengths together (less padding); the order of `data` is the input's
    order = sorted(range(len(rollouts_ids)), key=lambda i: len(rollouts_ids[i][0]) + len(rollouts_ids[i][1]))
    slots: list = [None] * len(rollouts_ids)
    start = time.perf_counter()
    for b in range(0, len(order), batch):
        chunk = [rollouts_ids[i] for i in order[b:b + batch]]
        seqs = [p + c for p, c in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):  # right padding: positions are the real ones
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        hs = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   output_hidden_states=True).hidden_states
        aux = torch.cat([hs[layer] for layer in aux_layers], dim=-1)
        final = hs[-1]
        for i, (p, c) in enumerate(chunk):
            lo, hi = len(p) - 1, len(p) - 1 + len(c)
            slots[order[b + i]] = (torch.tensor(c), lo, aux[i, lo:hi].to(store_dtype).clone(),
                                   final[i, lo:hi].to(store_dtype).clone())
        if (b // batch) % 10 == 0:
            say(f"features: {min(b + batch, len(order))}/{len(order)} rollouts, "
                f"{time.perf_counter() - start:.0f} s")
    for tok, lo, aux_rows, final_rows in slots:
        data.tokens.append(tok)
        data.start.append(lo)
        data.aux.append(aux_rows)
        data.final.append(final_rows)
    say(f"features: {len(data.tokens)} rollouts")
    return data


def make_batch(data: Rollouts, idx: list[int], steps: int, embed: torch.Tensor, device):
    """Pad rollouts `idx` into training tensors (`distill.unrolled_loss`'s layout)."""
    M = max(len(data.tokens[i]) for i in idx)
    B, d = len(idx), embed.shape[1]
    aux = torch.zeros((B, M, data.aux[idx[0]].shape[1]), device=device)
    final = torch.zeros((B, M + steps, d), device=device)
    tok = torch.zeros((B, M + steps - 1), dtype=torch.long, device=device)
    pos = torch.zeros((B, M), dtype=torch.long, device=device)
    valid = torch.zeros((B, M + steps), dtype=torch.bool, device=device)
    for r, i in enumerate(idx):
        n = len(data.tokens[i])
        aux[r, :n] = data.aux[i].to(device, torch.float32)
        final[r, :n] = data.final[i].to(device, torch.float32)
        tok[r, :n] = data.tokens[i].to(device)
        pos[r] = data.start[i] + torch.arange(M, device=device)
        valid[r, :n] = True
    return aux, embed.index_select(0, tok.flatten()).view(B, -1, d).float(), pos, valid, final


def distil(cfg: Eagle3DistillConfig, say=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_all = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype)).to(device)
    model.eval()
    n_layers = int(model.config.num_hidden_layers)
    aux_layers = list(cfg.aux_layers or default_aux_layers(n_layers))
    if max(aux_layers) >= n_layers or min(aux_layers) < 0:
        raise ValueError(f"aux_layers {aux_layers} out of range for a {n_layers}-layer policy")

    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    rng = random.Random(cfg.seed)
    rng.shuffle(prompts)
    n_held = max(1, int(round(cfg.holdout * len(prompts))))
    check = check_tokenizer(tokenizer, cfg.model)
    for problem in check.problems:
        logger.warning("atlas-rl: %s", problem)
    bos = check.bos_token_id if check.prepend_bos else None
    ids = [_prompt_ids(tokenizer, p.prompt, bos) for p in prompts]
    t0 = time.perf_counter()
    cache = Path(cfg.rollouts_cache) if cfg.rollouts_cache else None
    if cache is not None and cache.is_file():
        rollouts = [(list(p), list(c)) for p, c in json.loads(cache.read_text())]
        say(f"rollouts from {cache}: {len(rollouts)}")
    elif cfg.generator == "vllm":
        rollouts = generate_vllm(ids, cfg, say)
    elif cfg.generator == "transformers":
        rollouts = generate(model, tokenizer, ids, cfg, say)
    else:
        raise ValueError(f"generator must be 'transformers' or 'vllm', got {cfg.generator!r}")
    if cache is not None and not cache.is_file():
        cache.write_text(json.dumps(rollouts))
    gen_s = time.perf_counter() - t0
    held_prompts = {tuple(p) for p in ids[:n_held]}
    t0 = time.perf_counter()
    data = features(model, rollouts, aux_layers, max(1, cfg.gen_batch), say)
    feat_s = time.perf_counter() - t0
    is_held = [tuple(p) in held_prompts for p, _ in rollouts]
    train_idx = [i for i, h in enumerate(is_held) if not h]
    held_idx = [i for i, h in enumerate(is_held) if h][:cfg.heldout_rollouts]
    if not train_idx or not held_idx:
        raise ValueError(f"need rollouts both for training and held out; got {len(train_idx)} "
                         f"and {len(held_idx)} (more prompts, or another --holdout)")

    V = int(model.config.vocab_size)
    counts = torch.zeros(V)
    for i in train_idx:
        counts += torch.bincount(data.tokens[i], minlength=V)[:V].float()
    k = min(cfg.draft_vocab_size, V)
    vocab = torch.sort(torch.topk(counts, k).indices).values
    sampled_coverage = float(counts[vocab].sum() / counts.sum())

    embed = model.get_input_embeddings().weight.detach().float()
    head = model.get_output_embeddings().weight.detach().float()
    vocab_d = vocab.to(device)
    head_sub = head.index_select(0, vocab_d)
    net = Eagle3Net.for_policy(model.config, window=cfg.window, num_aux=len(aux_layers)).to(device)
    net.init_from_policy_layer({k2: v for k2, v in model.state_dict().items()}, n_layers - 1)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)

    def evaluate() -> dict:
        net.eval()
        agg: dict[str, list[float]] = {}
        n = 0
        for s in range(0, len(held_idx), cfg.train_batch):
            part = held_idx[s:s + cfg.train_batch]
            aux, emb, pos, valid, final = make_batch(data, part, cfg.steps, embed, device)
            p_sub, p_out = vocab_targets(final, head, vocab_d)
            res = unrolled_acceptance(net, aux, emb, pos, valid, head_sub, p_sub, p_out, cfg.steps)
            for key, vals in res.items():
                cur = agg.setdefault(key, [0.0] * len(vals))
                agg[key] = [c + v * len(part) for c, v in zip(cur, vals)]
            n += len(part)
        net.train()
        out = {key: [v / n for v in vals] for key, vals in agg.items()}
        out["acceptance_length_distribution"] = expected_length(out["distribution"])
        out["acceptance_length_one_hot"] = expected_length(out["one_hot"])
        return out

    curve = [{"step": 0, "tokens": 0, **evaluate()}]
    say(f"held-out before training: {fmt_eval(curve[0])}")
    t0 = time.perf_counter()
    step, tokens, losses = 0, 0, []
    order: list[int] = []
    autocast = (torch.autocast(device.type, dtype=getattr(torch, cfg.train_autocast))
                if cfg.train_autocast else contextlib.nullcontext())
    budget = cfg.time_budget
    if cfg.deadline is not None:  # leave time for the last evaluation and the save
        budget = min(budget, cfg.deadline - (time.perf_counter() - t_all) - 20.0)
        say(f"training budget {budget:.0f} s (deadline {cfg.deadline:.0f} s)")
    while time.perf_counter() - t0 < budget:
        if not order:
            order = train_idx[:]
            rng.shuffle(order)
        part, order = order[:cfg.train_batch], order[cfg.train_batch:]
        aux, emb, pos, valid, final = make_batch(data, part, cfg.steps, embed, device)
        with torch.no_grad():  # the targets in float32: p's small entries matter to TV
            p_sub, p_out = vocab_targets(final, head, vocab_d)
        lr = cfg.lr * min(1.0, (step + 1) / 100)  # warm-up
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast:
            loss, _ = unrolled_loss(net, aux, emb, pos, valid, head_sub, p_sub, p_out, cfg.steps,
                                    cfg.kl_weight, cfg.decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += int(valid[:, :aux.shape[1]].sum())
        losses.append(float(loss.detach()))
        if step % cfg.eval_every == 0:
            ev = evaluate()
            curve.append({"step": step, "tokens": tokens, "loss": sum(losses) / len(losses), **ev})
            losses = []
            say(f"step {step}, {tokens} tokens, {time.perf_counter() - t0:.0f} s: {fmt_eval(ev)}")
    train_s = time.perf_counter() - t0
    final_eval = evaluate()
    curve.append({"step": step, "tokens": tokens, **final_eval})
    say(f"final ({step} steps, {tokens} tokens): {fmt_eval(final_eval)}")

    out = Path(cfg.out)
    save_drafter(out, net, vocab, aux_layers, meta={"trained_tokens": tokens})
    report = {"config": asdict(cfg), "aux_layers": aux_layers, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "rollouts": len(rollouts), "train_rollouts": len(train_idx),
              "heldout_rollouts": len(held_idx),
              "completion_tokens": int(sum(len(t) for t in data.tokens)),
              "draft_vocab_sampled_coverage": sampled_coverage,
              "generate_seconds": gen_s, "feature_seconds": feat_s, "train_seconds": train_s,
              "train_steps": step, "train_tokens": tokens,
              "total_seconds": time.perf_counter() - t_all,
              "heldout_final": final_eval, "curve": curve}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    say(f"saved the drafter to {out}")
    return report


def fmt_eval(ev: dict) -> str:
    r = lambda xs: "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
    return (f"accept per position {r(ev['distribution'])} (distribution), "
            f"{r(ev['one_hot'])} (one-hot), ceiling {r(ev['one_hot_ceiling'])}; "
            f"length {ev['acceptance_length_distribution']:.2f} / "
            f"{ev['acceptance_length_one_hot']:.2f}")


def save_drafter(out: Path, net: Eagle3Net, vocab: torch.Tensor, aux_layers: list[int],
                 meta: dict | None = None) -> None:
    """The on-disk form `Eagle3Speculator.load` reads: eagle3.safetensors + eagle3.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}
    tensors["vocab"] = vocab.cpu().long().contiguous()
    save_file(tensors, str(out / "eagle3.safetensors"))
    (out / "eagle3.json").write_text(json.dumps(
        {"name": "eagle3", "net": net.config(), "aux_layers": list(aux_layers),
         "draft_vocab_size": int(len(vocab)), "version": 0, **(meta or {})}, indent=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Eagle3DistillConfig(model="", prompts=[], out="")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    for name, value in asdict(defaults).items():
        if name in ("model", "prompts", "out", "aux_layers"):
            continue
        kind = type(value) if value is not None else (
            float if name == "deadline" else int if name == "num_prompts" else str)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    ap.add_argument("--aux-layers", type=int, nargs=3, default=None)
    args = vars(ap.parse_args(argv))
    cfg = Eagle3DistillConfig(**args)
    if not math.isfinite(cfg.time_budget) or cfg.time_budget <= 0:
        raise SystemExit(f"--time-budget must be a positive number of seconds, got {cfg.time_budget}")
    distil(cfg, say=lambda *a: print(*a, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

With ``--work-dir DIR`` the distillation runs in rounds that a later run continues
(`distil_resumable`): fresh rollouts every round, everything the next run needs kept in
DIR, the drafter in ``--out`` rewritten after each round (``--save-dtype float16`` to
ship it). That is how a CPU carries the distillation from session to session, and how a
GPU machine's per-call time limit is split over calls.
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
                                       # on a CPU; rollouts only, the teacher stays float32),
                                       # or "static-cache" (`rollout_sampler`: Llama-family
                                       # policies at GPU batch sizes)
    generator_dtype: str | None = None # the vLLM sampler's dtype (None: the engine's default)
    rollouts_cache: str | None = None  # JSON file: generated rollouts are saved / reused
    train_autocast: str | None = None  # e.g. bfloat16: matmuls of training in it (CPUs with
                                       # bf16 units; the weights stay float32)
    work_dir: str | None = None        # resumable rounds (`distil_resumable`): what a later run
                                       # with the same settings continues from is kept here
    round_prompts: int = 64            # prompts per round (work_dir)
    vocab_prompts: int = 256           # the first round's prompts, the draft vocabulary's source
    passes: int = 1                    # times a round's rollouts are trained on
    max_rounds: int | None = None      # rounds in this run (None: until the time budget)
    save_dtype: str = "float32"        # the saved drafter's weights (float16 to ship it)
    compare_to: str | None = None      # an EAGLE-3 drafter directory (e.g. the bundled one)
                                       # evaluated on the same held-out set (work_dir)


GENERATORS = ("transformers", "vllm", "static-cache")


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
             say, seed: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids incl. EOS) per rollout, sampled at temperature 1: by
    `rollout_sampler.sample_rollouts` where cfg.generator is "static-cache" and the policy
    is of the Llama family, else by transformers' ``generate``."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if cfg.generator == "static-cache":
        from atlas_rl.speculators.rollout_sampler import sample_rollouts, unsupported_reason

        reason = unsupported_reason(model)
        if reason is None:
            return sample_rollouts(model, prompt_ids, cfg.completions, cfg.max_tokens, eos, pad,
                                   cfg.gen_batch, seed if seed is not None else cfg.seed, say)
        logger.warning("atlas-rl: the static-cache sampler cannot run this policy (%s); "
                       "sampling with transformers' generate", reason)
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


def _vllm_engine(cfg: Eagle3DistillConfig, max_prompt: int):
    """atlas-rl's vLLM engine with speculation off, for rollouts of prompts up to
    `max_prompt` tokens."""
    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    return AtlasRolloutEngine(cfg.model, "none", AtlasConfig(
        dtype=cfg.generator_dtype, seed=cfg.seed, max_model_len=max_prompt + cfg.max_tokens + 8))


def _generate_with(engine, prompt_ids: list[list[int]], cfg: Eagle3DistillConfig, seed: int,
                   say) -> list[tuple[list[int], list[int]]]:
    out, start = [], time.perf_counter()
    for b in range(0, len(prompt_ids), cfg.gen_batch):
        batch = engine.generate(prompt_ids[b:b + cfg.gen_batch], n=cfg.completions,
                                max_tokens=cfg.max_tokens, temperature=1.0, seed=seed + b)
        out += [(list(c.prompt_ids), list(c.completion_ids)) for c in batch if c.completion_ids]
        say(f"generate (vLLM): {min(b + cfg.gen_batch, len(prompt_ids))}/{len(prompt_ids)} "
            f"prompts, {sum(len(c) for _, c in out)} tokens, {time.perf_counter() - start:.0f} s")
    return out


def generate_vllm(prompt_ids: list[list[int]], cfg: Eagle3DistillConfig,
                  say) -> list[tuple[list[int], list[int]]]:
    """As `generate`, through atlas-rl's vLLM engine with speculation off."""
    engine = _vllm_engine(cfg, max(len(p) for p in prompt_ids))
    try:
        return _generate_with(engine, prompt_ids, cfg, cfg.seed, say)
    finally:
        engine.close()


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
        # logits_to_keep=1: the head over every position is not needed (p is computed
        # from `final` at training time) and would be the largest tensor of the forward
        hs = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   output_hidden_states=True, logits_to_keep=1).hidden_states
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


class _Trainer:
    """The drafter, its optimizer and what trains and evaluates it on a `Rollouts` set:
    shared by the one-shot `distil` and the resumable `distil_resumable`."""

    def __init__(self, cfg: Eagle3DistillConfig, model, vocab: torch.Tensor,
                 aux_layers: list[int], device: torch.device):
        self.cfg, self.device = cfg, device
        self.embed = model.get_input_embeddings().weight.detach().float()
        self.head = model.get_output_embeddings().weight.detach().float()
        self.vocab = vocab
        self.vocab_d = vocab.to(device)
        self.head_sub = self.head.index_select(0, self.vocab_d)
        n_layers = int(model.config.num_hidden_layers)
        self.net = Eagle3Net.for_policy(model.config, window=cfg.window,
                                        num_aux=len(aux_layers)).to(device)
        self.net.init_from_policy_layer(dict(model.state_dict()), n_layers - 1)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.autocast = ((lambda: torch.autocast(device.type, dtype=getattr(torch, cfg.train_autocast)))
                         if cfg.train_autocast else contextlib.nullcontext)
        self.step, self.tokens = 0, 0

    def train_on(self, data: Rollouts, part: list[int]) -> float:
        """One optimizer step on rollouts `part`; the loss."""
        cfg = self.cfg
        aux, emb, pos, valid, final = make_batch(data, part, cfg.steps, self.embed, self.device)
        with torch.no_grad():  # the targets in float32: p's small entries matter to TV
            p_sub, p_out = vocab_targets(final, self.head, self.vocab_d)
        lr = cfg.lr * min(1.0, (self.step + 1) / 100)  # warm-up
        for group in self.opt.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss, _ = unrolled_loss(self.net, aux, emb, pos, valid, self.head_sub, p_sub, p_out,
                                    cfg.steps, cfg.kl_weight, cfg.decay)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        self.tokens += int(valid[:, :aux.shape[1]].sum())
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, data: Rollouts, held_idx: list[int]) -> dict:
        """Held-out acceptance per draft position and the expected lengths."""
        cfg = self.cfg
        self.net.eval()
        agg: dict[str, list[float]] = {}
        n = 0
        for s in range(0, len(held_idx), cfg.train_batch):
            part = held_idx[s:s + cfg.train_batch]
            aux, emb, pos, valid, final = make_batch(data, part, cfg.steps, self.embed, self.device)
            p_sub, p_out = vocab_targets(final, self.head, self.vocab_d)
            res = unrolled_acceptance(self.net, aux, emb, pos, valid, self.head_sub, p_sub, p_out,
                                      cfg.steps)
            for key, vals in res.items():
                cur = agg.setdefault(key, [0.0] * len(vals))
                agg[key] = [c + v * len(part) for c, v in zip(cur, vals)]
            n += len(part)
        self.net.train()
        out = {key: [v / n for v in vals] for key, vals in agg.items()}
        out["acceptance_length_distribution"] = expected_length(out["distribution"])
        out["acceptance_length_one_hot"] = expected_length(out["one_hot"])
        return out

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(),
                "step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def _load_teacher(cfg: Eagle3DistillConfig):
    """(tokenizer, teacher model in eval mode, its aux layers, device)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype)).to(device)
    model.eval()
    n_layers = int(model.config.num_hidden_layers)
    aux_layers = list(cfg.aux_layers or default_aux_layers(n_layers))
    if max(aux_layers) >= n_layers or min(aux_layers) < 0:
        raise ValueError(f"aux_layers {aux_layers} out of range for a {n_layers}-layer policy")
    return tokenizer, model, aux_layers, device


def _prompt_id_lists(cfg: Eagle3DistillConfig, tokenizer) -> tuple[list[list[int]], int]:
    """Every prompt's ids, shuffled by the seed, and how many of the first are held out."""
    prompts = load_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    random.Random(cfg.seed).shuffle(prompts)
    n_held = max(1, int(round(cfg.holdout * len(prompts))))
    check = check_tokenizer(tokenizer, cfg.model)
    for problem in check.problems:
        logger.warning("atlas-rl: %s", problem)
    bos = check.bos_token_id if check.prepend_bos else None
    return [_prompt_ids(tokenizer, p.prompt, bos) for p in prompts], n_held


def _draft_vocab(data: Rollouts, idx: list[int], vocab_size: int, k: int) -> tuple[torch.Tensor, float]:
    """The `k` most frequent sampled tokens of rollouts `idx` (sorted), and the share of
    the sampled tokens they cover."""
    counts = torch.zeros(vocab_size)
    for i in idx:
        counts += torch.bincount(data.tokens[i], minlength=vocab_size)[:vocab_size].float()
    vocab = torch.sort(torch.topk(counts, min(k, vocab_size)).indices).values
    return vocab, float(counts[vocab].sum() / counts.sum())


def distil(cfg: Eagle3DistillConfig, say=print) -> dict:
    t_all = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer, model, aux_layers, device = _load_teacher(cfg)
    ids, n_held = _prompt_id_lists(cfg, tokenizer)
    rng = random.Random(cfg.seed + 1)  # the training order
    t0 = time.perf_counter()
    cache = Path(cfg.rollouts_cache) if cfg.rollouts_cache else None
    if cache is not None and cache.is_file():
        rollouts = [(list(p), list(c)) for p, c in json.loads(cache.read_text())]
        say(f"rollouts from {cache}: {len(rollouts)}")
    elif cfg.generator == "vllm":
        rollouts = generate_vllm(ids, cfg, say)
    elif cfg.generator in GENERATORS:
        rollouts = generate(model, tokenizer, ids, cfg, say)
    else:
        raise ValueError(f"generator must be one of {GENERATORS}, got {cfg.generator!r}")
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

    vocab, sampled_coverage = _draft_vocab(data, train_idx, int(model.config.vocab_size),
                                           cfg.draft_vocab_size)
    trainer = _Trainer(cfg, model, vocab, aux_layers, device)
    curve = [{"step": 0, "tokens": 0, **trainer.evaluate(data, held_idx)}]
    say(f"held-out before training: {fmt_eval(curve[0])}")
    t0 = time.perf_counter()
    losses: list[float] = []
    order: list[int] = []
    budget = cfg.time_budget
    if cfg.deadline is not None:  # leave time for the last evaluation and the save
        budget = min(budget, cfg.deadline - (time.perf_counter() - t_all) - 20.0)
        say(f"training budget {budget:.0f} s (deadline {cfg.deadline:.0f} s)")
    while time.perf_counter() - t0 < budget:
        if not order:
            order = train_idx[:]
            rng.shuffle(order)
        part, order = order[:cfg.train_batch], order[cfg.train_batch:]
        losses.append(trainer.train_on(data, part))
        if trainer.step % cfg.eval_every == 0:
            ev = trainer.evaluate(data, held_idx)
            curve.append({"step": trainer.step, "tokens": trainer.tokens,
                          "loss": sum(losses) / len(losses), **ev})
            losses = []
            say(f"step {trainer.step}, {trainer.tokens} tokens, {time.perf_counter() - t0:.0f} s: "
                f"{fmt_eval(ev)}")
    train_s = time.perf_counter() - t0
    final_eval = trainer.evaluate(data, held_idx)
    curve.append({"step": trainer.step, "tokens": trainer.tokens, **final_eval})
    say(f"final ({trainer.step} steps, {trainer.tokens} tokens): {fmt_eval(final_eval)}")

    out = Path(cfg.out)
    save_drafter(out, trainer.net, vocab, aux_layers, meta={"trained_tokens": trainer.tokens})
    report = {"config": asdict(cfg), "aux_layers": aux_layers, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "rollouts": len(rollouts), "train_rollouts": len(train_idx),
              "heldout_rollouts": len(held_idx),
              "completion_tokens": int(sum(len(t) for t in data.tokens)),
              "draft_vocab_sampled_coverage": sampled_coverage,
              "generate_seconds": gen_s, "feature_seconds": feat_s, "train_seconds": train_s,
              "train_steps": trainer.step, "train_tokens": trainer.tokens,
              "total_seconds": time.perf_counter() - t_all,
              "heldout_final": final_eval, "curve": curve}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    say(f"saved the drafter to {out}")
    return report


# What a work directory's distillation is of: a later run must agree on all of them.
RESUME_FIELDS = ("model", "prompts", "num_prompts", "seed", "holdout", "heldout_rollouts",
                 "completions", "max_tokens", "steps", "window", "draft_vocab_size",
                 "aux_layers", "dtype", "vocab_prompts")


def _write_atomic(path: Path, content) -> None:
    """Text, or anything else through torch.save, to a temporary file renamed over `path`:
    a run killed midway leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        torch.save(content, tmp)
    tmp.replace(path)


class _RoundGenerator:
    """Temperature-1 rollouts of one round's prompts, seeded by the round: through
    atlas-rl's vLLM engine (built once per run) or the transformers teacher."""

    def __init__(self, cfg: Eagle3DistillConfig, model, tokenizer, max_prompt: int):
        self.cfg, self.model, self.tokenizer, self.engine = cfg, model, tokenizer, None
        if cfg.generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {cfg.generator!r}")
        if cfg.generator == "vllm":
            self.engine = _vllm_engine(cfg, max_prompt)

    def __call__(self, ids: list[list[int]], seed: int, say) -> list[tuple[list[int], list[int]]]:
        if self.engine is None:
            torch.manual_seed(seed)
            return generate(self.model, self.tokenizer, ids, self.cfg, say, seed=seed)
        return _generate_with(self.engine, ids, self.cfg, seed, say)


def distil_resumable(cfg: Eagle3DistillConfig, say=print) -> dict:
    """Distillation in rounds that a later run continues: each round generates rollouts
    of the next `round_prompts` prompts (fresh data, not more epochs; after the last
    prompt the pool starts over with new sampling seeds), extracts their features, trains
    on them `passes` times, evaluates on the fixed held-out set, and checkpoints. The work
    directory keeps what the next run needs: the settings, the held-out rollouts, the
    draft vocabulary (chosen once, from the first round's `vocab_prompts` prompts), every
    round's rollouts, the drafter and its optimizer, the curve. A run stops between rounds
    when the next would pass its time budget (or after `max_rounds`); a run killed midway
    loses at most the round in progress. The drafter in `out` is rewritten after every
    round (in `save_dtype`), with the report of all runs so far."""
    from atlas_rl.machine import machine_info

    t_all = time.perf_counter()
    work = Path(cfg.work_dir)
    (work / "rollouts").mkdir(parents=True, exist_ok=True)
    identity = {k: getattr(cfg, k) for k in RESUME_FIELDS}
    identity["prompts"] = [f if f.startswith("builtin:") else str(Path(f).resolve())
                           for f in cfg.prompts]
    identity["model"] = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    # checkpoint.pt holds the drafter, its optimizer and the state together (one rename
    # commits a round); state.json is its readable copy.
    state_path, ckpt_path = work / "state.json", work / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False) if ckpt_path.is_file() else None
    state = ckpt["state"] if ckpt is not None else None
    if state is not None and state["identity"] != identity:
        diff = {k: (state["identity"].get(k), v) for k, v in identity.items()
                if state["identity"].get(k) != v}
        raise ValueError(f"{work} holds a distillation with other settings "
                         f"({', '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in diff.items())}): "
                         f"run with the same settings to continue it, or give another --work-dir")

    torch.manual_seed(cfg.seed)
    tokenizer, model, aux_layers, device = _load_teacher(cfg)
    ids, n_held = _prompt_id_lists(cfg, tokenizer)
    held_ids, pool = ids[:n_held], ids[n_held:]
    if not pool:
        raise ValueError(f"all {len(ids)} prompts are held out: more prompts, or a smaller --holdout")
    gen = _RoundGenerator(cfg, model, tokenizer, max(len(p) for p in ids))

    held_path = work / "heldout.json"
    if held_path.is_file():
        held_rollouts = json.loads(held_path.read_text())
    else:
        # as many held-out prompts as `heldout_rollouts` needs, spread over the held-out set
        need = min(len(held_ids), -(-cfg.heldout_rollouts // cfg.completions))
        chosen = [held_ids[i * len(held_ids) // need] for i in range(need)]
        say(f"held-out rollouts: {need} of the {len(held_ids)} held-out prompts x {cfg.completions}")
        held_rollouts = gen(chosen, cfg.seed + 7919, say)[:cfg.heldout_rollouts]
        _write_atomic(held_path, json.dumps(held_rollouts))
    held = features(model, held_rollouts, aux_layers, max(1, cfg.gen_batch), lambda *a: None)
    held_idx = list(range(len(held.tokens)))
    reference = _evaluate_reference(cfg, model, aux_layers, device, held, held_idx, say)

    if state is None:
        state = {"identity": identity, "round": 0, "next_prompt": 0, "epoch": 0, "curve": [],
                 "runs": [], "sampled_coverage": None}
    if reference is not None:
        state["reference"] = reference
    trainer = None
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(cfg.train_autocast or cfg.dtype),
           "rounds": 0, "tokens": 0, "seconds": 0.0}
    state["runs"].append(run)
    budget = cfg.time_budget if cfg.deadline is None else min(cfg.time_budget, cfg.deadline)
    last_round = 0.0
    while True:
        elapsed = time.perf_counter() - t_all
        if cfg.max_rounds is not None and run["rounds"] >= cfg.max_rounds:
            break
        if run["rounds"] and elapsed + last_round > budget:
            break
        t_round = time.perf_counter()
        r = state["round"]
        shard = work / "rollouts" / f"round-{r:05d}.json"
        size = max(cfg.round_prompts, cfg.vocab_prompts) if r == 0 else cfg.round_prompts
        lo = state["next_prompt"]
        chunk = pool[lo:lo + size]
        if shard.is_file():  # generated by a run that stopped before training on it
            rollouts = json.loads(shard.read_text())
        else:
            rollouts = gen(chunk, cfg.seed + 104729 * state["epoch"] + lo, say)
            _write_atomic(shard, json.dumps(rollouts))
        data = features(model, rollouts, aux_layers, max(1, cfg.gen_batch), lambda *a: None)
        idx = list(range(len(data.tokens)))
        if trainer is None:
            vocab_path = work / "vocab.pt"
            if vocab_path.is_file():
                vocab = torch.load(vocab_path)
            else:
                vocab, state["sampled_coverage"] = _draft_vocab(
                    data, idx, int(model.config.vocab_size), cfg.draft_vocab_size)
                _write_atomic(vocab_path, vocab)
            trainer = _Trainer(cfg, model, vocab, aux_layers, device)
            if ckpt is not None:
                trainer.load_state_dict(ckpt["trainer"])
                ckpt = None
            if not state["curve"]:
                state["curve"].append({"round": 0, "step": 0, "tokens": 0,
                                       **trainer.evaluate(held, held_idx)})
                say(f"held-out before training: {fmt_eval(state['curve'][0])}")
        order_rng = random.Random(cfg.seed * 1000003 + r)
        losses = []
        tokens_before = trainer.tokens
        for _ in range(cfg.passes):
            order = idx[:]
            order_rng.shuffle(order)
            for b in range(0, len(order), cfg.train_batch):
                losses.append(trainer.train_on(data, order[b:b + cfg.train_batch]))
        ev = trainer.evaluate(held, held_idx)
        state["curve"].append({"round": r + 1, "step": trainer.step, "tokens": trainer.tokens,
                               "loss": sum(losses) / max(1, len(losses)), **ev})
        state["round"] = r + 1
        state["next_prompt"] = lo + len(chunk)
        if state["next_prompt"] >= len(pool):  # every prompt seen: again, with new seeds
            state["next_prompt"], state["epoch"] = 0, state["epoch"] + 1
        last_round = time.perf_counter() - t_round
        run["rounds"] += 1
        run["tokens"] += trainer.tokens - tokens_before
        run["seconds"] = time.perf_counter() - t_all
        _write_atomic(ckpt_path, {"trainer": trainer.state_dict(), "state": state})
        _write_atomic(state_path, json.dumps(state, indent=1))
        report = _resumable_report(cfg, state, aux_layers, trainer, len(held_idx))
        save_drafter(Path(cfg.out), trainer.net, trainer.vocab, aux_layers,
                     meta={"trained_tokens": trainer.tokens}, dtype=getattr(torch, cfg.save_dtype))
        (Path(cfg.out) / "train_report.json").write_text(json.dumps(report, indent=2))
        say(f"round {r + 1}: {len(rollouts)} rollouts, {trainer.tokens:,} token-positions in all, "
            f"{last_round:.0f} s: {fmt_eval(ev)}")
    say(f"stopped after {run['rounds']} rounds this run ({run['tokens']:,} token-positions, "
        f"{time.perf_counter() - t_all:.0f} s); {work} continues from round {state['round'] + 1}")
    return _resumable_report(cfg, state, aux_layers, trainer, len(held_idx)) if trainer else {}


def _evaluate_reference(cfg, model, aux_layers, device, held: Rollouts, held_idx: list[int],
                        say) -> dict | None:
    """`cfg.compare_to`'s held-out acceptance on this distillation's held-out set: the
    line the curve has to pass."""
    if not cfg.compare_to:
        return None
    from atlas_rl.speculators.eagle3 import Eagle3Speculator

    spec = Eagle3Speculator.from_dir(cfg.compare_to)
    if list(spec.aux_layers) != list(aux_layers):
        raise ValueError(f"--compare-to {cfg.compare_to}: that drafter reads layers "
                         f"{list(spec.aux_layers)}, this distillation {list(aux_layers)}")
    ref = _Trainer(cfg, model, spec.vocab, aux_layers, device)
    ref.net = spec.net.to(device)
    ev = {"drafter": str(cfg.compare_to), "trained_tokens": spec.meta.get("trained_tokens"),
          **ref.evaluate(held, held_idx)}
    say(f"reference {cfg.compare_to} on the held-out set: {fmt_eval(ev)}")
    return ev


def _resumable_report(cfg, state: dict, aux_layers, trainer: _Trainer, n_held: int) -> dict:
    return {"config": asdict(cfg), "aux_layers": aux_layers, "rounds": state["round"],
            "epochs_over_prompts": state["epoch"], "heldout_rollouts": n_held,
            "draft_vocab_sampled_coverage": state["sampled_coverage"],
            "train_steps": trainer.step, "train_tokens": trainer.tokens,
            "runs": state["runs"], "heldout_final": state["curve"][-1],
            "reference": state.get("reference"), "curve": state["curve"]}


def fmt_eval(ev: dict) -> str:
    r = lambda xs: "/".join(f"{x:.3f}" for x in xs)  # noqa: E731
    return (f"accept per position {r(ev['distribution'])} (distribution), "
            f"{r(ev['one_hot'])} (one-hot), ceiling {r(ev['one_hot_ceiling'])}; "
            f"length {ev['acceptance_length_distribution']:.2f} / "
            f"{ev['acceptance_length_one_hot']:.2f}")


def save_drafter(out: Path, net: Eagle3Net, vocab: torch.Tensor, aux_layers: list[int],
                 meta: dict | None = None, dtype: torch.dtype = torch.float32) -> None:
    """The on-disk form `Eagle3Speculator.load` reads: eagle3.safetensors + eagle3.json
    (weights in `dtype`: float16 halves the file, and the loader widens them again)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().to(dtype).contiguous() for k, v in net.state_dict().items()}
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
            float if name == "deadline" else int if name in ("num_prompts", "max_rounds") else str)
        ap.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    ap.add_argument("--aux-layers", type=int, nargs=3, default=None)
    args = vars(ap.parse_args(argv))
    cfg = Eagle3DistillConfig(**args)
    if not math.isfinite(cfg.time_budget) or cfg.time_budget <= 0:
        raise SystemExit(f"--time-budget must be a positive number of seconds, got {cfg.time_budget}")
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    try:
        (distil_resumable if cfg.work_dir else distil)(cfg, say=say)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eagle3_distill: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`atlas-rl train-speculator`: distil the static neural drafter offline.

The policy generates completions for broad prompts (temperature 1, vLLM); the drafter
learns from the hidden states the policy computed on the way (captured by atlas-rl's
proposer, so they are exactly what it will see when drafting) against the policy's own
next-token distributions. The draft vocabulary is the most frequent tokens of the
generations. The result is the speed floor of `atlas` and `atlas-static`: load it with
``AtlasConfig(static_speculator=DIR)``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class TrainSpeculatorConfig:
    model: str
    prompts: list[str]          # JSONL files (see workloads.load_prompt_file)
    out: str
    num_prompts: int = 256      # prompts drawn over all files, round-robin
    completions: int = 2        # completions per prompt
    max_tokens: int = 160
    batch_prompts: int = 32
    epochs: int = 8
    draft_vocab_size: int = 4096
    lr: float = 2e-3
    loss: str = "tv"            # AtlasConfig.drafter_loss: "tv" or "ce"
    holdout: float = 0.05
    seed: int = 0
    dtype: str | None = None
    max_model_len: int = 1024


def _draw_prompts(files: list[str], count: int, seed: int) -> list:
    import random

    from atlas_rl.workloads import builtin_prompts, load_prompt_file

    pools = [builtin_prompts(f, seed) if f.startswith("builtin:") else load_prompt_file(f)
             for f in files]
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    out, i = [], 0
    while len(out) < count and any(pools):
        pool = pools[i % len(pools)]
        if pool:
            out.append(pool.pop())
        i += 1
    return out


def train_static(cfg: TrainSpeculatorConfig, progress: bool = True) -> dict:
    from atlas_rl import AtlasConfig, AtlasRolloutEngine

    say = print if progress else (lambda *a, **k: None)
    prompts = _draw_prompts(cfg.prompts, cfg.num_prompts, cfg.seed)
    if not prompts:
        raise ValueError(f"no prompts in {cfg.prompts}")
    # Speculation off (batch cap 0) while the proposer still captures hidden states.
    engine = AtlasRolloutEngine(cfg.model, "atlas", AtlasConfig(
        max_speculation_batch_size=0, static_speculator="none", dtype=cfg.dtype,
        draft_vocab_size=cfg.draft_vocab_size, max_model_len=cfg.max_model_len, seed=cfg.seed))
    neural = engine.speculators["neural"]
    neural.distiller.buffer.max_rows = 10**9
    neural.distiller.lr = cfg.lr
    neural.distiller.loss = cfg.loss
    counts = torch.zeros(engine.vocab_size)
    say(f"budget: {len(prompts)} prompts x {cfg.completions} completions x <= {cfg.max_tokens} "
        f"tokens = up to {len(prompts) * cfg.completions * cfg.max_tokens:,} token-positions of "
        f"{cfg.model}'s own temperature-1 rollouts, then {cfg.epochs} epochs of distillation "
        f"({cfg.loss} loss; draft vocabulary: the {cfg.draft_vocab_size} most frequent tokens)", flush=True)
    start = time.perf_counter()
    rows = 0
    for i in range(0, len(prompts), cfg.batch_prompts):
        chunk = [p.prompt for p in prompts[i:i + cfg.batch_prompts]]
        batch = engine.generate(chunk, n=cfg.completions, max_tokens=cfg.max_tokens,
                                temperature=1.0, seed=cfg.seed + i)
        for c in batch:
            counts += torch.bincount(torch.tensor(c.prompt_ids + c.completion_ids, dtype=torch.long),
                                     minlength=engine.vocab_size)[: engine.vocab_size].float()
        rows += neural.collect()
        say(f"generate {min(i + cfg.batch_prompts, len(prompts))}/{len(prompts)} prompts: "
            f"{rows} training rows, {time.perf_counter() - start:.0f} s", flush=True)
    generate_seconds = time.perf_counter() - start
    neural.set_vocab_from_counts(counts)
    neural.vocab_source = "static"  # chosen on the broad prompts, for this model

    # Hold out the newest rows for evaluation.
    h, tok, target = neural.distiller.buffer.rows()
    n_eval = max(1, int(cfg.holdout * len(tok)))
    held = (h[-n_eval:].clone(), tok[-n_eval:].clone(), target[-n_eval:].clone())
    neural.distiller.buffer.clear()
    neural.distiller.buffer.add(h[:-n_eval], tok[:-n_eval], target[:-n_eval])
    before = neural.evaluate(*held)
    say(f"held-out before training: {before}", flush=True)
    start = time.perf_counter()
    history = []
    for epoch in range(cfg.epochs):
        stats = neural.train(max_epochs=1)
        ev = neural.evaluate(*held)
        history.append({"epoch": epoch + 1, "loss": stats.get("drafter_loss"), **ev})
        say(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats.get('drafter_loss', float('nan')):.3f}, "
            f"held-out acceptance {ev['accept_distribution']:.3f} (distribution draft), "
            f"{ev['accept_one_hot']:.3f} (one-hot), ceiling one-hot {ev['accept_ceiling_one_hot']:.3f}",
            flush=True)
    train_seconds = time.perf_counter() - start
    neural.distiller.reset()  # a fresh static drafter
    out = Path(cfg.out)
    neural.save(out)
    report = {"config": asdict(cfg), "training_rows": rows - n_eval, "heldout_rows": n_eval,
              "generate_seconds": generate_seconds, "train_seconds": train_seconds,
              "heldout_before": before, "history": history}
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    say(f"saved the static drafter to {out} (load it with AtlasConfig(static_speculator="
        f"{str(out)!r}))", flush=True)
    return report

"""`atlas-rl bench`: speculation methods side by side on an RL rollout workload that
drifts, in one process, interleaved per step, exactness checked, the one-hot oracle as
the ceiling.

A run is a sequence of RL steps. Each step:
1. draws the step's prompts from the current domain (the domain switches halfway with
   ``workload="drift"``);
2. for each regime, runs every method on the same prompts with the same seeds, in an
   order that rotates from step to step:
   - ``tail``: one prompt's group of at most 4 completions (the stretch where an RL
     step waits on its last running sequences; every step),
   - ``large_batch``: ``prompts_per_step x completions`` sequences (64 by default; on
     every other step, ``large_batch_steps``, as it costs 15-50 s per method here);
   adaptive speculators learn each batch they generate (``engine.update``) before the
   next one, as a trainer would;
3. checks exactness: greedy identity of every method with ``none`` on a probe prompt,
   and the PIT values / logprob errors of a sample of each method's tail completions
   against the policy as it was when they were sampled (pooled into one KS test per
   method at the end);
4. updates the policy: one on-policy GRPO step (group-normalised advantages from a
   verifiable reward, REINFORCE gradient, AdamW) with transformers on the CPU, on the
   ``none`` method's tail group, then pushes the new weights into every engine through
   ``sync_weights``, the path training uses. Every method sees the same weights.

Speedup is tokens/s over ``none``'s in the same step and regime; summaries are medians
over steps. Schema of the results: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

logger = logging.getLogger(__name__)

BENCH_METHODS = ("none", "vllm-ngram", "vllm-suffix", "atlas-static", "atlas")
# Methods the benchmark knows but this version cannot run yet, and why.
NOT_YET: dict[str, str] = {}
WORKLOADS = ("drift", "code", "math")
REGIMES = ("tail", "large_batch")
# What the exactness check tolerates, by the engines' dtype. float32 engines against the
# float32 policy (transformers): logprobs agree to ~5e-5 (measured); greedy outputs are
# identical. bfloat16 (8 mantissa bits) moves a token's logprob by up to ~0.4 (measured
# 0.30-0.42 on SmolLM2-135M), and greedy near-ties flip between batch shapes for every
# method, vLLM's own included: a greedy difference counts only where the float32 policy
# separates the two tokens by more than that tolerance.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}
SUMMARY_KEYS = ("tokens_per_s", "speedup", "acceptance_length", "acceptance_rate",
                "oracle_acceptance_length", "exact")


def available_methods() -> list[str]:
    """The methods this installation can run, in the benchmark's order."""
    out = []
    for m in BENCH_METHODS:
        if m in NOT_YET:
            continue
        if m == "vllm-suffix":
            try:
                import arctic_inference  # noqa: F401
            except ImportError:
                continue
        out.append(m)
    return out


@dataclass
class BenchConfig:
    model: str = "smollm2-135m-instruct"
    workload: str = "drift"
    prompt_files: list[str] = field(default_factory=list)
    steps: int = 8
    prompts_per_step: int = 16
    completions: int = 4
    max_tokens: int = 128
    large_batch_max_tokens: int = 48
    tail_sequences: int = 4
    large_batch_steps: list[int] | None = None  # None: every other step (2nd, 4th, ...)
    temperature: float = 1.0
    seed: int = 0
    methods: list[str] = field(default_factory=available_methods)
    lr: float = 1e-5
    check_sequences: int = 2
    probe_tokens: int = 32
    max_lookahead: int = 8
    # float32 on every CPU by default: exactness is judged there (see LOGPROB_TOLERANCE).
    dtype: str = "float32"
    quick: bool = False

    @classmethod
    def quick_preset(cls, **overrides) -> "BenchConfig":
        """Two steps (one per domain), short completions, one large batch: ~3 minutes."""
        base = dict(steps=2, max_tokens=32, large_batch_max_tokens=16, probe_tokens=16,
                    quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**base)
        if overrides.get("large_batch_steps") is None:
            cfg.large_batch_steps = [cfg.steps - 1]
        return cfg

    def __post_init__(self):
        if self.prompt_files and self.workload not in ("drift", "file"):
            raise ValueError(f"--prompts gives the prompts; workload {self.workload!r} "
                             f"cannot be combined with it (use --workload drift with two "
                             f"--prompts files to switch between them)")
        if self.prompt_files:
            if len(self.prompt_files) > 2:
                raise ValueError(f"--prompts takes one file, or two to drift from the first "
                                 f"to the second; got {len(self.prompt_files)}")
            self.workload = "drift" if len(self.prompt_files) == 2 else "file"
        elif self.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}: choose one of "
                             f"{', '.join(WORKLOADS)}, or give --prompts FILE.jsonl")
        for name in ("steps", "prompts_per_step", "completions", "max_tokens",
                     "large_batch_max_tokens", "tail_sequences", "probe_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workload == "drift" and self.steps < 2:
            raise ValueError(f"a drift workload needs steps >= 2 (one per domain), got "
                             f"{self.steps}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.dtype not in LOGPROB_TOLERANCE:
            raise ValueError(f"dtype {self.dtype!r} is not one the benchmark can judge "
                             f"exactness in: choose one of {', '.join(LOGPROB_TOLERANCE)}")
        self.methods = list(dict.fromkeys(self.methods))
        for m in self.methods:
            if m in NOT_YET:
                raise ValueError(f"method {m!r} is not available yet: {NOT_YET[m]}. "
                                 f"Available: {', '.join(available_methods())}")
            if m not in BENCH_METHODS:
                raise ValueError(f"unknown method {m!r}: choose from "
                                 f"{', '.join(available_methods())}")
        if "none" not in self.methods:
            self.methods.insert(0, "none")  # the baseline every speedup divides by
        if self.large_batch_steps is not None:
            bad = [s for s in self.large_batch_steps if not 0 <= s < self.steps]
            if bad:
                raise ValueError(f"large_batch_steps {bad} are outside the run's steps "
                                 f"0..{self.steps - 1}")

    @property
    def drift_step(self) -> int | None:
        """First step of the second domain (None without drift)."""
        return self.steps // 2 if self.workload == "drift" else None

    def domain_phase(self, step: int) -> int:
        d = self.drift_step
        return 0 if d is None or step < d else 1

    def resolved_large_batch_steps(self) -> list[int]:
        if self.large_batch_steps is not None:
            return sorted(set(self.large_batch_steps))
        return list(range(1, self.steps, 2)) or [self.steps - 1]


# --- workload --------------------------------------------------------------------

def _domain_pools(cfg: BenchConfig) -> list[tuple[str, list]]:
    """One (domain, prompts) per phase; prompts are workloads.Prompt objects."""
    from atlas_rl import workloads

    per_phase = cfg.steps * (cfg.prompts_per_step + 2)
    if cfg.prompt_files:
        pools = []
        for path in cfg.prompt_files:
            prompts = workloads.load_prompt_file(path)
            random.Random(cfg.seed).shuffle(prompts)
            pools.append((prompts[0].domain, prompts))
        return pools
    makers = {"code": workloads.code_prompts, "math": workloads.math_prompts}
    names = ("code", "math") if cfg.workload == "drift" else (cfg.workload,)
    return [(name, makers[name](per_phase, seed=cfg.seed)) for name in names]


def _step_prompts(pool: list, step: int, count: int) -> list:
    start = step * count
    return [pool[(start + i) % len(pool)] for i in range(count)]


def _as_engine_prompt(prompt, has_chat_template: bool, warned: list):
    """Chat messages become plain text for a model without a chat template."""
    if isinstance(prompt, str) or has_chat_template:
        return prompt
    if not warned:
        warned.append(True)
        logger.warning("the model's tokenizer has no chat template: chat prompts are "
                       "given as plain text (message contents joined)")
    return "\n\n".join(m["content"] for m in prompt) + "\n"


# --- the policy that drifts --------------------------------------------------------

class PolicyUpdater:
    """The policy as the trainer holds it (transformers, float32, CPU) and one
    on-policy GRPO step per benchmark step. On-policy the clipped ratio is 1, so the
    step is REINFORCE with group-normalised advantages; the loss is normalised by the
    group's token count. No KL term: drift is the point."""

    def __init__(self, model_path: str, lr: float, seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval()  # no dropout in these models; eval keeps the check's forward exact
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self._initial = [p.detach().clone() for p in self.params]
        self.updates = 0

    def step(self, completions, rewards: Sequence[float], temperature: float) -> dict:
        import torch

        r = torch.tensor(list(rewards), dtype=torch.float32)
        adv = (r - r.mean()) / (r.std() + 1e-4) if len(r) > 1 else torch.zeros_like(r)
        num_tokens = sum(len(c.completion_ids) for c in completions)
        if num_tokens == 0 or not bool((adv.abs() > 1e-6).any()):
            return {"loss": 0.0, "grad_norm": 0.0, "updated": False}
        loss_total = 0.0
        for c, a in zip(completions, adv.tolist()):
            if abs(a) <= 1e-6 or not c.completion_ids:
                continue
            ids = torch.tensor([list(c.prompt_ids) + list(c.completion_ids)])
            logits = self.model(ids).logits[0, len(c.prompt_ids) - 1: -1]
            if temperature > 0:
                logits = logits / temperature
            logp = torch.log_softmax(logits.float(), dim=-1)
            token_logp = logp.gather(1, torch.tensor(c.completion_ids)[:, None])[:, 0]
            loss = -(a * token_logp.sum()) / num_tokens
            loss.backward()
            loss_total += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return {"loss": loss_total, "grad_norm": grad_norm, "updated": True}

    def param_delta_norm(self) -> float:
        import torch

        with torch.no_grad():
            return float(torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in
                                        zip(self.params, self._initial))))


# --- summaries -----------------------------------------------------------------

def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _step_record(stats: dict, max_lookahead: int) -> dict:
    pos = [stats.get(f"acceptance_rate_pos_{i}") for i in range(max_lookahead)]
    while pos and pos[-1] is None:
        pos.pop()
    keep = ("tokens_per_s", "rollout_seconds", "num_tokens", "num_completions",
            "acceptance_length", "acceptance_rate", "lookahead", "oracle_acceptance_length",
            "num_drafts", "num_draft_tokens", "num_accepted_tokens", "engine_steps",
            "forward_seconds", "sample_seconds", "propose_seconds", "draft_seconds")
    rec = {k: stats[k] for k in keep if k in stats}
    # atlas: which arm drafted (share of drafts) and how well it did
    rec.update({k: v for k, v in stats.items()
                if k.startswith("drafts_") or k.startswith("acceptance_length_")})
    rec["acceptance_rate_pos"] = pos
    return rec


def summarize_regime(records: list[dict], exact: bool) -> dict:
    """Medians over a regime's steps (speedup: the median of per-step ratios)."""
    out = {k: _median([r.get(k) for r in records]) for k in
           ("tokens_per_s", "speedup", "acceptance_length", "acceptance_rate",
            "oracle_acceptance_length", "lookahead")}
    out["exact"] = exact
    out["steps"] = len(records)
    if not exact:
        out["speedup"] = None
    return out


def format_table(results: dict) -> str:
    lines = ["| method | regime | tokens/s | speedup | acceptance length | acceptance rate "
             "| lookahead | oracle (one-hot ceiling) | exact |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    for name, m in results["methods"].items():
        for regime in REGIMES:
            s = m["regimes"].get(regime)
            if not s or not s.get("steps"):
                continue
            rate = "-" if name == "none" else f(s["acceptance_rate"])
            lines.append(
                f"| {name} | {regime} | {f(s['tokens_per_s'], '.1f')} | "
                f"{f(s['speedup'])}{'x' if s['speedup'] is not None else ''} | "
                f"{f(s['acceptance_length'])} | {rate} | {f(s['lookahead'])} | "
                f"{f(s['oracle_acceptance_length'])} | {'yes' if s['exact'] else 'NO'} |")
    return "\n".join(lines)


def format_time_table(results: dict, regime: str = "tail") -> str:
    """Where the time of a regime's rollouts goes, per engine step, per method."""
    lines = [f"| method ({regime}) | engine steps | tokens/step | forward ms/step | sampling, "
             f"rejection (vllm-*: + their drafting) ms/step | atlas proposer bookkeeping "
             f"ms/step | atlas drafting ms/step | other vLLM ms/step | speculator update "
             f"ms/batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        recs = [row["regimes"][regime] for row in m["steps"] if regime in row["regimes"]]
        if not recs:
            continue
        tot = {k: sum(r.get(k, 0.0) or 0.0 for r in recs) for k in
               ("rollout_seconds", "forward_seconds", "sample_seconds", "propose_seconds",
                "draft_seconds", "update_seconds", "engine_steps", "num_tokens")}
        n = max(tot["engine_steps"], 1)
        ms = lambda x, n=n: f"{1000 * x / n:.1f}"  # noqa: E731
        other = tot["rollout_seconds"] - tot["forward_seconds"] - tot["sample_seconds"]
        lines.append(
            f"| {name} | {int(tot['engine_steps'])} | {tot['num_tokens'] / n:.2f} | "
            f"{ms(tot['forward_seconds'])} | "
            f"{ms(tot['sample_seconds'] - tot['propose_seconds'])} | "
            f"{ms(tot['propose_seconds'] - tot['draft_seconds'])} | {ms(tot['draft_seconds'])} | "
            f"{ms(other)} | {1000 * tot['update_seconds'] / len(recs):.1f} |")
    return "\n".join(lines)


# --- the run -------------------------------------------------------------------

class _Progress:
    """A rich progress line on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, enabled: bool = True):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self.console = Console(stderr=True)
        self.progress = None
        if enabled:
            self.progress = Progress(TextColumn("[bold]atlas-rl bench[/]"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.description}"),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task("starting", total=total)
            self.progress.start()

    def log(self, msg: str) -> None:
        self.console.print(f"[atlas-rl bench] {msg}", highlight=False, markup=False,
                           soft_wrap=True)

    def advance(self, description: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def run_bench(cfg: BenchConfig, out: str | None = None, plot: str | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns the results dict (and writes `out` / `plot`)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import torch

    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.machine import machine_info
    from atlas_rl.exactness import greedy_divergence_margin, sampling_check, sampling_values
    from atlas_rl.models import resolve_model
    from atlas_rl.rewards import rollout_reward

    t_start = time.perf_counter()
    lb_steps = cfg.resolved_large_batch_steps()
    methods = cfg.methods
    units = len(methods) + cfg.steps * (len(methods) * 2 + 1) + len(lb_steps) * len(methods)
    bar = _Progress(units, enabled=progress)
    say = log or bar.log
    unavailable = {m: NOT_YET.get(m, "not installed (pip install arctic-inference)")
                   for m in BENCH_METHODS if m not in available_methods()}
    say(f"methods: {', '.join(methods)}"
        + (f"  (not run: {', '.join(unavailable)})" if unavailable else ""))

    try:
        path = resolve_model(cfg.model)
        pools = _domain_pools(cfg)
        engine_config = AtlasConfig(max_lookahead=cfg.max_lookahead, dtype=cfg.dtype,
                                    seed=cfg.seed)
        engines = {}
        for m in methods:
            bar.advance(f"building engine {m}")
            say(f"building the vLLM engine, speculation={m!r} ...")
            engines[m] = AtlasRolloutEngine(path, speculation=m, config=engine_config)
            engines[m].generate(["Warm-up."], n=2, max_tokens=8, seed=0)
        any_engine = engines["none"]
        dtype = str(any_engine.llm.llm_engine.model_config.dtype).replace("torch.", "")
        chat = bool(getattr(any_engine.tokenizer, "chat_template", None))
        warned: list = []
        say("loading the policy for updates and reference logprobs (transformers, float32)")
        policy = PolicyUpdater(path, cfg.lr, cfg.seed)

        regime_records = {m: {r: [] for r in REGIMES} for m in methods}
        pit = {m: ([], []) for m in methods}
        greedy_fail = {m: [] for m in methods}
        greedy_ties = {m: [] for m in methods}
        tol = LOGPROB_TOLERANCE[dtype]
        updates = []
        totals = {m: {"rollout_seconds": 0.0, "forward_seconds": 0.0, "sample_seconds": 0.0,
                      "propose_seconds": 0.0, "draft_seconds": 0.0, "update_seconds": 0.0,
                      "engine_steps": 0, "num_tokens": 0} for m in methods}
        check_gen = torch.Generator().manual_seed(cfg.seed)

        for step in range(cfg.steps):
            phase = cfg.domain_phase(step)
            domain, pool = pools[min(phase, len(pools) - 1)]
            local_step = step - (cfg.drift_step or 0) if phase else step
            drawn = _step_prompts(pool, local_step, cfg.prompts_per_step + 2)
            tail_p, large_p, probe_p = drawn[0], drawn[1:-1], drawn[-1]
            as_prompt = lambda p: _as_engine_prompt(p.prompt, chat, warned)  # noqa: E731
            k = len(methods)
            order = [methods[(i + step) % k] for i in range(k)]
            jobs = [("tail", [tail_p], min(cfg.completions, cfg.tail_sequences), cfg.max_tokens)]
            if step in lb_steps:
                jobs.append(("large_batch", large_p, cfg.completions, cfg.large_batch_max_tokens))
            step_seed = cfg.seed * 1_000_003 + step * 101
            tail_batches = {}
            for j, (regime, prompts, n, max_tokens) in enumerate(jobs):
                results_here = {}
                for m in order:
                    eng = engines[m]
                    batch = eng.generate([as_prompt(p) for p in prompts], n=n,
                                         temperature=cfg.temperature, max_tokens=max_tokens,
                                         seed=step_seed + j)
                    upd = eng.update(batch)
                    s = batch.stats
                    rec = _step_record(s, cfg.max_lookahead)
                    rec["update_seconds"] = upd.get("update_seconds", 0.0)
                    for key in ("drafter_loss", "drafter_train_seconds", "update_budget_seconds",
                                "drafter_rollback", "drafter_version", "index_tokens"):
                        if key in upd:
                            rec[key] = upd[key]
                    results_here[m] = rec
                    for key in totals[m]:
                        totals[m][key] += rec.get(key, 0) or 0
                    if regime == "tail":
                        tail_batches[m] = batch
                    bar.advance(f"step {step + 1}/{cfg.steps} {regime} {m}")
                base_tps = results_here["none"]["tokens_per_s"]
                for m, rec in results_here.items():
                    rec["speedup"] = rec["tokens_per_s"] / base_tps if base_tps else None
                    rec.update(step=step, domain=domain)
                    regime_records[m][regime].append(rec)
                say(f"step {step + 1}/{cfg.steps} [{domain}] {regime:<11} " + "  ".join(
                    f"{m} {r['tokens_per_s']:.0f} tok/s AL {r['acceptance_length']:.2f}"
                    for m, r in results_here.items()))

            # exactness: the sampled tokens against the policy that sampled them
            if cfg.temperature > 0:
                for m in methods:
                    comps = tail_batches[m].completions[: cfg.check_sequences]
                    u, err = sampling_values(policy.model, comps, cfg.temperature, check_gen)
                    pit[m][0].append(u)
                    pit[m][1].append(err)
            probe = {m: engines[m].generate([as_prompt(probe_p)], temperature=0.0,
                                            max_tokens=cfg.probe_tokens)
                     for m in order}
            for m in methods:
                ref, got = probe["none"].completions[0], probe[m].completions[0]
                div = greedy_divergence_margin(policy.model, ref.prompt_ids,
                                               ref.completion_ids, got.completion_ids)
                if div is not None:
                    at = {"step": step, "position": div[0], "margin": div[1]}
                    # float32: any difference fails; lower precisions: a near-tie is not one
                    if dtype != "float32" and div[1] <= tol:
                        greedy_ties[m].append(at)
                    else:
                        greedy_fail[m].append(step)
                bar.advance(f"step {step + 1}/{cfg.steps} exactness {m}")

            # the policy moves: a GRPO step on none's tail group, synced everywhere
            group = tail_batches["none"].completions
            code = tail_p.prompt if tail_p.domain == "code" and isinstance(tail_p.prompt, str) \
                else None
            rewards = [rollout_reward(c.text, tail_p.answer, len(c.completion_ids),
                                      cfg.max_tokens, c.finish_reason == "stop", code)
                       for c in group]
            t0 = time.perf_counter()
            info = policy.step(group, rewards, cfg.temperature or 1.0)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for eng in engines.values():
                eng.sync_weights(policy.model)
            sync_s = time.perf_counter() - t0
            updates.append({"step": step, "reward": statistics.fmean(rewards), **info,
                            "train_seconds": train_s, "sync_seconds": sync_s})
            bar.advance(f"step {step + 1}/{cfg.steps} policy update")
            say(f"step {step + 1}/{cfg.steps} policy update: reward {statistics.fmean(rewards):.3f}"
                f" grad norm {info['grad_norm']:.3f}, train {train_s:.1f} s, sync {sync_s:.1f} s")

        # --- results ---------------------------------------------------------------
        methods_out = {}
        for m in methods:
            exactness = {"greedy_mismatch_steps": greedy_fail[m],
                         "greedy_near_ties": greedy_ties[m], "judged_in": dtype}
            if cfg.temperature > 0:
                check = sampling_check(torch.cat(pit[m][0]), torch.cat(pit[m][1]))
                exactness.update(check.as_dict(), logprob_tolerance=tol,
                                 distribution_ok=check.passed(1e-3, tol))
            else:
                exactness["distribution_ok"] = True  # greedy: identity is the whole check
            exact = not greedy_fail[m] and exactness["distribution_ok"]
            exactness["exact"] = exact
            regimes = {r: summarize_regime(regime_records[m][r], exact)
                       for r in REGIMES if regime_records[m][r]}
            tail = regime_records[m]["tail"]
            summary = {k: regimes["tail"][k] for k in SUMMARY_KEYS}
            d = cfg.drift_step
            if d is not None:
                summary["acceptance_length_pre_drift"] = _median(
                    [r["acceptance_length"] for r in tail if r["step"] < d])
                summary["acceptance_length_post_drift"] = _median(
                    [r["acceptance_length"] for r in tail if r["step"] >= d])
            if m == "none":
                summary["speedup"] = 1.0
            by_step = {r: {x["step"]: x for x in regime_records[m][r]} for r in REGIMES}
            step_rows = []
            for rec in tail:
                row = {k: rec.get(k) for k in ("step", "domain", "tokens_per_s", "speedup",
                                               "acceptance_length", "acceptance_rate",
                                               "lookahead", "oracle_acceptance_length",
                                               "rollout_seconds", "acceptance_rate_pos",
                                               "update_seconds", "drafter_loss",
                                               "drafter_train_seconds", "update_budget_seconds")}
                row.update({k: v for k, v in rec.items()
                            if k.startswith("drafts_") or k.startswith("acceptance_length_")})
                if not exact:
                    row["speedup"] = None
                row["regimes"] = {r: by_step[r][rec["step"]] for r in REGIMES
                                  if rec["step"] in by_step[r]}
                if not exact:
                    for x in row["regimes"].values():
                        x["speedup"] = None
                step_rows.append(row)
            methods_out[m] = {"summary": summary, "regimes": regimes, "steps": step_rows,
                              "exactness": exactness, "time": totals[m]}

        results = {
            "machine": machine_info(dtype),
            "config": {**asdict(cfg), "large_batch_steps": lb_steps,
                       "drift_step": cfg.drift_step,
                       "domains": [name for name, _ in pools],
                       "engine": engine_config.to_dict(),
                       "not_run": unavailable},
            "policy": {"updates": policy.updates, "param_delta_norm": policy.param_delta_norm(),
                       "steps": updates},
            "methods": methods_out,
            "total_seconds": time.perf_counter() - t_start,
        }
    finally:
        bar.close()

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    if plot:
        from atlas_rl.plots import plot_bench

        plot_bench(results, plot)
    return results


def _bf16_units(mach: dict) -> str:
    units = mach.get("cpu_bf16_units")  # absent from results written before it was recorded
    return "bf16 units not recorded" if units is None else \
        ("with bf16 units" if units else "without bf16 units")


def headline(results: dict) -> str:
    """The lines printed above the table: what ran, where."""
    c, mach = results["config"], results["machine"]
    drift = (f"drift {c['domains'][0]} -> {c['domains'][1]} at step {c['drift_step'] + 1}"
             if c.get("drift_step") is not None else f"domain {c['domains'][0]}")
    return (f"atlas-rl bench: {c['model']}, temperature {c['temperature']}, {c['steps']} steps "
            f"({drift}), tail = 1 prompt x {min(c['completions'], c['tail_sequences'])}, "
            f"large batch = {c['prompts_per_step']} x {c['completions']} on steps "
            f"{', '.join(str(s + 1) for s in c['large_batch_steps'])}, "
            f"{c['max_tokens']}/{c['large_batch_max_tokens']} tokens max (tail/large), "
            f"medians over steps\n"
            f"machine: {mach['cpu']} ({_bf16_units(mach)}), {mach['cores']} cores, GPU: "
            f"{mach['gpu'] or 'none'}; torch {mach['torch']}, vLLM {mach['vllm']}, dtype "
            f"{mach['dtype']} (exactness judged in it); "
            f"{results['total_seconds'] / 60:.1f} min")

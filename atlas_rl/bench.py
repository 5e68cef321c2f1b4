"""`atlas-rl bench`: speculation methods side by side on an RL rollout workload that
drifts, in one process, interleaved per step, exactness checked, the one-hot oracle as
the ceiling.

A run is a sequence of RL steps. Each step:
1. draws the step's prompts from the current domain (the domain switches halfway with
   ``workload="drift"``, from math to JavaScript, a language the bundled static drafters
   never saw; with ``workload="epochs"`` the same prompts come back every
   ``epoch_steps`` steps);
2. for each regime, runs every method on the same prompts with the same seeds, in an
   order that rotates from step to step (the large batches' from one large batch to the
   next):
   - ``tail``: one prompt's group of at most 4 completions (the stretch where an RL
     step waits on its last running sequences; every step), generated to a fixed length
     (EOS ignored), so that every method does the same work at the same batch size: the
     figure of record,
   - ``tail_rl``: the same group sampled as an RL step samples it (each completion stops
     at its EOS: methods end up with different lengths, so its ratios are noisier),
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
   Before it, the drift so far: KL(pi_step || pi_0) per token on that group, next to
   atlas-static's acceptance length at the step (``results["drift"]``).

Speedup is tokens/s over ``none``'s in the same step and regime; a regime's speedup is
the pooled one (all its steps' tokens over all their seconds, against ``none``'s), with a
90% interval from a bootstrap over steps (`speedup_interval`); the other summaries are
medians over steps. Each record also carries the policy's per-token entropy estimated from
the sampled tokens (mean of -log p). Schema of the results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import logging
import math
import os
import random
import statistics
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from atlas_rl.config import AtlasConfig
from atlas_rl.machine import release_freed_memory
from atlas_rl.metrics import (
    BENCH_RECORD_KEYS,
    BENCH_REGIME_KEYS,
    BENCH_STATIC_METHOD,
    BENCH_STEP_KEYS,
    BENCH_SUMMARY_KEYS,
    BENCH_TIME_KEYS,
    BENCH_UPDATE_KEYS,
    PARAM_DELTA_NORM,
    POLICY_KL,
    POS_PREFIX,
    STATIC_ACCEPTANCE_LENGTH,
    arm_metrics,
    fmt,
    median,
)
from atlas_rl.metrics import tokens_per_request_step as _tokens_per_request_step

logger = logging.getLogger(__name__)

BENCH_METHODS = ("none", "vllm-ngram", "vllm-suffix", "atlas-static", "atlas", "domain-oracle")
#: run only when asked for (or by the domain-gap workload): it distils a drafter first
ON_REQUEST_METHODS = ("domain-oracle",)
WORKLOADS = ("drift", "code", "math", "javascript", "epochs", "domain-gap")
#: the default drift: from a domain the bundled static drafters were distilled on (GSM8K-
#: style arithmetic) to one they never saw (JavaScript)
DRIFT_DOMAINS = ("math", "javascript")
#: the domain-gap workload's default domains: two the bundled drafters were never distilled
#: on (the MLP one saw GSM8K and HumanEval, the EAGLE-3 one also eight other programming
#: languages and English instructions), each for half the steps
DOMAIN_GAP_DOMAINS = ("javascript", "code-php")
#: ``tail``: the figure of record, fixed length (EOS ignored: every method generates the
#: same tokens at the same batch size); ``tail_rl``: the same group as an RL step samples
#: it (stops at EOS; what the checks and the policy update use); ``large_batch``.
REGIMES = ("tail", "tail_rl", "large_batch")
#: The speedup's interval: a bootstrap over steps, this two-sided level.
INTERVAL_LEVEL = 0.90
BOOTSTRAP_SAMPLES = 2000
# What the exactness check tolerates, by the engines' dtype. float32 engines against the
# float32 policy (transformers): logprobs agree to ~5e-5 (measured); greedy outputs are
# identical. bfloat16 (8 mantissa bits) moves a token's logprob by ~0.06 on average and up
# to ~0.4 for 99 tokens in 100 (measured 0.30-0.42 on SmolLM2-135M), but the odd token
# deep in the tail of its distribution by nats, in every method alike, vLLM's own included
# (one token 3.0 nats off in all five methods of one run: docs/bench/tail-fixed-bf16-*):
# in bfloat16 the 99th percentile of the errors is judged, not the largest. Greedy
# near-ties flip between batch shapes for every method in bfloat16: a greedy difference
# counts only where the float32 policy separates the two tokens by more than the tolerance.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5}
LOGPROB_STATISTIC = {"float32": "max", "bfloat16": "p99"}
# And where bfloat16 itself takes more than that from every token (a policy GRPO moved
# to low entropy: p99 4.2 nats for `none` itself; code: 0.66), a method passes whose
# errors are no more than this many times none's (the same engine and dtype, no
# speculation), at the mean and the 99th percentile (measured: 0.92-1.11x none's).
LOGPROB_RELATIVE_SLACK = 1.5
# What --quick changes: two steps (one per domain; with epochs, the second revisits the
# first's prompts), short completions (and one large batch, on the last step:
# `BenchConfig.quick_preset`).
QUICK_PRESET = {"steps": 2, "max_tokens": 32, "large_batch_max_tokens": 16, "probe_tokens": 16,
                "epoch_steps": 1}


def available_methods() -> list[str]:
    """The methods this installation can run, in the benchmark's order."""
    out = []
    for m in BENCH_METHODS:
        if m in ON_REQUEST_METHODS:
            continue
        if m == "vllm-suffix":
            try:
                import arctic_inference  # noqa: F401
            except ImportError:
                continue
        out.append(m)
    return out


def _comma_list(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _one_based_steps(text: str) -> list[int]:
    """"2,4" (the CLI's 1-based step numbers) -> [1, 3]."""
    try:
        return [int(s) - 1 for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected step numbers separated by commas (1-based), got {text!r}") from None


@dataclass
class BenchConfig:
    """What `atlas-rl bench` runs. A field's metadata makes its CLI flag
    (`add_arguments`): ``help``, and where the default does not do, ``flag``, ``type``,
    ``choices``, ``metavar`` or ``action``; ``cli: False`` gives it none."""

    model: str = field(default="smollm2-135m-instruct", metadata={
        "help": "known short name or a local HF folder"})
    workload: str | None = field(default=None, metadata={
        "help": "drift (default): math prompts, then JavaScript prompts from halfway (a "
                "language the bundled static drafters never saw); code (Python), math or "
                "javascript: one domain; epochs: a fixed set of code and math prompts (or one "
                "--prompts file) revisited every --epoch-steps steps, so earlier "
                "completions of the same prompt can draft (history drafting); domain-gap: "
                "--domains (default javascript, code-php: none of them in any bundled "
                "drafter's data), an equal share of the steps each, prompts coming back in "
                "epochs, with the domain-oracle method beside atlas-static and atlas",
        "choices": WORKLOADS})
    domains: list[str] | None = field(default=None, metadata={
        "help": "--workload domain-gap: its domains in order, from code, javascript, math, "
                "instructions and code-LANGUAGE (a chat request for a function in that "
                "language, e.g. code-php, code-lua) (default javascript,code-php)",
        "type": _comma_list, "metavar": "D1,D2"})
    prompt_files: list[str] = field(default_factory=list, metadata={
        "help": "prompts from a JSONL file (.gz ok; a 'prompt', 'question' or 'messages' "
                "field per line, optional 'answer'); give it twice to drift from the first "
                "set to the second", "flag": "--prompts", "action": "append",
        "metavar": "FILE.jsonl"})
    steps: int = field(default=8, metadata={"help": "RL steps"})
    epoch_steps: int | None = field(default=None, metadata={
        "help": "--workload epochs and domain-gap: steps per epoch; step s's prompts (tail, "
                "large batch and probe) come back at steps s + epoch_steps, s + 2 "
                "epoch_steps, ... (within a domain) (default: 2 with epochs; half a domain's "
                "steps with domain-gap, so each of its prompts comes back once)",
        "type": int})
    oracle_prompts: int = field(default=128, metadata={
        "help": "the domain-oracle method's budget: it is the static drafter's architecture "
                "distilled (atlas-rl train-speculator, before the run, cached) on this many "
                "of each domain's prompts that the run does not draw, x --oracle-completions, "
                "<= 160 tokens, 8 epochs; its domains only"})
    oracle_completions: int = field(default=2, metadata={
        "help": "completions per prompt of the domain oracle's rollouts"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts in the large batch"})
    completions: int = field(default=4, metadata={
        "help": "completions per prompt, a GRPO group"})
    max_tokens: int = field(default=128, metadata={
        "help": "tokens per tail completion (the fixed-length tail: exactly this many; the "
                "RL tail: at most)"})
    large_batch_max_tokens: int = field(default=48, metadata={
        "help": "max tokens per large-batch completion"})
    tail_sequences: int = field(default=4, metadata={
        "help": "completions of the tail group (at most `completions`)", "cli": False})
    large_batch_steps: list[int] | None = field(default=None, metadata={
        "help": "1-based steps that also run the large batch (default: every other step, "
                "2, 4, ...; quick: the last step)", "type": _one_based_steps,
        "metavar": "S1,S2"})  # here 0-based; None: every other step (2nd, 4th, ...)
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature of the rollouts"})
    seed: int = field(default=0, metadata={
        "help": "seed of the prompts, the sampling, the policy and the checks"})
    methods: list[str] = field(default_factory=available_methods, metadata={
        "help": f"comma-separated, from: {', '.join(BENCH_METHODS)} (default: all "
                f"installed but domain-oracle, which distils a drafter first and runs by "
                f"default with --workload domain-gap; 'none' always runs)",
        "type": _comma_list, "metavar": "M1,M2"})
    lr: float = field(default=1e-4, metadata={
        "help": "policy learning rate of the GRPO updates (1e-4: KL from the initial "
                "policy ~0.01-0.1 nats/token per step, the range of a GRPO run with a KL "
                "penalty; 3e-4 drifts ~10x further, shortens completions and costs the "
                "frozen drafter a fifth of its acceptance length; docs/bench/history.md)"})
    policy_lora_rank: int = field(default=0, metadata={
        "help": "0: the policy's GRPO updates train every weight (AdamW, float32: 16 bytes a "
                "parameter plus a copy of the initial weights; ~5 GB for a 270M model with a "
                "262k vocabulary); R > 0: a LoRA adapter of rank R on every linear layer, the "
                "base frozen (PEFT; about 1.1 GB at 270M), as GRPO runs of larger models "
                "train; its lr wants 5-10x the full one"})
    length_reward: float = field(default=0.2, metadata={
        "help": "weight of the reward's brevity term (atlas_rl.rewards.length_reward) in "
                "the GRPO updates; 0 takes it out"})
    check_sequences: int = field(default=2, metadata={
        "help": "tail completions per method and step checked against the policy",
        "cli": False})
    probe_tokens: int = field(default=32, metadata={
        "help": "tokens of the greedy probe that checks greedy identity", "cli": False})
    max_lookahead: int = field(default=8, metadata={"help": "draft tokens"})
    drafter: str = field(default="auto", metadata={
        "help": "the atlas methods' neural drafter (AtlasConfig.drafter): auto (the bundled "
                "MLP one), eagle3 (the bundled EAGLE-3 one) or mlp"})
    atlas_settings: list = field(default_factory=list, metadata={
        "help": "any other AtlasConfig field for every engine, FIELD=VALUE (repeatable; "
                "VALUE as JSON or a bare string), e.g. --set drafter_publish_gate=false",
        "flag": "--set", "action": "append", "metavar": "FIELD=VALUE"})
    dtype: str = field(default="float32", metadata={
        "help": "every engine's dtype: float32 (the default on every CPU: exactness is "
                "judged to 1e-3 in logprobs), bfloat16 (99 logprobs in 100 within 0.5 of the "
                "float32 policy, greedy identity up to near-ties) or auto (what AtlasRolloutEngine "
                "runs by default: bfloat16, float32 on CPUs without bf16 units)",
        "choices": ("auto", *LOGPROB_TOLERANCE)})
    quick: bool = field(default=False, metadata={
        "help": "2 steps, short completions, one large batch (~3 min here)"})

    @classmethod
    def quick_preset(cls, **overrides) -> BenchConfig:
        """Two steps (one per domain), short completions, one large batch: ~3 minutes."""
        base = {**QUICK_PRESET, "quick": True}
        base.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**base)
        if overrides.get("large_batch_steps") is None:
            cfg.large_batch_steps = [cfg.steps - 1]
        return cfg

    @classmethod
    def cli_fields(cls) -> list:
        """The fields that have a CLI flag."""
        return [f for f in fields(cls) if f.metadata.get("cli", True)]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """A flag per CLI field: ``--field-name`` (or its ``flag``) with the field's help
        (plus its default and --quick's, where the help does not say them). A flag not
        given is None, so that the config's default (or the quick preset's) stands."""
        hints = typing.get_type_hints(cls)
        for f in cls.cli_fields():
            kwargs = {k: v for k, v in f.metadata.items() if k not in ("flag", "cli")}
            kind = hints[f.name]
            if kind is bool:
                kwargs["action"] = "store_true"
            elif kind in (int, float):
                kwargs.setdefault("type", kind)
            if kind is not bool and "default" not in kwargs["help"] and \
                    f.default not in (MISSING, None):
                quick = f"; quick {QUICK_PRESET[f.name]}" if f.name in QUICK_PRESET else ""
                kwargs["help"] += f" (default {f.default}{quick})"
            parser.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")),
                                dest=f.name, **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """The config that the flags of `add_arguments` describe."""
        given = {f.name: getattr(args, f.name) for f in cls.cli_fields()}
        if given.pop("quick"):
            return cls.quick_preset(**given)
        return cls(**{k: v for k, v in given.items() if v is not None})

    def __post_init__(self):
        self._resolve_workload()
        self._resolve_domains()
        for name in ("steps", "prompts_per_step", "completions", "max_tokens",
                     "large_batch_max_tokens", "tail_sequences", "probe_tokens",
                     "epoch_steps", "oracle_prompts", "oracle_completions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workload == "drift" and self.steps < 2:
            raise ValueError(f"a drift workload needs steps >= 2 (one per domain), got "
                             f"{self.steps}")
        if self.workload == "domain-gap" and self.steps < len(self.domains):
            raise ValueError(f"a domain-gap workload needs steps >= its {len(self.domains)} "
                             f"domains (a share each), got {self.steps}: raise --steps or "
                             f"give fewer --domains")
        if self.workload == "epochs" and self.steps <= self.epoch_steps:
            raise ValueError(f"an epochs workload needs steps > epoch_steps (else no prompt "
                             f"comes back), got steps {self.steps}, epoch_steps "
                             f"{self.epoch_steps}: lower --epoch-steps or raise --steps")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.atlas_settings:  # a bad --set fails here, before any engine is built
            engine_config(self, 1.0)
        if self.policy_lora_rank < 0:
            raise ValueError(f"policy_lora_rank must be 0 (train every weight) or a LoRA "
                             f"rank >= 1, got {self.policy_lora_rank}")
        if self.dtype != "auto" and self.dtype not in LOGPROB_TOLERANCE:
            raise ValueError(f"dtype {self.dtype!r} is not one the benchmark can judge "
                             f"exactness in: choose auto or one of "
                             f"{', '.join(LOGPROB_TOLERANCE)}")
        self.methods = list(dict.fromkeys(self.methods))
        for m in self.methods:
            if m not in BENCH_METHODS:
                raise ValueError(f"unknown method {m!r}: choose from "
                                 f"{', '.join(available_methods())}")
        if "none" not in self.methods:
            self.methods.insert(0, "none")  # the baseline every speedup divides by
        if self.workload == "domain-gap" and "domain-oracle" not in self.methods:
            self.methods.append("domain-oracle")  # the ceiling adaptation aims for
        if self.large_batch_steps is not None:
            bad = [s for s in self.large_batch_steps if not 0 <= s < self.steps]
            if bad:
                raise ValueError(f"large_batch_steps {bad} are outside the run's steps "
                                 f"0..{self.steps - 1}")

    def _resolve_workload(self) -> None:
        """drift by default; with prompt files, "file" (one) or "drift" (two); the
        domain-gap workload's domains and every epoch length (`_resolve_domains`)."""
        if not self.prompt_files:
            self.workload = self.workload or "drift"
            if self.workload not in WORKLOADS:
                raise ValueError(f"unknown workload {self.workload!r}: choose one of "
                                 f"{', '.join(WORKLOADS)}, or give --prompts FILE.jsonl")
            return
        if self.workload not in (None, "drift", "file", "epochs"):
            raise ValueError(f"--workload {self.workload} builds its own prompts; drop it "
                             f"when you give --prompts (or use --workload drift with two "
                             f"--prompts files to switch between them, --workload epochs "
                             f"with one to revisit its prompts)")
        if len(self.prompt_files) > 2:
            raise ValueError(f"--prompts takes one file, or two to drift from the first "
                             f"to the second; got {len(self.prompt_files)}")
        if self.workload == "drift" and len(self.prompt_files) == 1:
            raise ValueError("--workload drift with --prompts needs two files (the run "
                             "switches from the first to the second halfway); give "
                             "--prompts twice, or drop --workload to run on one file")
        if self.workload == "epochs" and len(self.prompt_files) == 2:
            raise ValueError("--workload epochs revisits one prompt set: give --prompts "
                             "once (two files make a drift workload)")
        if self.workload != "epochs":
            self.workload = "drift" if len(self.prompt_files) == 2 else "file"

    def _resolve_domains(self) -> None:
        if self.workload != "domain-gap":
            if self.domains is not None:
                raise ValueError(f"--domains {','.join(self.domains)} is for --workload "
                                 f"domain-gap; add it, or drop --domains")
            if self.epoch_steps is None and self.workload == "epochs":
                self.epoch_steps = 2
            return
        if self.prompt_files:
            raise ValueError("--workload domain-gap builds its prompts from --domains; drop "
                             "--prompts")
        from atlas_rl.workloads import domain_prompts

        self.domains = list(self.domains or DOMAIN_GAP_DOMAINS)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"--domains needs distinct domain names, got {self.domains}")
        for d in self.domains:
            domain_prompts(d, 1)  # an unknown name fails here, naming the choices
        if self.epoch_steps is None:
            self.epoch_steps = max(1, self.steps // len(self.domains) // 2)

    @property
    def drift_step(self) -> int | None:
        """First step of the second domain (None without drift)."""
        return self.steps // 2 if self.workload == "drift" else None

    @property
    def phase_starts(self) -> list[int]:
        """The first step of each domain's phase: drift two halves, domain-gap an equal
        share per domain, the rest one phase."""
        if self.workload == "drift":
            return [0, self.steps // 2]
        if self.workload == "domain-gap":
            n = len(self.domains)
            return [i * self.steps // n for i in range(n)]
        return [0]

    def domain_phase(self, step: int) -> int:
        return max(i for i, start in enumerate(self.phase_starts) if start <= step)

    def prompt_slot(self, step: int) -> int:
        """Which slice of its domain's prompts step `step` draws: a new one every step,
        counted from the domain's first step; with epochs (and domain-gap), slice
        (steps into the domain) % epoch_steps, so the same prompts come back every
        epoch."""
        rel = step - self.phase_starts[self.domain_phase(step)]
        return rel % self.epoch_steps if self.workload in ("epochs", "domain-gap") else rel

    def epoch(self, step: int) -> int | None:
        """The epoch of `step` (0-based, within its domain) with --workload epochs or
        domain-gap, else None."""
        if self.workload not in ("epochs", "domain-gap"):
            return None
        return (step - self.phase_starts[self.domain_phase(step)]) // self.epoch_steps

    def resolved_large_batch_steps(self) -> list[int]:
        if self.large_batch_steps is not None:
            return sorted(set(self.large_batch_steps))
        return list(range(1, self.steps, 2)) or [self.steps - 1]


# --- workload --------------------------------------------------------------------

def _domain_pools(cfg: BenchConfig) -> list[tuple[str, list]]:
    """One (domain, prompts) per phase; prompts are workloads.Prompt objects."""
    from atlas_rl import workloads

    per_step = cfg.prompts_per_step + 2
    if cfg.workload == "epochs":  # one fixed set, a slice per step of an epoch
        if cfg.prompt_files:
            prompts = workloads.load_prompt_file(cfg.prompt_files[0])
            random.Random(cfg.seed).shuffle(prompts)
            return [(prompts[0].domain, prompts[: cfg.epoch_steps * per_step])]
        return [("mixed", workloads.mixed_prompts(cfg.epoch_steps * per_step, seed=cfg.seed))]
    per_phase = cfg.steps * per_step
    if cfg.prompt_files:
        pools = []
        for path in cfg.prompt_files:
            prompts = workloads.load_prompt_file(path)
            random.Random(cfg.seed).shuffle(prompts)
            pools.append((prompts[0].domain, prompts))
        return pools
    if cfg.workload == "domain-gap":  # each domain's first epoch_steps slices
        return [(d, domain_pool(d, cfg.seed)[: cfg.epoch_steps * per_step])
                for d in cfg.domains]
    names = DRIFT_DOMAINS if cfg.workload == "drift" else (cfg.workload,)
    return [(name, workloads.domain_prompts(name, per_phase, seed=cfg.seed)) for name in names]


def domain_pool(domain: str, seed: int, most: int = 4096) -> list:
    """A domain's distinct prompts (up to `most`) in the seed's order: the run draws its
    prompts from the front, the domain oracle distils on the ones after them."""
    from atlas_rl import workloads

    seen, out = set(), []
    for p in workloads.domain_prompts(domain, most, seed=seed):
        key = repr(p.prompt)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# --- the domain oracle ------------------------------------------------------------------

#: the oracle's rollouts and epochs: those of the bundled MLP drafter's distillation
#: (`train_report.json`: <= 160 tokens, 2 completions, 8-10 epochs)
ORACLE_MAX_TOKENS = 160
ORACLE_EPOCHS = 8
ORACLE_EAGLE3_SECONDS = 600.0
#: the MLP oracle's loss: atlas's own (`AtlasConfig.drafter_loss`'s default)
ORACLE_LOSS = AtlasConfig.drafter_loss


def oracle_prompts(cfg: BenchConfig) -> dict[str, list]:
    """Per domain of the run, the prompts its domain oracle distils on: the next
    `oracle_prompts` of the domain after the ones the run draws (none of them in the run;
    fewer where the domain has fewer distinct prompts). Only the run's domains."""
    run = {d: {repr(p.prompt) for p in pool} for d, pool in _domain_pools(cfg)}
    out = {}
    for d in run:
        rest = [p for p in domain_pool(d, cfg.seed) if repr(p.prompt) not in run[d]]
        if not rest:
            raise ValueError(f"domain {d!r} has no prompts left for its oracle after the "
                             f"run's {len(run[d])}: lower --prompts-per-step or --steps")
        out[d] = rest[: cfg.oracle_prompts]
    return out


def oracle_command(cfg: BenchConfig, model_path: str, prompt_files: list[str],
                   num_prompts: int, out: str, dtype: str) -> list[str]:
    """The `atlas-rl train-speculator` run that makes the domain oracle: the architecture
    of the run's static drafter, its budget stated in its flags."""
    import sys

    kind = "eagle3" if cfg.drafter == "eagle3" else "mlp"
    cmd = [sys.executable, "-m", "atlas_rl.cli", "train-speculator", "--model", model_path,
           "--prompts", *prompt_files, "--out", out, "--num-prompts", str(num_prompts),
           "--completions", str(cfg.oracle_completions), "--max-tokens", str(ORACLE_MAX_TOKENS),
           "--epochs", str(ORACLE_EPOCHS), "--drafter", kind, "--seed", str(cfg.seed),
           "--dtype", dtype]
    if kind == "eagle3":
        cmd += ["--time-budget", str(ORACLE_EAGLE3_SECONDS)]
    else:  # the loss the static drafter and atlas's updates train on
        cmd += ["--loss", ORACLE_LOSS]
    return cmd


def build_domain_oracle(cfg: BenchConfig, model_path: str, dtype: str, chat: bool,
                        say: Callable[[str], None]) -> tuple[str, dict]:
    """The domain oracle's drafter directory (distilled now, or found in the cache from
    an earlier run with the same model files, prompts and budget) and its report. Its
    prompts are given as the run gives them (`chat`: the model has a chat template, else
    chat messages become plain text). It runs in a child process: a vLLM engine built
    and dropped in this one would tear down the process-wide state the bench's engines
    share."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    from atlas_rl.models import cache_dir

    prompts = oracle_prompts(cfg)
    as_given = {d: [_as_engine_prompt(p.prompt, chat, [True]) for p in ps]
                for d, ps in prompts.items()}
    rows = {d: [json.dumps({"messages": p} if isinstance(p, list) else {"prompt": p})
                for p in ps] for d, ps in as_given.items()}
    weights = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime))
                     for f in Path(model_path).iterdir() if f.is_file())
    key_src = json.dumps({"model": str(Path(model_path).resolve()), "files": weights,
                          "rows": rows, "completions": cfg.oracle_completions,
                          "max_tokens": ORACLE_MAX_TOKENS, "epochs": ORACLE_EPOCHS,
                          "drafter": cfg.drafter, "dtype": dtype, "seed": cfg.seed,
                          # distilled on TV since 2026-12-05 (before: the cross-entropy)
                          **({} if cfg.drafter == "eagle3" else {"loss": ORACLE_LOSS})},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = cache_dir() / "oracles" / f"{Path(model_path).name}-{'+'.join(rows)}-{key}"
    if (out / "train_report.json").is_file():
        say(f"domain oracle: {out} (cached: the same model files, prompts and budget)")
    else:
        with tempfile.TemporaryDirectory(prefix="atlas-oracle-") as tmp:
            files = []
            for d, lines in rows.items():
                files.append(str(Path(tmp) / f"{d}.jsonl"))
                Path(files[-1]).write_text("".join(line + "\n" for line in lines))
            cmd = oracle_command(cfg, model_path, files, sum(map(len, rows.values())),
                                 str(Path(tmp) / "drafter"), dtype)
            say(f"domain oracle: distilling the {'EAGLE-3' if cfg.drafter == 'eagle3' else 'MLP'}"
                f" drafter on {' + '.join(f'{len(v)} {d}' for d, v in rows.items())} prompts "
                f"the run does not draw, x {cfg.oracle_completions} completions x <= "
                f"{ORACLE_MAX_TOKENS} tokens, {ORACLE_EPOCHS} epochs (cached for later runs)")
            env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
            t0 = time.perf_counter()
            tail: collections.deque = collections.deque(maxlen=40)
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=env) as proc:
                for line in proc.stdout:  # its progress, as it comes
                    tail.append(line.rstrip())
                    if line.startswith(("budget:", "generate ", "epoch ", "held-out")):
                        say("domain oracle: " + line.rstrip())
            if proc.returncode != 0:
                raise RuntimeError(f"the domain oracle's distillation failed (exit "
                                   f"{proc.returncode}); run without it with --methods "
                                   f"(leaving out domain-oracle), or run it yourself: "
                                   f"{' '.join(cmd)}\n" + "\n".join(tail))
            report = json.loads((Path(tmp) / "drafter" / "train_report.json").read_text())
            report["oracle"] = {"domains": {d: len(v) for d, v in rows.items()},
                                "seconds": time.perf_counter() - t0, "command": cmd[3:]}
            (Path(tmp) / "drafter" / "train_report.json").write_text(json.dumps(report, indent=2))
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(tmp) / "drafter", out, dirs_exist_ok=True)
        say(f"domain oracle: {out} ({report['oracle']['seconds']:.0f} s)")
    report = json.loads((out / "train_report.json").read_text())
    return str(out), report


def oracle_summary(report: dict) -> dict:
    """What results carry of the oracle's train report: its budget and held-out figures."""
    hist = report.get("history") or []
    last = hist[-1] if hist else {}
    return {"domains": (report.get("oracle") or {}).get("domains"),
            "training_rows": report.get("training_rows"),
            "seconds": (report.get("oracle") or {}).get("seconds"),
            "heldout_accept_distribution": last.get("accept_distribution"),
            "heldout_vocab_coverage": last.get("vocab_coverage")}


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

def reinforce_backward(model, completions, advantages: Sequence[float],
                       temperature: float = 1.0) -> float:
    """Backpropagate the on-policy GRPO loss (the clipped ratio is 1 on-policy: REINFORCE):
    -sum over completions of advantage x the completion's token logprobs, normalised by
    all completions' token count; one sequence at a time, through the completion's logits
    only. Returns the loss; the caller steps its optimizer."""
    import torch

    from atlas_rl.exactness import completion_logits

    num_tokens = sum(len(c.completion_ids) for c in completions)
    loss_total = 0.0
    for c, a in zip(completions, advantages):
        if abs(a) <= 1e-6 or not c.completion_ids:
            continue
        ids = torch.tensor([list(c.prompt_ids) + list(c.completion_ids)])
        # the completion's logits only: [len(c), vocab] in the graph, not the prompt's
        logits = completion_logits(model, ids, len(c.completion_ids))
        if temperature > 0:
            logits = logits / temperature
        logp = torch.log_softmax(logits.float(), dim=-1)
        token_logp = logp.gather(1, torch.tensor(c.completion_ids)[:, None])[:, 0]
        loss = -(a * token_logp.sum()) / num_tokens
        loss.backward()
        loss_total += float(loss.detach())
    return loss_total


class PolicyUpdater:
    """The policy as the trainer holds it (transformers, float32, CPU) and one
    on-policy GRPO step per benchmark step. On-policy the clipped ratio is 1, so the
    step is REINFORCE with group-normalised advantages; the loss is normalised by the
    group's token count. No KL term: drift is the point (`policy_kl` measures it against
    the initial policy).

    ``lora_rank`` 0 trains every weight with AdamW: 16 bytes a parameter (weights,
    gradients, two moments) and a frozen copy of the initial weights, ~5 GB for a 270M
    model whose 262,144 x 640 embedding is 60% of it. ``lora_rank`` R > 0 trains a LoRA
    adapter of rank R on every linear layer (PEFT, alpha 2R) with the base frozen, as
    most GRPO runs of larger models do: the initial policy is the base with the adapter
    off, so no copy is kept, and the engines receive the merged weights
    (`sync_weights` merges a PEFT LoRA model)."""

    def __init__(self, model_path: str, lr: float, seed: int = 0, lora_rank: int = 0):
        import torch
        from transformers import AutoModelForCausalLM

        if lora_rank < 0:
            raise ValueError(f"lora_rank must be 0 (full training) or a LoRA rank >= 1, "
                             f"got {lora_rank}")
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.eval()  # no dropout in these models; eval keeps the check's forward exact
        self.lora_rank = lora_rank
        if lora_rank:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:
                raise ImportError("a LoRA policy (lora_rank > 0) needs PEFT: pip install "
                                  "'atlas-rl[peft]', or train every weight (lora_rank 0)") from e
            self.model = get_peft_model(self.model, LoraConfig(
                r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                target_modules="all-linear"))
            self.model.eval()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # foreach=False: the multi-tensor step allocates temporaries the size of every
        # trained weight at once (1 GB at 270M float32); per tensor, the largest one's
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0, foreach=False)
        # full training: the initial policy, frozen, the reference of `param_delta_norm`
        # and `policy_kl`; LoRA: the base with the adapter off is that reference
        self._initial = [] if lora_rank else [p.detach().clone() for p in self.params]
        self._initial_by_name = {n: p0 for (n, _), p0 in zip(named, self._initial)}
        self.updates = 0

    def describe(self) -> str:
        """What trains and what it holds: weights, gradients and AdamW's two moments in
        float32 (16 bytes a trained parameter, 4 a frozen one), plus the initial copy."""
        trained = sum(p.numel() for p in self.params)
        total = sum(p.numel() for p in self.model.parameters())
        held = 4 * total + 12 * trained + 4 * sum(p.numel() for p in self._initial)
        what = f"a LoRA adapter of rank {self.lora_rank}" if self.lora_rank else "every weight"
        return (f"the policy trains {what}: {trained / 1e6:.1f}M of {total / 1e6:.0f}M "
                f"parameters, {held / 1e9:.2f} GB with its optimizer state"
                + ("" if self.lora_rank else " and initial copy (--policy-lora-rank R "
                   "trains an adapter instead)"))

    def step(self, completions, rewards: Sequence[float], temperature: float) -> dict:
        import torch

        r = torch.tensor(list(rewards), dtype=torch.float32)
        adv = (r - r.mean()) / (r.std() + 1e-4) if len(r) > 1 else torch.zeros_like(r)
        num_tokens = sum(len(c.completion_ids) for c in completions)
        if num_tokens == 0 or not bool((adv.abs() > 1e-6).any()):
            return {"loss": 0.0, "grad_norm": 0.0, "updated": False}
        loss_total = reinforce_backward(self.model, completions, adv.tolist(), temperature)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        release_freed_memory()
        return {"loss": loss_total, "grad_norm": grad_norm, "updated": True}

    def policy_kl(self, completions, temperature: float) -> float | None:
        """KL(pi || pi_0) per token: the full-distribution KL of the policy now from the
        initial policy, averaged over the completion positions of `completions`, at the
        sampling temperature (float32, no gradient). A forward of each policy per
        sequence (the initial one by `_initial_logits`: no second model is held; one
        sequence at a time, so the peak is one sequence's logits); 0.0 before any update
        (the policy is the initial one); None without completion tokens."""
        import torch

        from atlas_rl.exactness import completion_logits

        seqs = [(list(c.prompt_ids), list(c.completion_ids)) for c in completions
                if c.completion_ids]
        if not seqs:
            return None
        if self.updates == 0:
            return 0.0
        temp = temperature if temperature > 0 else 1.0
        total, count = 0.0, 0
        with torch.no_grad():  # one sequence at a time: [len, vocab] logits, not [n, width, vocab]
            for p, c in seqs:
                ids = torch.tensor([p + c])
                now = completion_logits(self.model, ids, len(c))  # the logits that sampled c
                ref = self._initial_logits(ids, len(c))
                logp = torch.log_softmax(now.float() / temp, dim=-1)
                logq = torch.log_softmax(ref.float() / temp, dim=-1)
                total += float((logp.exp() * (logp - logq)).sum())
                count += len(c)
        release_freed_memory()
        return max(total / count, 0.0)

    def _initial_logits(self, ids, n: int):
        """The initial policy's `completion_logits`: the adapter switched off, or the
        model run on the frozen copy of its initial weights (`functional_call`, so no
        second model is held)."""
        from torch.func import functional_call

        from atlas_rl.exactness import completion_logits

        if self.lora_rank:
            with self.model.disable_adapter():
                return completion_logits(self.model, ids, n)
        return completion_logits(lambda **kw: functional_call(
            self.model, self._initial_by_name, (), kw), ids, n)

    def param_delta_norm(self) -> float:
        """||theta - theta_0|| over every weight: with a LoRA adapter, the norm of the
        merged deltas (scale x B A) of its layers."""
        import torch

        with torch.no_grad():
            if self.lora_rank:
                from atlas_rl.backends.vllm.weight_sync import lora_delta, lora_layers

                deltas = (lora_delta(m) for m in lora_layers(self.model).values())
                return float(torch.sqrt(sum(((d ** 2).sum() for d in deltas if d is not None),
                                            torch.zeros(()))))
            return float(torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in
                                        zip(self.params, self._initial))))


# --- summaries -----------------------------------------------------------------

def _step_record(stats: dict, max_lookahead: int) -> dict:
    pos = [stats.get(f"{POS_PREFIX}{i}") for i in range(max_lookahead)]
    while pos and pos[-1] is None:
        pos.pop()
    rec = {k: stats[k] for k in BENCH_RECORD_KEYS if k in stats}
    rec["speedup_estimate"] = tokens_per_request_step([rec])
    rec.update(arm_metrics(stats))  # atlas: which arm drafted (share of drafts), how well
    rec["acceptance_rate_pos"] = pos
    return rec


def drift_summary(rows: list[dict], final_kl: float | None,
                  final_delta_norm: float) -> dict:
    """The drift section's summary (`BENCH_DRIFT_SUMMARY_KEYS`) from its per-step rows:
    the frozen drafter's first and last figures are those of the first and last steps
    that have one (a step where atlas-static drafted nothing has none)."""
    static = [r[STATIC_ACCEPTANCE_LENGTH] for r in rows
              if r.get(STATIC_ACCEPTANCE_LENGTH) is not None]
    first, last = (static[0], static[-1]) if static else (None, None)
    return {
        "policy_kl_last_step": rows[-1].get(POLICY_KL) if rows else None,
        "policy_kl_final": final_kl,
        "param_delta_norm_final": final_delta_norm,
        "static_acceptance_length_first": first,
        "static_acceptance_length_last": last,
        "static_acceptance_drop": 1.0 - last / first if first else None,
    }


def summarize_regime(records: list[dict], exact: bool,
                     base_records: list[dict] | None = None, seed: int = 0) -> dict:
    """Medians over a regime's steps; with ``base_records`` (``none``'s records of the
    same steps) the speedup is the pooled one with its bootstrap interval
    (`speedup_interval`), else the median of per-step ratios."""
    out = {k: median([r.get(k) for r in records]) for k in BENCH_REGIME_KEYS}
    out["speedup_estimate"] = tokens_per_request_step(records)
    out["entropy"] = median([r.get("entropy") for r in records])
    out["exact"] = exact
    out["steps"] = len(records)
    if base_records is not None:
        out["speedup"], out["speedup_ci"] = speedup_interval(records, base_records, seed=seed)
    if not exact:
        out["speedup"] = out["speedup_ci"] = None
    return out


def tokens_per_request_step(records: list[dict]) -> float | None:
    """Tokens per request-step over every step of ``records``, drafted or not: all their
    tokens over all their requests' target passes (each pass yields one token of its own,
    the bonus or recovered one, plus the drafts it accepted), i.e. 1 + accepted /
    request-steps, the trainer metric ``speedup_estimate``. Unlike the acceptance length,
    which counts the request-steps that drafted only, it does not rise when a controller
    drafts less and only where it is sure, and it does not fall when a better drafter is
    trusted on more, less certain positions. None without token counts."""
    tokens = sum(r.get("num_tokens") or 0 for r in records)
    accepted = sum(r.get("num_accepted_tokens") or 0 for r in records)
    return _tokens_per_request_step(tokens, accepted)


def speedup_interval(records: list[dict], base_records: list[dict], seed: int = 0,
                     level: float = INTERVAL_LEVEL,
                     samples: int = BOOTSTRAP_SAMPLES) -> tuple[float | None, list | None]:
    """(pooled speedup, [low, high]): the method's tokens/s over all its steps against
    ``none``'s over the same steps (steps paired by their ``step``), and the `level`
    percentile interval of that ratio over `samples` bootstrap resamplings of the steps
    (each resampled step keeps its pair: both methods ran it on the same prompts, seed and
    weights). A step weighs by its tokens and seconds, so a short one counts for less."""
    base = {r["step"]: r for r in base_records}
    pairs = [(r, base[r["step"]]) for r in records if r["step"] in base]
    pairs = [(m, b) for m, b in pairs if m.get("rollout_seconds") and b.get("rollout_seconds")]
    if not pairs:
        return None, None

    def pooled(sample) -> float:
        tm = sum(m["num_tokens"] for m, _ in sample)
        sm = sum(m["rollout_seconds"] for m, _ in sample)
        tb = sum(b["num_tokens"] for _, b in sample)
        sb = sum(b["rollout_seconds"] for _, b in sample)
        return (tm / sm) / (tb / sb) if tb and sm else float("nan")

    point = pooled(pairs)
    rng = random.Random(seed)
    boots = [pooled([rng.choice(pairs) for _ in pairs]) for _ in range(samples)]
    return point, _percentiles(boots, level)


def sampled_entropy(completions) -> float | None:
    """The policy's per-token entropy in nats, estimated from sampled tokens: the mean of
    -log p(x) over them (unbiased: E_x[-log p(x)] = H(p); p the distribution sampled,
    temperature included)."""
    lps = [lp for c in completions for lp in (c.logprobs or ())]
    return -sum(lps) / len(lps) if lps else None


def _step_rows(records: dict[str, list[dict]], exact: bool) -> list[dict]:
    """A method's rows, one per step: its tail record, with the step's record of every
    regime it ran (no speedup where the method is not exact)."""
    by_step = {r: {x["step"]: x for x in records.get(r, ())} for r in REGIMES}
    rows = []
    for rec in records["tail"]:
        row = {k: rec.get(k) for k in BENCH_STEP_KEYS}
        row.update(arm_metrics(rec))
        if not exact:
            row["speedup"] = None
        row["regimes"] = {r: by_step[r][rec["step"]] for r in REGIMES
                          if rec["step"] in by_step[r]}
        if not exact:
            for x in row["regimes"].values():
                x["speedup"] = None
        rows.append(row)
    return rows


def format_table(results: dict) -> str:
    lines = [("| method | regime | tokens/s | speedup (90% interval) | acceptance length "
              "| tokens per request-step | acceptance rate | lookahead "
              "| oracle (one-hot ceiling) | entropy (nats/token) | exact |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        for regime in REGIMES:
            s = m["regimes"].get(regime)
            if not s or not s.get("steps"):
                continue
            rate = "-" if name == "none" else fmt(s["acceptance_rate"])
            lines.append(
                f"| {name} | {regime} | {fmt(s['tokens_per_s'], '.1f')} | "
                f"{format_speedup(s['speedup'], s.get('speedup_ci'))} | "
                f"{fmt(s['acceptance_length'])} | {fmt(s.get('speedup_estimate'))} | "
                f"{rate} | {fmt(s['lookahead'])} | "
                f"{fmt(s['oracle_acceptance_length'])} | {fmt(s.get('entropy'))} | "
                f"{'yes' if s['exact'] else 'NO'} |")
    return "\n".join(lines)


def format_speedup(speedup: float | None, interval: list | None) -> str:
    """'1.23x (1.18-1.29)': a speedup with its interval, or '-'."""
    if speedup is None:
        return "-"
    if not interval:
        return f"{speedup:.2f}x"
    return f"{speedup:.2f}x ({interval[0]:.2f}-{interval[1]:.2f})"


def format_time_table(results: dict, regime: str = "tail") -> str:
    """Where the time of a regime's rollouts goes, per engine step, per method."""
    lines = [(f"| method ({regime}) | engine steps | tokens/step | forward ms/step | sampling, "
              f"rejection (vllm-*: + their drafting) ms/step | atlas proposer bookkeeping "
              f"ms/step | atlas drafting ms/step | other vLLM ms/step | speculator update "
              f"ms/batch |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        recs = [row["regimes"][regime] for row in m["steps"] if regime in row["regimes"]]
        if not recs:
            continue
        tot = {k: sum(r.get(k, 0.0) or 0.0 for r in recs) for k in BENCH_TIME_KEYS}
        n = max(tot["engine_steps"], 1)
        ms = functools.partial(_ms_per, n=n)
        other = tot["rollout_seconds"] - tot["forward_seconds"] - tot["sample_seconds"]
        lines.append(
            f"| {name} | {int(tot['engine_steps'])} | {tot['num_tokens'] / n:.2f} | "
            f"{ms(tot['forward_seconds'])} | "
            f"{ms(tot['sample_seconds'] - tot['propose_seconds'])} | "
            f"{ms(tot['propose_seconds'] - tot['draft_seconds'])} | {ms(tot['draft_seconds'])} | "
            f"{ms(other)} | {1000 * tot['update_seconds'] / len(recs):.1f} |")
    return "\n".join(lines)


def format_drift(results: dict) -> str:
    """The policy's drift per step (`results["drift"]`) and what it did to the frozen
    drafter: a table, then the run's figures on one line."""
    drift = results.get("drift")
    if not drift or not drift["steps"]:
        return ""
    lines = [(f"| step | domain | KL(pi_s || pi_0) nats/token | ||theta_s - theta_0|| | "
              f"{BENCH_STATIC_METHOD} acceptance length |"), "|---|---|---|---|---|"]
    for r in drift["steps"]:
        lines.append(f"| {r['step'] + 1} | {r['domain']} | {fmt(r[POLICY_KL], '.4f')} | "
                     f"{fmt(r[PARAM_DELTA_NORM])} | {fmt(r[STATIC_ACCEPTANCE_LENGTH])} |")
    drop = drift["static_acceptance_drop"]
    lines.append("")
    lines.append(f"after the last update: KL {fmt(drift['policy_kl_final'], '.4f')} nats/token, "
                 f"||theta - theta_0|| {fmt(drift['param_delta_norm_final'])}; "
                 f"{BENCH_STATIC_METHOD} acceptance length "
                 f"{fmt(drift['static_acceptance_length_first'])} (first step) -> "
                 f"{fmt(drift['static_acceptance_length_last'])} (last): "
                 + ("-" if drop is None else f"{100 * drop:.0f}% lost" if drop >= 0 else
                    f"{-100 * drop:.0f}% gained"))
    return "\n".join(lines)


def gate_check_summary(records: dict[str, list[dict]]) -> dict:
    """The publish gate's decisions checked on the next batch (`drafter_gate_right` of
    every update of every regime): how many, and the share that were wrong."""
    right = [r["drafter_gate_right"] for regime in REGIMES for r in records.get(regime, ())
             if r.get("drafter_gate_right") is not None]
    return {"gate_checks": len(right),
            "gate_error_rate": 1.0 - statistics.fmean(right) if right else None}


#: the methods the domain-gap summary follows per step, in its columns' order
DOMAIN_GAP_METHODS = ("atlas-static", "atlas", "domain-oracle", "vllm-ngram", "vllm-suffix")


def domain_gap_summary(results: dict) -> list[dict] | None:
    """Per domain of a domain-gap run: each method's tail acceptance length and tokens
    per request-step at every step of the domain; then atlas against atlas-static and
    the domain oracle in tokens per request-step (``measure``), the measure of what the
    drafts bought over every request-step: an acceptance length counts drafting steps
    only, so a method that drafts rarely, where it is sure, measures high on it (a
    frozen drafter on a domain it never saw does). At the domain's last step: atlas over
    atlas-static (the ratio) and the share of the way from atlas-static to the oracle
    that atlas went (1.0 is the oracle, 0 the frozen drafter; None where the oracle is
    not above atlas-static by 0.02); the worst step's ratio; and over the domain's
    second half, each method's mean and atlas's share of the way. None for other
    workloads."""
    c = results["config"]
    if c.get("workload") != "domain-gap":
        return None
    bounds = [*c["phase_starts"], c["steps"]]
    methods = results["methods"]
    out = []
    for i, domain in enumerate(c["domains"]):
        lo, hi = bounds[i], bounds[i + 1]
        per = {}
        for m in DOMAIN_GAP_METHODS:
            if m in methods:
                rows = [r for r in methods[m]["steps"] if lo <= r["step"] < hi]
                per[m] = {"acceptance_length": [r["acceptance_length"] for r in rows],
                          "tokens_per_request_step": [r.get("speedup_estimate") for r in rows]}
        row = {"domain": domain, "steps": [lo + 1, hi], "per_step": per,
               "measure": "tokens_per_request_step"}
        tps = {m: v["tokens_per_request_step"] for m, v in per.items()
               if v["tokens_per_request_step"] and None not in v["tokens_per_request_step"]}
        if "atlas" in tps and BENCH_STATIC_METHOD in tps:
            a, s = tps["atlas"], tps[BENCH_STATIC_METHOD]
            o = tps.get("domain-oracle")
            row["atlas_over_static_last"] = a[-1] / s[-1] if s[-1] else None
            ratios = [x / y for x, y in zip(a, s) if y]
            row["atlas_over_static_worst"] = min(ratios) if ratios else None
            row["gap_closed_last"] = _share_of_the_way(a[-1], s[-1], o[-1] if o else None)
            half = len(a) // 2
            row["second_half"] = {"steps": [lo + half + 1, hi], **{
                m: statistics.fmean(v[half:]) for m, v in tps.items() if v[half:]}}
            row["gap_closed_second_half"] = _share_of_the_way(
                row["second_half"]["atlas"], row["second_half"][BENCH_STATIC_METHOD],
                row["second_half"].get("domain-oracle"))
            seed = c.get("seed") if isinstance(c.get("seed"), int) else 0  # pooled: a list
            row.update(_second_half_intervals(methods, lo + half, hi, seed=seed))
        out.append(row)
    return out


def _second_half_intervals(methods: dict, lo: int, hi: int, seed: int = 0,
                           level: float = INTERVAL_LEVEL,
                           samples: int = BOOTSTRAP_SAMPLES) -> dict:
    """Over steps [lo, hi) of the tail: atlas's tokens per request-step over atlas-static's
    and its share of the way to the domain oracle, both from the counts pooled over every
    (run, step) (the runs of a pooled result, `pool_results`; one run otherwise), each with
    the `level` percentile interval of `samples` bootstrap resamplings of the (run, step)
    units (a resampled unit keeps every method's record of it: they ran the same prompts).
    Empty where a method's records lack token counts (results written before they were kept)."""
    names = ("atlas", BENCH_STATIC_METHOD, "domain-oracle")
    units: dict[tuple, dict] = {}
    for m in names:
        if m not in methods:
            continue
        for run, rows in enumerate(methods[m].get("run_steps") or [methods[m]["steps"]]):
            for r in rows:
                rec = r.get("regimes", {}).get("tail")
                if lo <= r["step"] < hi and rec and rec.get("num_tokens"):
                    units.setdefault((run, r["step"]), {})[m] = rec
    units = [u for u in units.values() if "atlas" in u and BENCH_STATIC_METHOD in u]
    if not units:
        return {}
    oracle = all("domain-oracle" in u for u in units)

    def figures(sample) -> tuple[float | None, float | None]:
        tps = {m: tokens_per_request_step([u[m] for u in sample])
               for m in (names if oracle else names[:2])}
        a, st = tps["atlas"], tps[BENCH_STATIC_METHOD]
        ratio = a / st if a and st else None
        share = _share_of_the_way(a, st, tps.get("domain-oracle")) if a and st else None
        return ratio, share

    ratio, share = figures(units)
    rng = random.Random(seed)
    boots = [figures([rng.choice(units) for _ in units]) for _ in range(samples)]
    out = {"second_half_units": len(units),
           "atlas_over_static_second_half": ratio,
           "atlas_over_static_second_half_ci": _percentiles([b[0] for b in boots], level)}
    if oracle:
        out["gap_closed_second_half_pooled"] = share
        out["gap_closed_second_half_ci"] = _percentiles([b[1] for b in boots], level)
    return out


def _percentiles(values: list, level: float) -> list | None:
    """The two-sided `level` percentile interval of ``values`` (None entries dropped; None
    where under half of them are left, e.g. the oracle rarely above atlas-static)."""
    xs = sorted(v for v in values if v is not None)
    if len(xs) < max(1, len(values) // 2):
        return None
    tail = (1.0 - level) / 2
    return [xs[int(tail * (len(xs) - 1))], xs[round((1.0 - tail) * (len(xs) - 1))]]


def _share_of_the_way(atlas: float, static: float, oracle: float | None) -> float | None:
    """How far atlas went from the frozen drafter towards the oracle (None: the oracle
    is not above the frozen drafter by 0.02, so there is no way to go)."""
    if oracle is None or oracle - static <= 0.02:
        return None
    return (atlas - static) / (oracle - static)


def _way(closed: float | None) -> str:
    return ("the oracle not above atlas-static" if closed is None else
            f"{100 * closed:.0f}% of the way to the domain oracle")


def format_domain_gap(results: dict) -> str:
    """The domain-gap summary as a table per domain (acceptance length, tokens per
    request-step in brackets), then atlas's standing in tokens per request-step at the
    domain's last step and over its second half."""
    summary = domain_gap_summary(results)
    if not summary:
        return ""
    blocks = []
    for row in summary:
        names = list(row["per_step"])
        lines = [f"{row['domain']} (steps {row['steps'][0]}-{row['steps'][1]}): acceptance "
                 f"length per step (tokens per request-step)", "",
                 "| step | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        n = max(len(v["acceptance_length"]) for v in row["per_step"].values())
        for j in range(n):
            cells = []
            for m in names:
                v = row["per_step"][m]
                if j < len(v["acceptance_length"]):
                    cells.append(f"{fmt(v['acceptance_length'][j])} "
                                 f"({fmt(v['tokens_per_request_step'][j])})")
                else:
                    cells.append("-")
            lines.append(f"| {row['steps'][0] + j} | " + " | ".join(cells) + " |")
        if "atlas_over_static_last" in row:
            half = row["second_half"]
            lines += ["", f"in tokens per request-step (every request-step counts; an "
                          f"acceptance length counts drafting steps only): last step atlas "
                          f"{fmt(row['atlas_over_static_last'])}x atlas-static, "
                          f"{_way(row['gap_closed_last'])}; worst step "
                          f"{fmt(row['atlas_over_static_worst'])}x; second half (steps "
                          f"{half['steps'][0]}-{half['steps'][1]}) "
                          + ", ".join(f"{m} {fmt(half[m])}" for m in names if m in half)
                          + f": {_way(row['gap_closed_second_half'])}"]
            if row.get("atlas_over_static_second_half_ci"):
                lo_, hi_ = row["atlas_over_static_second_half_ci"]
                lines[-1] += (f"; over its {row['second_half_units']} (run, step) units "
                              f"atlas {fmt(row['atlas_over_static_second_half'])}x atlas-static "
                              f"({fmt(lo_)}-{fmt(hi_)})")
                if row.get("gap_closed_second_half_ci") and \
                        row.get("gap_closed_second_half_pooled") is not None:
                    lo_, hi_ = row["gap_closed_second_half_ci"]
                    lines[-1] += (f", {100 * row['gap_closed_second_half_pooled']:.0f}% of the "
                                  f"way ({100 * lo_:.0f}-{100 * hi_:.0f}%)")
        blocks.append("\n".join(lines))
    atlas = results["methods"].get("atlas", {}).get("summary", {})
    if atlas.get("gate_checks"):
        blocks.append(f"atlas's publish gate: {atlas['gate_checks']} decisions checked on the "
                      f"next batch's rollouts, {100 * atlas['gate_error_rate']:.0f}% "
                      f"wrong")
    return "\n\n".join(blocks)


def _ms_per(seconds: float, n: float) -> str:
    return f"{1000 * seconds / n:.1f}"


# --- the run -------------------------------------------------------------------

class _Progress:
    """A rich progress line on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, enabled: bool = True):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

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


# What the run imports (vLLM's import takes seconds): loaded before its clock starts.
_STACK = ("torch", "atlas_rl.engine", "atlas_rl.exactness", "atlas_rl.machine",
          "atlas_rl.models", "atlas_rl.rewards")


def engine_config(cfg: BenchConfig, kv_cache_gib: float):
    """Every engine's AtlasConfig: the bench's own choices, then the user's ``--set``
    fields (checked by name and type, `AtlasConfig.from_dict`)."""
    from atlas_rl.config import AtlasConfig, parse_field_settings

    base = dict(max_lookahead=cfg.max_lookahead, dtype=None if cfg.dtype == "auto" else cfg.dtype,
                seed=cfg.seed, drafter=cfg.drafter, cpu_kv_cache_gib=float(kv_cache_gib),
                sync_rollback=False)
    return AtlasConfig.from_dict({**base, **parse_field_settings(cfg.atlas_settings)},
                                 where="atlas-rl bench --set")


def rotation(methods: Sequence[str], nth: int) -> list[str]:
    """The order the methods run a regime in, its `nth` time: rotated by one each time, so
    that over k times (k methods) each runs first once."""
    k = len(methods)
    return [methods[(i + nth) % k] for i in range(k)]


class _BenchRun:
    """One benchmark run, phase by phase: `build` the engines and the policy; per step
    (`step`): the `rollouts` of every regime, `check_exactness`, `update_policy`; then
    `results`."""

    def __init__(self, cfg: BenchConfig, bar: _Progress, say: Callable[[str], None]):
        from atlas_rl.machine import code_revision

        self.cfg, self.bar, self.say = cfg, bar, say
        # the code that runs: read now, not when the results are written (a checkout
        # edited during a half-hour run would otherwise name the edit)
        self.revision = code_revision()
        self.methods = cfg.methods
        self.lb_steps = cfg.resolved_large_batch_steps()
        self.records = {m: {r: [] for r in REGIMES} for m in self.methods}
        self.pit = {m: ([], []) for m in self.methods}
        # where a method's greedy probe first left none's: {"step", "position", "margin"}
        self.greedy_divergences = {m: [] for m in self.methods}
        self.updates: list[dict] = []
        self.totals = {m: {k: 0.0 if k.endswith("_seconds") else 0 for k in BENCH_TIME_KEYS}
                       for m in self.methods}
        self.warned: list = []
        self.final_kl: float | None = None
        self.domains: dict[int, str] = {}

    def build(self) -> None:
        """The model, the prompts, an engine per method (warmed up), the policy."""
        import torch

        from atlas_rl import AtlasRolloutEngine
        from atlas_rl.models import resolve_model

        cfg = self.cfg
        path = resolve_model(cfg.model)
        self.pools = _domain_pools(cfg)
        # Five engines, the policy, its optimizer and its initial copy in 24 GiB: each
        # engine's KV cache sized to the run's largest batch (`_kv_cache_gib`; vLLM's CPU
        # default is 2 GiB an engine whatever the batch) and no host copy of the weights
        # for a rollback (a failed sync ends the run anyway).
        kv_gib = self._kv_cache_gib(path)
        self.engine_config = engine_config(cfg, kv_gib)
        if cfg.atlas_settings:
            self.say("AtlasConfig set for every engine: " + ", ".join(cfg.atlas_settings))
        self.oracle = None
        if "domain-oracle" in self.methods:  # before any engine: it runs one of its own
            from atlas_rl.backends.vllm.engine import default_dtype

            dtype = default_dtype(True) if cfg.dtype == "auto" else cfg.dtype
            oracle_dir, report = build_domain_oracle(cfg, path, dtype, self.chat, self.say)
            self.oracle = {"dir": oracle_dir, **oracle_summary(report)}
        self.engines = {}
        for m in self.methods:
            self.bar.advance(f"building engine {m}")
            self.say(f"building the vLLM engine, speculation={m!r} ...")
            if m == "domain-oracle":  # atlas-static with the drafter of the run's domains
                conf = replace(self.engine_config, static_speculator=self.oracle["dir"])
                self.engines[m] = AtlasRolloutEngine(path, speculation="atlas-static",
                                                     config=conf)
            else:
                self.engines[m] = AtlasRolloutEngine(path, speculation=m,
                                                     config=self.engine_config)
            self.engines[m].generate(["Warm-up."], n=2, max_tokens=8, seed=0)
        any_engine = self.engines["none"]
        self.dtype = str(any_engine.llm.llm_engine.model_config.dtype).replace("torch.", "")
        self.chat = bool(getattr(any_engine.tokenizer, "chat_template", None))
        self.say("loading the policy for updates and reference logprobs (transformers, float32)")
        self.policy = PolicyUpdater(path, cfg.lr, cfg.seed, lora_rank=cfg.policy_lora_rank)
        self.say(self.policy.describe())
        self.tol = LOGPROB_TOLERANCE[self.dtype]
        self.check_gen = torch.Generator().manual_seed(cfg.seed)

    def _kv_cache_gib(self, path: str) -> float:
        """Each engine's KV cache: what the run's largest batch needs, from its longest
        prompt in tokens (the model's tokenizer, chat template included) and the most
        tokens a completion and its drafts add."""
        from transformers import AutoTokenizer

        from atlas_rl.backends.vllm.engine import cpu_kv_cache_gib_for, default_dtype
        from atlas_rl.config import AtlasConfig

        cfg = self.cfg
        tok = AutoTokenizer.from_pretrained(path)
        chat = self.chat = bool(getattr(tok, "chat_template", None))
        longest = 0
        for _, pool in self.pools:
            for p in pool:
                prompt = _as_engine_prompt(p.prompt, chat, [True])
                ids = tok.encode(prompt) if isinstance(prompt, str) else \
                    tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
                longest = max(longest, len(getattr(ids, "input_ids", ids)) + 1)  # + a BOS
        del tok
        release_freed_memory()
        extra = cfg.max_lookahead + 1
        batches = [(cfg.prompts_per_step * cfg.completions,
                    longest + cfg.large_batch_max_tokens + extra),
                   (min(cfg.completions, cfg.tail_sequences), longest + cfg.max_tokens + extra),
                   (1, longest + cfg.probe_tokens + extra)]
        dtype = default_dtype(True) if cfg.dtype == "auto" else cfg.dtype
        gib = cpu_kv_cache_gib_for(path, dtype, batches,
                                   max_model_len=AtlasConfig().max_model_len)
        self.say(f"KV cache {gib:.2f} GiB per engine: {batches[0][0]} sequences of at most "
                 f"{batches[0][1]} tokens (the longest prompt {longest} tokens)")
        return gib

    def as_prompt(self, p):
        return _as_engine_prompt(p.prompt, self.chat, self.warned)

    def step(self, step: int) -> None:
        """One RL step: its prompts, every regime's rollouts, the checks, the update."""
        cfg = self.cfg
        phase = cfg.domain_phase(step)
        domain, pool = self.pools[min(phase, len(self.pools) - 1)]
        drawn = _step_prompts(pool, cfg.prompt_slot(step), cfg.prompts_per_step + 2)
        self.domains[step] = domain
        tail_p, large_p, probe_p = drawn[0], drawn[1:-1], drawn[-1]
        order = rotation(self.methods, step)
        n_tail = min(cfg.completions, cfg.tail_sequences)
        jobs = [("tail_rl", [tail_p], n_tail, cfg.max_tokens, False),
                ("tail", [tail_p], n_tail, cfg.max_tokens, True)]
        orders = [order, order]
        if step in self.lb_steps:
            jobs.append(("large_batch", large_p, cfg.completions, cfg.large_batch_max_tokens,
                         False))
            # rotated by the large batches' own count: on every other step (the default)
            # the step's rotation would put the same method first every time
            orders.append(rotation(self.methods, self.lb_steps.index(step)))
        step_seed = cfg.seed * 1_000_003 + step * 101
        tail_batches = {}
        for j, job in enumerate(jobs):
            batches = self.rollouts(step, domain, orders[j], job, step_seed + j)
            if job[0] == "tail_rl":
                tail_batches = batches
        self.check_exactness(step, order, tail_batches, probe_p)
        self.update_policy(step, tail_p, tail_batches["none"])

    def rollouts(self, step: int, domain: str, order: list[str], job: tuple,
                 seed: int) -> dict:
        """Every method (in `order`) generates a regime's prompts with the same seed and
        its speculator learns the batch; a record per method; the batches."""
        regime, prompts, n, max_tokens, fixed_length = job
        cfg = self.cfg
        batches, recs = {}, {}
        for m in order:
            eng = self.engines[m]
            batch = eng.generate([self.as_prompt(p) for p in prompts], n=n,
                                 temperature=cfg.temperature, max_tokens=max_tokens, seed=seed,
                                 ignore_eos=fixed_length)
            upd = eng.update(batch)
            rec = _step_record(batch.stats, cfg.max_lookahead)
            rec["entropy"] = sampled_entropy(batch.completions)
            rec["update_seconds"] = upd.get("update_seconds", 0.0)
            rec.update({key: upd[key] for key in BENCH_UPDATE_KEYS if key in upd})
            recs[m], batches[m] = rec, batch
            for key in self.totals[m]:
                self.totals[m][key] += rec.get(key, 0) or 0
            self.bar.advance(f"step {step + 1}/{cfg.steps} {regime} {m}")
        base_tps = recs["none"]["tokens_per_s"]
        for m, rec in recs.items():
            rec["speedup"] = rec["tokens_per_s"] / base_tps if base_tps else None
            rec.update(step=step, domain=domain, epoch=cfg.epoch(step))
            self.records[m][regime].append(rec)
        self.say(f"step {step + 1}/{cfg.steps} [{domain}] {regime:<11} " + "  ".join(
            f"{m} {r['tokens_per_s']:.0f} tok/s AL {r['acceptance_length']:.2f}"
            for m, r in recs.items()))
        return batches

    def check_exactness(self, step: int, order: list[str], tail_batches: dict,
                        probe_prompt) -> None:
        """The sampled tokens against the policy that sampled them; greedy identity with
        `none` on a probe prompt."""
        from atlas_rl.exactness import greedy_divergence_margin, sampling_values

        cfg = self.cfg
        if cfg.temperature > 0:
            for m in self.methods:
                comps = tail_batches[m].completions[: cfg.check_sequences]
                u, err = sampling_values(self.policy.model, comps, cfg.temperature,
                                         self.check_gen)
                self.pit[m][0].append(u)
                self.pit[m][1].append(err)
        probe = {m: self.engines[m].generate([self.as_prompt(probe_prompt)], temperature=0.0,
                                             max_tokens=cfg.probe_tokens)
                 for m in order}
        for m in self.methods:
            ref, got = probe["none"].completions[0], probe[m].completions[0]
            div = greedy_divergence_margin(self.policy.model, ref.prompt_ids,
                                           ref.completion_ids, got.completion_ids)
            if div is not None:  # judged at the end (`greedy_tie_tolerance`)
                self.greedy_divergences[m].append(
                    {"step": step, "position": div[0], "margin": div[1]})
            self.bar.advance(f"step {step + 1}/{cfg.steps} exactness {m}")

    def update_policy(self, step: int, tail_prompt, none_batch) -> None:
        """The policy moves: a GRPO step on none's tail group, synced into every engine."""
        from atlas_rl.rewards import rollout_reward

        cfg = self.cfg
        group = none_batch.completions
        code = tail_prompt.prompt if tail_prompt.domain in ("code", "javascript") and \
            isinstance(tail_prompt.prompt, str) else None
        language = "javascript" if tail_prompt.domain == "javascript" else "python"
        rewards = [rollout_reward(c.text, tail_prompt.answer, len(c.completion_ids),
                                  cfg.max_tokens, c.finish_reason == "stop", code,
                                  length_weight=cfg.length_reward, language=language)
                   for c in group]
        t0 = time.perf_counter()
        # the drift so far: the policy that sampled this step's rollouts against pi_0
        kl = self.policy.policy_kl(group, cfg.temperature)
        kl_s = time.perf_counter() - t0
        delta = self.policy.param_delta_norm()
        t0 = time.perf_counter()
        info = self.policy.step(group, rewards, cfg.temperature or 1.0)
        train_s = time.perf_counter() - t0
        info.update({POLICY_KL: kl, PARAM_DELTA_NORM: delta})
        if step == cfg.steps - 1:  # where the run leaves the policy (it samples no more)
            self.final_kl = self.policy.policy_kl(group, cfg.temperature)
        t0 = time.perf_counter()
        for eng in self.engines.values():
            eng.sync_weights(self.policy.model)
        sync_s = time.perf_counter() - t0
        reward = statistics.fmean(rewards)
        self.updates.append({"step": step, "reward": reward, **info,
                             "train_seconds": train_s, "sync_seconds": sync_s,
                             "kl_seconds": kl_s})
        self.bar.advance(f"step {step + 1}/{cfg.steps} policy update")
        self.say(f"step {step + 1}/{cfg.steps} policy update: reward {reward:.3f}"
                 f" grad norm {info['grad_norm']:.3f}, train {train_s:.1f} s, sync {sync_s:.1f} s;"
                 f" drift: KL(pi_{step} || pi_0) {fmt(kl, '.4f')} nats/token, "
                 f"||theta_{step} - theta_0|| {delta:.2f}")

    def exactness(self, m: str) -> dict:
        """A method's verdict: greedy identity on every probe, and (sampling) one KS test
        of the pooled PIT values and the largest logprob error."""
        import torch

        from atlas_rl.exactness import sampling_check

        def check_of(method):
            return sampling_check(torch.cat(self.pit[method][0]),
                                  torch.cat(self.pit[method][1]))

        sampled = self.cfg.temperature > 0
        none_check = check_of("none") if sampled and "none" in self.pit else None
        tie = self.greedy_tie_tolerance(none_check)
        divergences = self.greedy_divergences[m]
        mismatches = [d for d in divergences if d["margin"] > tie]
        out = {"greedy_mismatch_steps": [d["step"] for d in mismatches],
               "greedy_mismatches": mismatches,
               "greedy_near_ties": [d for d in divergences if d["margin"] <= tie],
               "greedy_tie_tolerance": tie, "judged_in": self.dtype}
        if sampled:
            check = check_of(m)
            statistic = LOGPROB_STATISTIC[self.dtype]
            within = check.passed(1e-3, self.tol, statistic)
            out.update(check.as_dict(), logprob_tolerance=self.tol,
                       logprob_judged_on=statistic, logprob_within_tolerance=within,
                       distribution_ok=within)
            if self.dtype != "float32" and none_check is not None:
                # past the tolerance, beside what the dtype costs no speculation
                out["logprob_judged_against"] = "none"
                out["distribution_ok"] = within or check.passed_beside(
                    none_check, 1e-3, LOGPROB_RELATIVE_SLACK)
        else:
            out["distribution_ok"] = True  # greedy: identity is the whole check
        out["exact"] = not out["greedy_mismatch_steps"] and out["distribution_ok"]
        return out

    def greedy_tie_tolerance(self, none_check=None) -> float:
        """The float32 policy's margin between two tokens (nats) at or below which a
        greedy probe's first difference from `none` is a near-tie the dtype flips, not a
        divergence: none in float32 (any difference fails); in a lower precision the
        dtype's logprob tolerance, or, where the dtype moved `none`'s own logprobs further
        in this run (``none_check``: its `SamplingCheck` against the float32 policy), twice
        their 99th-percentile error: a margin is the difference of two logits, each off
        by as much."""
        if self.dtype == "float32":
            return 0.0
        measured = 0.0 if none_check is None else 2.0 * none_check.logprob_p99_abs_err
        return max(self.tol, measured) if math.isfinite(measured) else self.tol

    def method_results(self, m: str) -> dict:
        exactness = self.exactness(m)
        exact = exactness["exact"]
        records = self.records[m]
        base = self.records["none"]
        regimes = {r: summarize_regime(records[r], exact, base[r], seed=self.cfg.seed)
                   for r in REGIMES if records[r]}
        summary = {k: regimes["tail"][k] for k in BENCH_SUMMARY_KEYS}
        d = self.cfg.drift_step
        if d is not None:
            tail = records["tail"]
            summary["acceptance_length_pre_drift"] = median(
                [r["acceptance_length"] for r in tail if r["step"] < d])
            summary["acceptance_length_post_drift"] = median(
                [r["acceptance_length"] for r in tail if r["step"] >= d])
        summary["speedup_ci"] = regimes["tail"].get("speedup_ci")
        summary["entropy"] = regimes["tail"].get("entropy")
        summary.update(gate_check_summary(records))
        if m == "none":
            summary["speedup"] = 1.0
        return {"summary": summary, "regimes": regimes, "steps": _step_rows(records, exact),
                "exactness": exactness, "time": self.totals[m]}

    def drift(self) -> dict:
        """How far the policy moved and what that did to the frozen drafter: per step the
        KL of the policy that sampled it from the initial one and atlas-static's tail
        acceptance length (names and definitions: `metrics.BENCH_DRIFT_METRICS`)."""
        # a step where the controller drafted nothing says nothing about the drafter
        static = {r["step"]: r["acceptance_length"]
                  for r in self.records.get(BENCH_STATIC_METHOD, {}).get("tail", [])
                  if r.get("num_drafts")}
        rows = [{"step": u["step"], "domain": self.domains[u["step"]],
                 POLICY_KL: u.get(POLICY_KL), PARAM_DELTA_NORM: u.get(PARAM_DELTA_NORM),
                 STATIC_ACCEPTANCE_LENGTH: static.get(u["step"])} for u in self.updates]
        return {"steps": rows, **drift_summary(rows, self.final_kl,
                                               self.policy.param_delta_norm())}

    def results(self, t_start: float, not_run: dict[str, str]) -> dict:
        from atlas_rl.machine import machine_info

        cfg = self.cfg
        methods_out = {m: self.method_results(m) for m in self.methods}
        out = {
            "machine": {**machine_info(self.dtype), **self.revision},
            "config": {**asdict(cfg), "large_batch_steps": self.lb_steps,
                       "drift_step": cfg.drift_step,
                       "phase_starts": cfg.phase_starts,
                       "domains": [name for name, _ in self.pools],
                       "domain_oracle": self.oracle,
                       "engine": self.engine_config.to_dict(),
                       "not_run": not_run},
            "policy": {"updates": self.policy.updates,
                       "param_delta_norm": self.policy.param_delta_norm(),
                       "steps": self.updates},
            "drift": self.drift(),
            "methods": methods_out,
            "total_seconds": time.perf_counter() - t_start,
        }
        out["domain_gap"] = domain_gap_summary(out)
        return out


def run_bench(cfg: BenchConfig, out: str | None = None, plot: str | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns the results dict (and writes `out` / `plot`)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for module in _STACK:
        importlib.import_module(module)

    t_start = time.perf_counter()
    methods = cfg.methods
    units = (len(methods) + cfg.steps * (len(methods) * 3 + 1)
             + len(cfg.resolved_large_batch_steps()) * len(methods))
    bar = _Progress(units, enabled=progress)
    say = log or bar.log
    not_run = {m: "not installed (pip install arctic-inference)"
               for m in BENCH_METHODS
               if m not in available_methods() and m not in ON_REQUEST_METHODS}
    say(f"methods: {', '.join(methods)}"
        + (f"  (not run: {', '.join(not_run)})" if not_run else ""))
    try:
        run = _BenchRun(cfg, bar, say)
        run.build()
        for step in range(cfg.steps):
            run.step(step)
        results = run.results(t_start, not_run)
    finally:
        bar.close()
    write_results(results, out, plot)
    return results


def write_results(results: dict, out: str | None, plot: str | None) -> None:
    """The results JSON at `out` and the plot at `plot` (each where given)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))
    if plot:
        from atlas_rl.plots import plot_bench

        plot_bench(results, plot)


# --- several runs of one command, pooled -------------------------------------------

#: the config fields that may differ between runs pooled as one: the seed (the engine's
#: too, and the domain oracle it distils, where there is one), and which peers were not
#: installed
POOL_FREE_CONFIG = ("seed", "domain_oracle", "not_run")
#: the machine fields that must agree (the commit too, where both runs recorded it)
POOL_MACHINE = ("cpu", "cpu_bf16_units", "cores", "gpu", "torch", "vllm", "dtype")
#: a regime record's fields that add up over runs; the rest are averaged
_POOL_SUMS = ("rollout_seconds", "num_tokens", "num_completions", "num_drafts",
              "num_draft_tokens", "num_accepted_tokens", "engine_steps", "forward_seconds",
              "sample_seconds", "propose_seconds", "draft_seconds")


def pool_results(runs: Sequence[dict], names: Sequence[str] | None = None) -> dict:
    """Several runs of one `atlas-rl bench` command (the same config but the seed, the same
    kind of machine, dtype and commit) as one run of all their steps, so that a 10% effect
    can be told from run-to-run noise.

    Each regime's speedup is pooled over every (run, step) of every run, with its
    bootstrap interval over those units (`speedup_interval`: it resamples runs' steps, so
    what differs between runs widens it); tokens per request-step likewise. A method is
    exact only where it was exact in every run. The per-step rows (``steps``) hold each
    step's mean over the runs (tokens per request-step from the runs' pooled counts; each
    regime's record with its counts and seconds summed), so the tables, the plot and the
    domain-gap summary read a pooled result as they read one run; every run's own rows stay
    under ``run_steps``, and the domain-gap summary's second-half figures take their
    interval over the (run, step) units. ``pooled`` names the runs with their own headline
    figures. Raises ValueError, naming the field, where the runs are not of one command."""
    runs = list(runs)
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(runs))]
    if len(runs) < 2:
        raise ValueError(f"pooling needs two or more runs of one command, got {len(runs)}: "
                         f"run the same `atlas-rl bench` command again (with another "
                         f"--seed, or the same) and pass every results JSON")
    _check_poolable(runs, names)
    first = runs[0]
    seed = first["config"].get("seed") or 0
    methods = {}
    base = {reg: _run_records([r["methods"]["none"] for r in runs], reg) for reg in REGIMES}
    for m in first["methods"]:
        per_run = [r["methods"][m] for r in runs]
        exact = all(x["exactness"]["exact"] for x in per_run)
        records = {reg: _run_records(per_run, reg) for reg in REGIMES}
        regimes = {reg: summarize_regime(records[reg], exact, base[reg], seed=seed)
                   for reg in REGIMES if records[reg]}
        summary = {k: regimes["tail"][k] for k in BENCH_SUMMARY_KEYS}
        summary["speedup_ci"] = regimes["tail"].get("speedup_ci")
        summary["entropy"] = regimes["tail"].get("entropy")
        d = first["config"].get("drift_step")
        if d is not None:
            tail = records["tail"]
            summary["acceptance_length_pre_drift"] = median(
                [r.get("acceptance_length") for r in tail if r["step"][1] < d])
            summary["acceptance_length_post_drift"] = median(
                [r.get("acceptance_length") for r in tail if r["step"][1] >= d])
        checks = [(x["summary"].get("gate_checks") or 0, x["summary"].get("gate_error_rate"))
                  for x in per_run]
        n_checks = sum(n for n, _ in checks)
        summary["gate_checks"] = n_checks
        summary["gate_error_rate"] = (sum(n * e for n, e in checks if n and e is not None)
                                      / n_checks if n_checks else None)
        if m == "none":
            summary["speedup"] = 1.0
        exactness = {"exact": exact, "runs": [x["exactness"] for x in per_run]}
        time_ = {k: sum((x.get("time") or {}).get(k, 0.0) or 0.0 for x in per_run)
                 for k in (per_run[0].get("time") or {})}
        methods[m] = {"summary": summary, "regimes": regimes,
                      "steps": _pooled_step_rows([x["steps"] for x in per_run], exact),
                      "run_steps": [x["steps"] for x in per_run],
                      "exactness": exactness, "time": time_}
    out = {"machine": first["machine"], "config": dict(first["config"]),
           "policy": first.get("policy"), "drift": first.get("drift"), "methods": methods,
           "total_seconds": sum(r.get("total_seconds") or 0.0 for r in runs),
           "pooled": {"runs": [
               {"name": n, "seed": r["config"].get("seed"),
                "commit": r["machine"].get("commit"),
                "speedup": {m: (x["summary"].get("speedup"), x["summary"].get("speedup_ci"))
                            for m, x in r["methods"].items()}}
               for n, r in zip(names, runs)]}}
    out["config"]["seed"] = [r["config"].get("seed") for r in runs]
    out["domain_gap"] = domain_gap_summary(out)
    if out["domain_gap"]:
        per_run = [domain_gap_summary(r) or [] for r in runs]
        for i, row in enumerate(out["domain_gap"]):
            row["runs"] = [{k: rows[i].get(k) for k in (
                "atlas_over_static_last", "atlas_over_static_worst", "second_half",
                "gap_closed_second_half")} for rows in per_run if i < len(rows)]
    return out


def _check_poolable(runs: list[dict], names: list[str]) -> None:
    """Refuse runs that are not of one command on one kind of machine and one commit, and
    one run given twice (its steps would count twice and narrow every interval)."""
    for i, run in enumerate(runs):
        for j in range(i):
            if runs[j] == run:
                raise ValueError(f"{names[j]} and {names[i]} are the same run (identical "
                                 f"results): pool different runs of the command")
    first, name0 = runs[0], names[0]
    for run, name in zip(runs[1:], names[1:]):
        a, b = _poolable_config(first["config"]), _poolable_config(run["config"])
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                raise ValueError(f"{name0} and {name} are not runs of one command: config "
                                 f"{k!r} is {a.get(k)!r} against {b.get(k)!r}; pool only runs "
                                 f"of the same `atlas-rl bench` command (the seed may differ)")
        ma, mb = first["machine"], run["machine"]
        for k in POOL_MACHINE:
            if ma.get(k) != mb.get(k):
                raise ValueError(f"{name0} and {name} ran on different machines or stacks: "
                                 f"{k} {ma.get(k)!r} against {mb.get(k)!r}; a speedup "
                                 f"pooled over them would be neither's")
        ca, cb = ma.get("commit"), mb.get("commit")
        if ca and cb and ca != cb:
            raise ValueError(f"{name0} and {name} ran different code: commit {ca} against "
                             f"{cb}; pool runs of one commit")
        if set(first["methods"]) != set(run["methods"]):
            raise ValueError(f"{name0} and {name} ran different methods: "
                             f"{sorted(first['methods'])} against {sorted(run['methods'])}")


def _poolable_config(config: dict) -> dict:
    """A run's config less what may differ between runs pooled as one
    (`POOL_FREE_CONFIG`), the engine's seed included (--seed sets it)."""
    out = {k: v for k, v in config.items() if k not in POOL_FREE_CONFIG}
    if isinstance(out.get("engine"), dict):
        out["engine"] = {k: v for k, v in out["engine"].items() if k != "seed"}
    return out


def _run_records(per_run: list[dict], regime: str) -> list[dict]:
    """One regime's step records of every run, each keyed by (run, step)."""
    return [{**row["regimes"][regime], "step": (i, row["step"])}
            for i, x in enumerate(per_run) for row in x["steps"]
            if regime in row.get("regimes", {})]


def _pooled_step_rows(run_rows: list[list[dict]], exact: bool) -> list[dict]:
    """Per step, the runs' rows as one: numbers averaged (tokens per request-step from the
    pooled counts), each regime's record with counts and seconds summed."""
    by_step: dict[int, list[dict]] = {}
    for rows in run_rows:
        for r in rows:
            by_step.setdefault(r["step"], []).append(r)
    out = []
    for step in sorted(by_step):
        rows = by_step[step]
        row = _pooled_record(rows, sums=())
        row.update(step=step, domain=rows[0].get("domain"), epoch=rows[0].get("epoch"))
        regimes = {}
        for reg in REGIMES:
            recs = [r["regimes"][reg] for r in rows if reg in r.get("regimes", {})]
            if recs:
                regimes[reg] = _pooled_record(recs, sums=_POOL_SUMS)
                regimes[reg]["step"] = step
                secs = regimes[reg].get("rollout_seconds")
                if secs and regimes[reg].get("num_tokens"):
                    regimes[reg]["tokens_per_s"] = regimes[reg]["num_tokens"] / secs
        row["regimes"] = regimes
        if "tail" in regimes:
            row["speedup_estimate"] = tokens_per_request_step(
                [r["regimes"]["tail"] for r in rows if "tail" in r.get("regimes", {})])
        if not exact:
            row["speedup"] = None
        out.append(row)
    return out


def _pooled_record(recs: list[dict], sums: Sequence[str]) -> dict:
    """Records as one: the fields in ``sums`` added, other numbers averaged over the
    records that have them (lists element-wise where of one length), the rest the first's."""
    out = {}
    for k in dict.fromkeys(k for r in recs for k in r):
        vals = [r.get(k) for r in recs if r.get(k) is not None]
        if not vals:
            out[k] = None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[k] = sum(vals) if k in sums else statistics.fmean(vals)
        elif all(isinstance(v, list) for v in vals) and len({len(v) for v in vals}) == 1 \
                and all(isinstance(x, (int, float)) for v in vals for x in v):
            out[k] = [statistics.fmean(col) for col in zip(*vals)]
        else:
            out[k] = vals[0]
    return out


def pool_headline(results: dict) -> str:
    """What was pooled: the runs, their seeds and commits, each run's tail speedups."""
    pooled = results.get("pooled")
    if not pooled:
        return ""
    lines = [(f"pooled: {len(pooled['runs'])} runs of one command, every (run, step) a unit "
              f"of the bootstrap; each run's tail speedup:")]
    for r in pooled["runs"]:
        lines.append(f"  {r['name']} (seed {r['seed']}, commit {r['commit'] or 'not recorded'}): "
                     + ", ".join(f"{m} {format_speedup(*v)}" for m, v in r["speedup"].items()
                                 if m != "none"))
    return "\n".join(lines)


def _bf16_units(mach: dict) -> str:
    units = mach.get("cpu_bf16_units")  # absent from results written before it was recorded
    return "bf16 units not recorded" if units is None else \
        ("with bf16 units" if units else "without bf16 units")


def headline(results: dict) -> str:
    """The lines printed above the table: what ran, where."""
    c, mach = results["config"], results["machine"]
    drift = (f"drift {c['domains'][0]} -> {c['domains'][1]} at step {c['drift_step'] + 1}"
             if c.get("drift_step") is not None else f"domain {c['domains'][0]}")
    if c.get("workload") == "domain-gap":
        bounds = [*c["phase_starts"], c["steps"]]
        drift = "domain gap: " + ", ".join(
            f"{d} (steps {bounds[i] + 1}-{bounds[i + 1]})" for i, d in enumerate(c["domains"]))
    if c.get("workload") in ("epochs", "domain-gap"):
        n = c["epoch_steps"]
        drift += f", epochs of {n} step{'s' if n != 1 else ''} (prompts come back)"
    return (f"atlas-rl bench: {c['model']}, temperature {c['temperature']}, {c['steps']} steps "
            f"({drift}), tail = 1 prompt x {min(c['completions'], c['tail_sequences'])}, "
            f"large batch = {c['prompts_per_step']} x {c['completions']} on steps "
            f"{', '.join(str(s + 1) for s in c['large_batch_steps'])}, "
            f"{c['max_tokens']} tokens (tail: fixed length; tail_rl: at most), "
            f"{c['large_batch_max_tokens']} max (large); speedups pooled over steps with a "
            f"90% bootstrap interval, the rest medians over steps\n"
            f"machine: {mach['cpu']} ({_bf16_units(mach)}), {mach['cores']} cores, GPU: "
            f"{mach['gpu'] or 'none'}; torch {mach['torch']}, vLLM {mach['vllm']}, dtype "
            f"{mach['dtype']} (exactness judged in it); "
            f"{results['total_seconds'] / 60:.1f} min")

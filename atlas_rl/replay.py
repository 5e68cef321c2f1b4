"""Adaptation replayed offline: the domain-gap workload's rollouts captured once, then the
adaptive drafter's online updates replayed batch by batch, every drafter scored on each
batch before the adaptive one learns it.

Why: in the engine a drafter's worth shows through the controller (how often it lets the
drafter draft, and how far), the sampling of each method's own completions and the
host's speed; at 4 sequences x 128 tokens a step, one domain step moves +-0.15 in
acceptance length between two runs of one commit, and 16 steps do not resolve a 10%
difference between drafters (BENCHMARKS.md, the domain gap). Here every drafter sees the
same rows, the policy's own hidden states and next-token distributions at the positions
it sampled, so the comparison is paired and its interval is over hundreds of positions a
batch: a recipe of adaptation (learning rate, passes, budget, replay, the draft
vocabulary's refresh) is judged in minutes, not in a 19-minute benchmark.

What is scored (`drafter_acceptance`): a distribution draft's acceptance at draft
positions 1..`LOOKAHEAD`, sum_v min(p_v, q_v) with the policy's full-vocabulary p (so
the draft vocabulary's coverage counts); reported as the first position's (the measure
of the publish gate and of `atlas-rl train-speculator`'s held-out figures) and as the
expected tokens of a verification at the lookahead.

What differs from the engine is `DIFFERENCES`, carried by every result (the runs of
record found policy drift of a GRPO run's size moves acceptance by 0-3%, the prompts by
17-20%; in the tail the engine's learning budget gives the whole share,
`learn_opportunity` 1.0).

    python scripts/replay_adaptation.py --recipe default --recipe lr3e-3:lr=3e-3
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

#: What a recipe may set (`Recipe`), with the engine's defaults.
RECIPE_DEFAULTS = {
    "lr": 1e-3,              # AtlasConfig.drafter_lr
    "max_epochs": 2,         # passes over the buffer per update, within the budget
    "batch_rows": 256,
    "max_buffer_rows": 16384,
    "gate": "next-batch",    # AtlasConfig.drafter_publish_gate: next-batch, held-out, off
    "gate_z": 2.0,           # Distiller.gate_z: refuse a candidate worse by this many SEs
    "budget_s": 0.34,        # seconds of training per batch (the tail's 10% here)
    "count_decay": 0.7,      # NeuralSpeculator.COUNT_DECAY
    "refresh_margin": 0.01,  # NeuralSpeculator.REFRESH_MARGIN
    "vocab_prior": 1.0,      # counts a static drafter's vocabulary starts with, per token
    "loss": "tv",            # AtlasConfig.drafter_loss: tv or ce
    "cpu_bf16": None,        # training under bf16 autocast on the CPU (None: where it has
                             # bf16 units, `distill._autocast`)
}


@dataclass
class Recipe:
    """One way of adapting: a name and the fields of `RECIPE_DEFAULTS` it changes."""

    name: str
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        bad = sorted(set(self.settings) - set(RECIPE_DEFAULTS))
        if bad:
            raise ValueError(f"recipe {self.name!r}: unknown setting(s) {bad}; choose from "
                             f"{', '.join(RECIPE_DEFAULTS)}")

    def get(self, key: str):
        return self.settings.get(key, RECIPE_DEFAULTS[key])

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """``NAME`` or ``NAME:FIELD=VALUE,FIELD=VALUE`` (values as JSON, or true/false)."""
        name, _, rest = text.partition(":")
        settings = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"recipe {text!r}: expected FIELD=VALUE, got {item!r}")
            key = key.strip()
            try:
                settings[key] = json.loads(value)
            except json.JSONDecodeError:
                if not isinstance(RECIPE_DEFAULTS.get(key), str):
                    raise ValueError(f"recipe {text!r}: {key}'s value {value!r} is not a "
                                     f"number or true/false") from None
                settings[key] = value.strip()  # a word: the setting checks it
        return cls(name.strip() or "default", settings)


@dataclass
class ReplayConfig:
    """The rollouts to capture: the domain-gap workload's tail prompts (`atlas-rl bench
    --workload domain-gap` with the same domains, steps and seed draws the same ones),
    `batches_per_step` groups of `completions` each (the bench's RL tail and its
    fixed-length tail)."""

    model: str = "smollm2-135m-instruct"
    domains: list[str] = field(default_factory=lambda: ["javascript", "code-php"])
    steps: int = 16
    completions: int = 4
    max_tokens: int = 128
    batches_per_step: int = 2
    seed: int = 0
    dtype: str = "float32"

    def bench_config(self):
        from atlas_rl.bench import BenchConfig

        return BenchConfig(model=self.model, workload="domain-gap", domains=list(self.domains),
                           steps=self.steps, completions=self.completions,
                           max_tokens=self.max_tokens, seed=self.seed, dtype=self.dtype,
                           methods=["none"])


@dataclass
class CapturedBatch:
    """One batch's training rows (h_t, x_{t+1}, h_{t+1}) and every token it sampled."""

    step: int
    domain: str
    h: torch.Tensor
    tok: torch.Tensor
    target: torch.Tensor
    sampled: torch.Tensor


def tail_prompts(cfg: ReplayConfig) -> list[tuple[int, str, object]]:
    """(step, domain, prompt) of every step: the bench's tail prompt of that step."""
    from atlas_rl.bench import _domain_pools, _step_prompts

    bcfg = cfg.bench_config()
    pools = _domain_pools(bcfg)
    out = []
    for step in range(cfg.steps):
        domain, pool = pools[min(bcfg.domain_phase(step), len(pools) - 1)]
        drawn = _step_prompts(pool, bcfg.prompt_slot(step), bcfg.prompts_per_step + 2)
        out.append((step, domain, drawn[0]))
    return out


def capture_path(cfg: ReplayConfig, model_path: str, directory: Path | None = None) -> Path:
    """Where a capture of `cfg` is cached (keyed by the model's files and the settings):
    in `directory`, by default ``$ATLAS_RL_CACHE/replay``."""
    from atlas_rl.models import cache_dir

    files = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime))
                   for f in Path(model_path).iterdir() if f.is_file())
    key = hashlib.sha256(json.dumps({"cfg": asdict(cfg), "files": files,
                                     "model": str(Path(model_path).resolve())},
                                    sort_keys=True).encode()).hexdigest()[:16]
    name = f"{Path(model_path).name}-{'+'.join(cfg.domains)}-{key}.pt"
    return (directory or cache_dir() / "replay") / name


def capture(cfg: ReplayConfig, say: Callable[[str], None] = print,
            directory: Path | None = None) -> tuple[list[CapturedBatch], Path]:
    """The rollouts' training rows, batch by batch: from the cache, or generated now
    (vLLM, temperature 1, speculation off while atlas's proposer captures the policy's
    hidden states, as `atlas-rl train-speculator` does)."""
    from atlas_rl.models import resolve_model

    path = resolve_model(cfg.model)
    out = capture_path(cfg, path, directory)
    if out.is_file():
        say(f"captured rollouts: {out} (cached)")
        return [CapturedBatch(**b) for b in torch.load(out)["batches"]], out
    from atlas_rl import AtlasConfig, AtlasRolloutEngine
    from atlas_rl.bench import _as_engine_prompt

    engine = AtlasRolloutEngine(path, "atlas", AtlasConfig(
        max_speculation_batch_size=0, static_speculator="none", dtype=cfg.dtype, seed=cfg.seed))
    neural = engine.speculators["neural"]
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    batches, t0 = [], time.perf_counter()
    for step, domain, prompt in tail_prompts(cfg):
        for j in range(cfg.batches_per_step):
            engine.generate([_as_engine_prompt(prompt.prompt, chat, [True])],
                            n=cfg.completions, temperature=1.0, max_tokens=cfg.max_tokens,
                            seed=cfg.seed * 1_000_003 + step * 101 + j, ignore_eos=j % 2 == 1)
            sampled: list = []
            rows = neural.take_captured(sampled=sampled)
            if rows is None:
                continue
            batches.append(CapturedBatch(step, domain, *(t.clone() for t in rows),
                                         torch.cat(sampled).long()))
        say(f"capture step {step + 1}/{cfg.steps} [{domain}]: {len(batches)} batches, "
            f"{sum(len(b.tok) for b in batches):,} rows, {time.perf_counter() - t0:.0f} s")
    engine.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(cfg), "batches": [vars(b) for b in batches]}, out)
    return batches, out


def policy_tensors(model: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's token embedding and LM head [V, d], float32 (transformers)."""
    from transformers import AutoModelForCausalLM

    from atlas_rl.models import resolve_model

    m = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)
    embed = m.get_input_embeddings().weight.detach().clone()
    head = m.get_output_embeddings().weight.detach().clone()
    del m
    return embed, head


def load_drafter(directory: str | None, embed: torch.Tensor, head: torch.Tensor,
                 recipe: Recipe | None = None, seed: int = 0):
    """A `NeuralSpeculator` attached to the policy's tensors: loaded from `directory`
    (an MLP drafter), or fresh (None: no static drafter, learning from nothing); frozen
    unless a recipe adapts it."""
    from atlas_rl.speculators import NeuralSpeculator

    r = recipe or Recipe("frozen")
    spec = NeuralSpeculator(lr=r.get("lr"), max_buffer_rows=r.get("max_buffer_rows"),
                            batch_rows=r.get("batch_rows"), max_epochs=r.get("max_epochs"),
                            frozen=recipe is None, seed=seed, gate=r.get("gate"))
    spec.distiller.cpu_bf16 = r.get("cpu_bf16")
    spec.distiller.loss = r.get("loss")
    spec.distiller.gate_z = float(r.get("gate_z"))
    spec.COUNT_DECAY = r.get("count_decay")
    spec.REFRESH_MARGIN = r.get("refresh_margin")
    if directory is not None:
        spec.load(directory)
    spec.attach_target(embed, head)
    if recipe is not None and spec.vocab is not None and spec.vocab_source == "static":
        spec.token_counts.zero_()
        spec.token_counts[spec.vocab] = float(r.get("vocab_prior"))
    return spec


@torch.no_grad()
def policy_probs(b: CapturedBatch, head: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The policy's next-token distribution p at every row of a batch [rows, V] (float32),
    from the next hidden state and the full LM head."""
    head = head.float()
    return torch.cat([torch.softmax(b.target[s:s + chunk].float() @ head.T, dim=-1)
                      for s in range(0, len(b.tok), chunk)])


def continues(b: CapturedBatch) -> torch.Tensor:
    """[rows] bool: row i + 1 is the next position of row i's completion (the hidden
    state row i predicts is row i + 1's); False at a completion's end."""
    out = torch.zeros(len(b.tok), dtype=torch.bool)
    out[:-1] = b.h[1:].eq(b.target[:-1]).all(-1)
    return out


@torch.no_grad()
def drafter_acceptance(spec, b: CapturedBatch, p: torch.Tensor, lookahead: int = 3,
                       chunk: int = 256) -> torch.Tensor:
    """[rows, lookahead]: at each row, the acceptance of `spec`'s distribution draft at
    draft positions 1..lookahead, each given the earlier ones accepted: sum_v min(p_v,
    q_v) against the policy's full-vocabulary p (`policy_probs`; the draft vocabulary's
    coverage counts). Position j + 1 drafts as the engine does, from the drafter's own
    output at position j, with the token the policy sampled there (teacher forcing: the
    accepted draft is that token in part of the cases only), and is scored against p at
    that position. 0 past a completion's end, and everywhere for a drafter with no draft
    vocabulary yet. Drafting runs in float32 here (bf16 in the engine on CPUs with bf16
    units)."""
    n = len(b.tok)
    out = torch.zeros(n, lookahead)
    if spec.vocab is None or n == 0:
        return out
    vocab, head_sub = spec.draft_head_rows()  # the draft vocabulary and its head rows
    embed = spec._embed
    cont = continues(b)
    rows = torch.arange(n)
    y = b.h.float()
    valid = torch.ones(n, dtype=torch.bool)
    for j in range(lookahead):
        at = (rows + j).clamp_max(n - 1)  # the position drafted at position j + 1
        if j:
            valid &= cont[(rows + j - 1).clamp_max(n - 1)] & (rows + j < n)
        ys = []
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            ys.append(spec.net(y[sl], embed.index_select(0, b.tok[at[sl]]).float()))
        y = torch.cat(ys)
        q = torch.softmax(y @ head_sub.T, dim=-1)
        acc = torch.minimum(p[at].index_select(1, vocab), q).sum(-1)
        out[:, j] = torch.where(valid, acc, torch.zeros(()))
    return out


def expected_lengths(alpha: torch.Tensor) -> torch.Tensor:
    """Per row, the expected tokens of a verification at this lookahead (the bonus token
    included): 1 + sum_j prod_{i<=j} alpha_i (`distill.expected_length`, row-wise)."""
    return 1.0 + torch.cumprod(alpha, dim=1).sum(1)


def paired_ratio(a: torch.Tensor, b: torch.Tensor, seed: int = 0, block: int = 32,
                 draws: int = 1000) -> tuple[float, float, float]:
    """mean(a) / mean(b) on the same rows, with a 90% bootstrap interval over blocks of
    consecutive rows (neighbouring positions of one completion are not independent)."""
    n = len(a) // block * block
    if n == 0 or float(b.sum()) <= 0:
        return float("nan"), float("nan"), float("nan")
    sa, sb = a[:n].view(-1, block).sum(1), b[:n].view(-1, block).sum(1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(sa), (draws, len(sa)), generator=g)
    ratios = sa[idx].sum(1) / sb[idx].sum(1).clamp_min(1e-12)
    lo, hi = torch.quantile(ratios, torch.tensor([0.05, 0.95])).tolist()
    return float(a[:n].sum() / b[:n].sum()), lo, hi


#: What a replay does not do as the engine does (every result carries it).
DIFFERENCES = ("the policy takes no GRPO steps between batches",
               "the adaptive drafter learns every batch (the tail's learning budget share 1.0)",
               "the large batches are not replayed",
               "drafting is scored in float32 (bf16 in the engine on CPUs with bf16 units)",
               "later draft positions are teacher-forced on the tokens the policy sampled")

#: What each drafter is scored by, per row: first-position acceptance, and the expected
#: tokens of a verification at `LOOKAHEAD` draft tokens
LOOKAHEAD = 3
METRICS = ("accept1", "length")


def _row_scores(spec, b: CapturedBatch, p: torch.Tensor) -> dict[str, torch.Tensor]:
    alpha = drafter_acceptance(spec, b, p, LOOKAHEAD)
    return {"accept1": alpha[:, 0], "length": expected_lengths(alpha)}


def step_summary(scores: dict[str, dict[str, torch.Tensor]], seed: int = 0) -> dict:
    """One step's rows scored by each drafter ({drafter: {metric: [rows]}}): each mean,
    the adaptive drafter's ratio to the static one with its interval, and its share of
    the way from the static drafter to the oracle."""
    out = {}
    for m in METRICS:
        row = {name: float(v[m].mean()) for name, v in scores.items()}
        if "adaptive" in scores:
            row["vs_static"] = list(paired_ratio(scores["adaptive"][m], scores["static"][m], seed))
            _add_share(row)
        out[m] = row
    return out


def _add_share(means: dict) -> None:
    """The adaptive drafter's share of the way from the static one to the oracle, where
    the oracle is above the static one."""
    if "oracle" in means and means["oracle"] - means["static"] > 1e-9:
        means["share_of_way"] = (means["adaptive"] - means["static"]) / \
            (means["oracle"] - means["static"])


def _by_step(batches: list[CapturedBatch]) -> list[list[int]]:
    groups: dict = {}
    for i, b in enumerate(batches):
        groups.setdefault(b.step, []).append(i)
    return list(groups.values())


def replay(batches: list[CapturedBatch], embed: torch.Tensor, head: torch.Tensor,
           static_dir: str | None, oracle_dir: str | None, recipes: list[Recipe],
           seed: int = 0, say: Callable[[str], None] = print) -> dict:
    """Every recipe's adaptive drafter, started from `static_dir`, learns the batches in
    order; before it learns a batch, it, the static drafter and the oracle are scored on
    it (`drafter_acceptance`: first-position acceptance and expected length at
    `LOOKAHEAD`). Returns per step (`step_summary`) and per recipe the three drafters'
    scores, the adaptive one's ratio to the static one (90% interval) and its share of
    the way to the oracle, and what each update did."""
    fixed = {"static": load_drafter(static_dir, embed, head)}
    if oracle_dir is not None:
        fixed["oracle"] = load_drafter(oracle_dir, embed, head)
    fixed_rows = []
    for b in batches:
        p = policy_probs(b, head)
        fixed_rows.append({name: _row_scores(s, b, p) for name, s in fixed.items()})
    out = {"lookahead": LOOKAHEAD, "differs_from_the_engine": DIFFERENCES, "steps": [],
           "recipes": {}}
    groups = _by_step(batches)
    fixed_by_step = [{name: {m: torch.cat([fixed_rows[i][name][m] for i in idx])
                             for m in METRICS} for name in fixed} for idx in groups]
    for idx, cat in zip(groups, fixed_by_step):
        b = batches[idx[0]]
        out["steps"].append({"step": b.step, "domain": b.domain,
                             "rows": sum(len(batches[i].tok) for i in idx),
                             **step_summary(cat, seed)})
    for recipe in recipes:
        torch.manual_seed(seed)
        random.seed(seed)
        spec = load_drafter(static_dir, embed, head, recipe, seed)
        updates, adaptive_rows, t0 = [], [], time.perf_counter()
        for b in batches:
            adaptive_rows.append(_row_scores(spec, b, policy_probs(b, head)))
            spec.add_captured((b.h, b.tok, b.target))
            spec._foreign_tokens = [b.sampled]  # every token the batch sampled
            upd = spec.learn(time_budget=recipe.get("budget_s"))
            updates.append({"step": b.step, **{k: upd[k] for k in (
                "drafter_rows", "drafter_published", "drafter_train_seconds",
                "drafter_rolled_back", "drafter_gate_right", "drafter_gate_check_margin",
                "draft_vocab_coverage", "draft_vocab_refreshed") if k in upd}})
        steps = []
        for idx, cat in zip(groups, fixed_by_step):
            b = batches[idx[0]]
            adaptive = {m: torch.cat([adaptive_rows[i][m] for i in idx]) for m in METRICS}
            steps.append({"step": b.step, "domain": b.domain,
                          **step_summary({**cat, "adaptive": adaptive}, seed)})
        out["recipes"][recipe.name] = {"settings": {k: recipe.get(k) for k in RECIPE_DEFAULTS},
                                       "steps": steps, "updates": updates,
                                       "seconds": time.perf_counter() - t0}
        say(f"recipe {recipe.name}: {time.perf_counter() - t0:.0f} s")
    return out


def by_domain_step(result: dict, recipe: str, metric: str = "length") -> list[dict]:
    """A recipe's steps as rows: domain, the step's number within its domain, and for
    `metric` the static / adaptive / oracle means, the ratio (with its interval) and the
    share of the way to the oracle."""
    out, seen = [], {}
    for st in result["recipes"][recipe]["steps"]:
        seen[st["domain"]] = seen.get(st["domain"], 0) + 1
        out.append({"domain": st["domain"], "step": st["step"],
                    "domain_step": seen[st["domain"]], **st[metric]})
    return out


def format_replay(result: dict, metric: str = "length") -> str:
    """A table per recipe, a row per step: `metric` (expected length at the lookahead, or
    first-position acceptance) of the static, adaptive and oracle drafters, the adaptive
    one's ratio to the static one (90% interval) and its share of the way to the oracle."""
    what = (f"expected tokens per verification at lookahead {result['lookahead']}"
            if metric == "length" else "first-position acceptance")
    lines = [f"{what}, each drafter on each step's rows before the adaptive one learns them"]
    for name, rec in result["recipes"].items():
        changed = ", ".join(f"{k}={v}" for k, v in rec["settings"].items()
                            if v != RECIPE_DEFAULTS[k])
        lines.append(f"recipe {name}" + (f" ({changed})" if changed else " (the engine's)"))
        lines.append("  domain       step  static  adaptive  oracle  adaptive/static      share")
        for r in by_domain_step(result, name, metric):
            ratio, lo, hi = r["vs_static"]
            share = r.get("share_of_way")
            lines.append(f"  {r['domain']:<12} {r['domain_step']:>4}  {r['static']:.3f}   "
                         f"{r['adaptive']:.3f}    {r.get('oracle', float('nan')):.3f}   "
                         f"{ratio:.3f} ({lo:.3f}-{hi:.3f})  "
                         f"{'-' if share is None else f'{share:.0%}'}")
    return "\n".join(lines)


def domain_summary(result: dict, recipe: str, metric: str = "length") -> list[dict]:
    """Per domain: `metric`'s means over the first and the second half of its steps for
    the static, adaptive and oracle drafters, the adaptive one's share of the way there,
    and its ratio to the static drafter at the domain's last step (with the interval)."""
    rows = by_domain_step(result, recipe, metric)
    out = []
    for domain in dict.fromkeys(r["domain"] for r in rows):
        mine = [r for r in rows if r["domain"] == domain]
        half = (len(mine) + 1) // 2
        entry = {"domain": domain, "steps": len(mine), "last_vs_static": mine[-1]["vs_static"]}
        for part, sel in (("first", mine[:half]), ("second", mine[half:] or mine[:half])):
            means = {k: sum(r[k] for r in sel) / len(sel)
                     for k in ("static", "adaptive", "oracle") if k in sel[0]}
            _add_share(means)
            entry[part] = means
        out.append(entry)
    return out


def _half(means: dict) -> str:
    share = means.get("share_of_way")
    return (f"{means['static']:.3f} {means['adaptive']:.3f} "
            f"{means.get('oracle', float('nan')):.3f} "
            f"({'-' if share is None else f'{share:.0%}'})")


def format_domain_summary(result: dict, metric: str = "length") -> str:
    """`domain_summary` of every recipe, a line per domain."""
    lines = [f"per domain, first / second half of its steps ({metric}): static, adaptive, "
             f"oracle, share of the way; the last step's adaptive/static"]
    for name in result["recipes"]:
        for e in domain_summary(result, name, metric):
            r, lo, hi = e["last_vs_static"]
            lines.append(f"  {name:<16} {e['domain']:<12} {_half(e['first'])} | "
                         f"{_half(e['second'])} | last {r:.3f} ({lo:.3f}-{hi:.3f})")
    return "\n".join(lines)

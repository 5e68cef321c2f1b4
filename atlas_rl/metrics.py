"""Speculation metrics: one definition each, the same names everywhere.

- acceptance_length: tokens per target forward pass of a drafting request, bonus
  token included: 1 + accepted / drafts (vLLM's "mean acceptance length"). 1.0 without
  speculation.
- acceptance_rate: accepted draft tokens / drafted (verified) tokens.
- acceptance_rate_pos_{i}: the same at draft position i (0-based).
- lookahead: mean drafted tokens per drafting request-step; lookahead_hist counts
  request-steps by the lookahead the proposer chose (0 = no draft).
- tokens_per_s, rollout_seconds: completion tokens over wall time of a generate call.
- propose_seconds / draft_seconds: time in atlas-rl's proposer per step (feedback
  bookkeeping + drafting) and the drafting part of it.
- oracle_acceptance_length: the expected acceptance length at lookahead k of a
  drafter that always proposes the policy's most likely token, from the top-1
  probabilities along the rollouts (the ceiling of one-hot drafting).
- drafts_history: share of the suffix index's verified drafts that came from the
  request's own prompt's corpus (its earlier completions, its live siblings) rather
  than the global one; acceptance_length_history / acceptance_length_global: how
  well each did; num_history_drafts / num_global_drafts: the counts.

The registry of names at the end of this module (`TRAINER_METRICS`, `trainer_metrics`,
the `BENCH_*` keys) is what the TRL integration, the wandb dashboard, `atlas-rl bench`
and `atlas-rl demo` use; `median` and `fmt` are their one median and number formatter.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

#: The drafting arms the controller chooses between: a speculator and a draft kind
#: (one-hot, or "-dist": a distribution draft whose q goes to the verifier).
ARMS = ("suffix", "suffix-dist", "neural", "neural-dist")


@dataclass
class SpecCounters:
    """Cumulative counters; take differences around a call (`since`)."""

    num_drafts: int = 0           # request-steps whose draft was verified (len > 0)
    num_draft_tokens: int = 0     # verified draft tokens
    num_accepted_tokens: int = 0
    drafted_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)
    request_steps: int = 0        # decode request-steps seen by the proposer
    lookahead_hist: list[int] = field(default_factory=list)
    speculator_errors: int = 0
    propose_seconds: float = 0.0  # all of the proposer's time in a step
    draft_seconds: float = 0.0    # of which: the speculator drafting and the controller trimming
    # per arm (ARMS order): verified drafts, their tokens, accepted tokens
    arm_drafts: list[int] = field(default_factory=list)
    arm_draft_tokens: list[int] = field(default_factory=list)
    arm_accepted_tokens: list[int] = field(default_factory=list)
    # of those, drafts from a prompt's own corpus (`Draft.from_history`)
    history_drafts: int = 0
    history_draft_tokens: int = 0
    history_accepted_tokens: int = 0
    # engine steps by batch size (bucket b: batches of 2**(b-1) < size <= 2**b), and of
    # those the steps the controller drafted in: speculation on/off as the batch grows
    batch_steps: list[int] = field(default_factory=list)
    batch_drafting_steps: list[int] = field(default_factory=list)
    # engine steps the controller closed drafting in, by reason (CLOSED_REASONS order),
    # and of those the ones that planned an explore-rate probe
    closed_steps: list[int] = field(default_factory=list)
    probe_steps: int = 0

    def record_verified(self, num_verified: int, num_accepted: int, arm: str = "",
                        history: bool = False) -> None:
        """One request-step: `num_verified` draft tokens checked, the first
        `num_accepted` of them accepted (no draft: nothing to record); `arm` is the
        drafting arm's label (`speculators.base.Arm.label`); `history`: the draft came
        from the request's own prompt's corpus (`Draft.from_history`)."""
        if num_verified > 0:
            self.add(1, num_verified, num_accepted, [1] * num_verified, [1] * num_accepted)
            if history:
                self.history_drafts += 1
                self.history_draft_tokens += num_verified
                self.history_accepted_tokens += num_accepted
            if arm in ARMS:
                i = ARMS.index(arm)
                for xs, v in ((self.arm_drafts, 1), (self.arm_draft_tokens, num_verified),
                              (self.arm_accepted_tokens, num_accepted)):
                    _grow(xs, len(ARMS))
                    xs[i] += v

    def add(self, num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int,
            drafted_per_pos: Sequence[int], accepted_per_pos: Sequence[int]) -> None:
        """Add counts aggregated elsewhere (e.g. one scheduler step of vLLM)."""
        self.num_drafts += num_drafts
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for dst, src in ((self.drafted_per_pos, drafted_per_pos),
                         (self.accepted_per_pos, accepted_per_pos)):
            _grow(dst, len(src))
            for i, v in enumerate(src):
                dst[i] += v

    def record_batch(self, batch_size: int, drafting: bool, closed: str | None = None,
                     probe: bool = False) -> None:
        """An engine step of `batch_size` requests, drafting or not; `closed`: why the
        controller closed drafting there (`CLOSED_REASONS`), `probe`: a closed step that
        planned a probe of the cost anyway."""
        if batch_size < 1:
            return
        b = batch_bucket(batch_size)
        _grow(self.batch_steps, b + 1)
        _grow(self.batch_drafting_steps, b + 1)
        self.batch_steps[b] += 1
        self.batch_drafting_steps[b] += int(drafting)
        if closed in CLOSED_REASONS:
            _grow(self.closed_steps, len(CLOSED_REASONS))
            self.closed_steps[CLOSED_REASONS.index(closed)] += 1
            self.probe_steps += int(probe)

    def record_lookahead(self, lookahead: int) -> None:
        _grow(self.lookahead_hist, lookahead + 1)
        self.lookahead_hist[lookahead] += 1

    def copy(self) -> SpecCounters:
        return SpecCounters(**{f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                               for f in fields(self)})

    def since(self, earlier: SpecCounters) -> SpecCounters:
        out = SpecCounters()
        for f in fields(self):
            now, then = getattr(self, f.name), getattr(earlier, f.name)
            if isinstance(now, list):
                then = then + [0] * (len(now) - len(then))
                setattr(out, f.name, [a - b for a, b in zip(now, then)])
            else:
                setattr(out, f.name, now - then)
        return out


#: Why the controller planned no drafting for an engine step (`AtlasController.plan_step`).
CLOSED_REASONS = ("base", "cap", "cost", "cut", "value")
CLOSED_REASON_HELP = {
    "base": "measuring what a step costs without speculation at this batch size",
    "cap": "over max_speculation_batch_size",
    "cost": "drafting cannot pay even at the best acceptance the arms have shown",
    "cut": "the goodput cut dropped every draft for cut_patience steps",
    "value": "the drafting steps were worth less than nothing on average",
}


def summarize_plans(c: SpecCounters) -> dict[str, float]:
    """Shares of the proposer's engine steps in which the controller closed drafting,
    per reason (`closed_by_{reason}`), and of those the ones that planned a probe
    (`closed_probe_steps`)."""
    total = sum(c.batch_steps)
    if not total:
        return {}
    out = {f"closed_by_{r}": (c.closed_steps[i] if i < len(c.closed_steps) else 0) / total
           for i, r in enumerate(CLOSED_REASONS)}
    out["closed_probe_steps"] = c.probe_steps / total
    return out


def batch_bucket(batch_size: int) -> int:
    """0 for 1 request, 1 for 2, 2 for 3-4, 3 for 5-8, ...: ceil(log2(size))."""
    return max(0, int(batch_size - 1).bit_length())


def _grow(xs: list[int], n: int) -> None:
    if len(xs) < n:
        xs.extend([0] * (n - len(xs)))


def summarize(c: SpecCounters | None) -> dict[str, float]:
    """Metric dict (the names defined here) from counters; None means no speculation."""
    if c is None or c.num_drafts == 0:
        return {"acceptance_length": 1.0, "acceptance_rate": 0.0, "lookahead": 0.0,
                "num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    out = {
        "acceptance_length": 1.0 + c.num_accepted_tokens / c.num_drafts,
        "acceptance_rate": c.num_accepted_tokens / max(c.num_draft_tokens, 1),
        "lookahead": c.num_draft_tokens / c.num_drafts,
        "num_drafts": c.num_drafts,
        "num_draft_tokens": c.num_draft_tokens,
        "num_accepted_tokens": c.num_accepted_tokens,
    }
    for i, d in enumerate(c.drafted_per_pos):
        if d:
            a = c.accepted_per_pos[i] if i < len(c.accepted_per_pos) else 0
            out[f"acceptance_rate_pos_{i}"] = a / d
    return out


def summarize_arms(c: SpecCounters) -> dict[str, float]:
    """Per drafting arm: share of drafts (`drafts_{arm}`) and acceptance length
    (`acceptance_length_{arm}`), from the proposer's counters."""
    total = sum(c.arm_drafts)
    out = {}
    for i, arm in enumerate(ARMS):
        n = c.arm_drafts[i] if i < len(c.arm_drafts) else 0
        out[f"drafts_{arm}"] = n / total if total else 0.0
        if n:
            out[f"acceptance_length_{arm}"] = 1.0 + c.arm_accepted_tokens[i] / n
    return out


def summarize_history(c: SpecCounters) -> dict[str, float]:
    """History drafting against the global index, among the suffix index's drafts
    (arms "suffix" and "suffix-dist"): `drafts_history` (share), `num_history_drafts`,
    `num_global_drafts`, and `acceptance_length_history` / `acceptance_length_global`
    where there were such drafts."""
    arms = [ARMS.index("suffix"), ARMS.index("suffix-dist")]
    drafts = sum(c.arm_drafts[i] for i in arms if i < len(c.arm_drafts))
    accepted = sum(c.arm_accepted_tokens[i] for i in arms if i < len(c.arm_accepted_tokens))
    hist, hist_accepted = c.history_drafts, c.history_accepted_tokens
    out = {"drafts_history": hist / drafts if drafts else 0.0,
           "num_history_drafts": hist, "num_global_drafts": drafts - hist}
    if hist:
        out["acceptance_length_history"] = 1.0 + hist_accepted / hist
    if drafts > hist:
        out["acceptance_length_global"] = 1.0 + (accepted - hist_accepted) / (drafts - hist)
    return out


def expected_acceptance_length(accept_probs: Sequence[float], k: int) -> float:
    """E[tokens per step] when position j of a k-token draft is accepted with
    probability accept_probs[j] given the earlier ones were: 1 + sum_j prod_{i<=j} a_i."""
    total, run = 1.0, 1.0
    for a in accept_probs[:k]:
        run *= a
        total += run
    return total


def oracle_acceptance_length(top1_logprobs: Sequence[Sequence[float]], k: int) -> float:
    """Ceiling of one-hot drafting at lookahead k, averaged over rollout positions.

    A drafter that proposes the most likely token at every position is accepted with
    probability p_max there (rejection sampling accepts a one-hot draft x with p(x)),
    so a step starting at position t yields 1 + sum_{j<k} prod_{i<=j} p_max(t+i)
    tokens in expectation (positions past the end of the rollout count as 0). The
    figure is the mean over all positions of all rollouts.
    """
    total, count = 0.0, 0
    for seq in top1_logprobs:
        p = [math.exp(x) for x in seq]
        for t in range(len(p)):
            total += expected_acceptance_length(p[t:t + k], k)
            count += 1
    return total / count if count else 1.0


# --- the registry of metric names ------------------------------------------------
# One place for the names the engine's stats, the TRL integration (``atlas/*``), the
# wandb dashboard, `atlas-rl bench` and `atlas-rl demo` share.

#: What the TRL integration puts before its metrics' names (wandb groups them under it).
METRIC_PREFIX = "atlas/"

#: Engine batch stats the TRL integration logs as they are, when present.
ROLLOUT_METRICS = ("acceptance_length", "acceptance_rate", "lookahead", "tokens_per_s",
                   "rollout_seconds")
#: Figures of the speculator's update (`engine.update` / `engine.learn`) it logs when present.
UPDATE_METRICS = ("drafter_loss", "drafter_train_seconds", "update_budget_seconds",
                  "drafter_published", "drafter_published_score", "drafter_candidate_score",
                  "drafter_replaced_score", "drafter_rolled_back", "drafter_gate_right",
                  "drafter_gate_check_margin", "learn_opportunity")

#: The scalars the TRL integration logs per generation (as METRIC_PREFIX + key).
TRAINER_METRICS: dict[str, str] = {
    "acceptance_length": "tokens per target forward pass of a drafting request, bonus "
                         "token included (1.0 without speculation)",
    "acceptance_rate": "accepted draft tokens / verified draft tokens",
    "lookahead": "mean drafted tokens per drafting request-step",
    "tokens_per_s": "completion tokens over the generation's wall time",
    "rollout_seconds": "wall time of the generation",
    "update_seconds": "time the speculator took to learn the generation's rollouts",
    "drafter_loss": "the adaptive drafter's distillation loss in that update",
    "drafter_train_seconds": "time the adaptive drafter trained in that update",
    "update_budget_seconds": "the training time the update was allowed (a share of the "
                             "rollout time)",
    "drafter_rollbacks": "times an adaptive drafter's update was not published: it diverged "
                         "or lost the publish gate (cumulative)",
    "drafter_published": "1 if that update's drafter was published: with the default "
                         "'next-batch' gate every update that does not diverge is (the next "
                         "update judges it); with 'held-out', if on held-out rollouts of the "
                         "batch it was not below the published one by more than two standard "
                         "errors (MLP) or beat it (EAGLE-3), else 0",
    "drafter_published_score": "the published drafter's score on rollouts it has not trained "
                               "on ('next-batch': this batch, before training on it; "
                               "'held-out': the batch's held-out rollouts): EAGLE-3, expected "
                               "acceptance length of distribution drafts; MLP, first-position "
                               "acceptance over the draft vocabulary",
    "drafter_candidate_score": "'held-out': the candidate's, on the same rollouts",
    "drafter_replaced_score": "'next-batch': the score of the drafter the last update "
                              "replaced, on the same rollouts",
    "drafter_rolled_back": "'next-batch': 1 if the last update scored below the drafter it "
                           "replaced by more than two standard errors on this batch and was "
                           "undone, else 0",
    "drafter_gate_right": "1 if the publish gate's previous decision was right on this "
                          "batch's rollouts (neither drafter trained on them): the drafter it "
                          "kept scores at least the one it turned down (for 'next-batch': "
                          "the update it published scores at least the drafter it "
                          "replaced), else 0",
    "drafter_gate_check_margin": "the later drafter's score minus the earlier one's on those "
                                 "rollouts (the candidate or update minus the drafter "
                                 "published before it)",
    "learn_opportunity": "share of the request-steps since the last update at batch sizes "
                         "where a draft could pay: the share of train_budget_fraction the "
                         "update got",
    "speedup_estimate": "1 + accepted tokens / request-steps: the factor by which "
                        "speculation cut the target's request-steps (an upper bound of the "
                        "speedup; `atlas-rl bench` measures it)",
    "drafted_fraction": "share of request-steps that drafted",
    "closed_probe_steps": "share of engine steps where drafting was closed but an "
                          "explore-rate probe was planned (one drafting pass, at most one "
                          "draft token kept)",
    "drafts_history": "share of the suffix index's drafts that came from the request's own "
                      "prompt's corpus (its earlier completions and live siblings: history "
                      "drafting) rather than the global index",
    "acceptance_length_history": "acceptance length of the suffix index's history drafts",
    "acceptance_length_global": "acceptance length of the suffix index's drafts from the "
                                "global index",
}
#: Families of scalars, one per draft position / drafting arm: template -> description.
TRAINER_METRIC_FAMILIES: dict[str, str] = {
    "acceptance_rate_pos_{i}": "acceptance rate at draft position i (0-based)",
    "drafts_{arm}": "share of the drafts the arm made",
    "acceptance_length_{arm}": "acceptance length of the arm's drafts (when it drafted)",
    "closed_by_{reason}": "share of engine steps the controller planned no drafting in, "
                          "for this reason (base, cap, cost, cut, value: "
                          "`atlas_rl.metrics.CLOSED_REASON_HELP`)",
}
POS_PREFIX = "acceptance_rate_pos_"
ARM_PREFIXES = ("drafts_", "acceptance_length_", "closed_by_", "closed_probe_steps")

#: TRL's own metric names that the demo and the dashboard read.
TRL_REWARD = "reward"
TRL_STEP_TIME = "step_time"
TRL_LOGP_GAP = "sampling/sampling_logp_difference/max"

#: `atlas-rl bench` results (docs/benchmarks.md): a method's summary (tail regime) ...
BENCH_SUMMARY_KEYS = ("tokens_per_s", "speedup", "acceptance_length", "speedup_estimate",
                      "acceptance_rate", "oracle_acceptance_length", "exact")
#: ... the medians of a regime's steps ...
BENCH_REGIME_KEYS = ("tokens_per_s", "speedup", "acceptance_length", "acceptance_rate",
                     "oracle_acceptance_length", "lookahead")
#: ... the engine stats kept in a step's record of one regime ...
BENCH_RECORD_KEYS = ("tokens_per_s", "rollout_seconds", "num_tokens", "num_completions",
                     "acceptance_length", "acceptance_rate", "lookahead",
                     "oracle_acceptance_length", "num_drafts", "num_draft_tokens",
                     "num_accepted_tokens", "engine_steps", "forward_seconds",
                     "sample_seconds", "propose_seconds", "draft_seconds")
#: ... the speculator update's figures kept there ...
BENCH_UPDATE_KEYS = UPDATE_METRICS + ("drafter_rollback", "drafter_version", "index_tokens",
                                      "history_tokens", "drafted_fraction",
                                      "drafter_update_waits")
#: ... a method's per-step rows (tail regime) ...
BENCH_STEP_KEYS = ("step", "domain", "epoch", "tokens_per_s", "speedup", "acceptance_length",
                   "speedup_estimate", "acceptance_rate", "lookahead", "oracle_acceptance_length",
                   "rollout_seconds", "acceptance_rate_pos", "update_seconds",
                   "drafter_loss", "drafter_train_seconds", "update_budget_seconds")
#: ... and where the time went (sums over steps; the last two are counts).
BENCH_TIME_KEYS = ("rollout_seconds", "forward_seconds", "sample_seconds", "propose_seconds",
                   "draft_seconds", "update_seconds", "engine_steps", "num_tokens")


#: The drift of the policy over a run (``results["drift"]``): the method whose
#: acceptance length shows what the drift does to a drafter that does not learn ...
BENCH_STATIC_METHOD = "atlas-static"
POLICY_KL = "policy_kl"
PARAM_DELTA_NORM = "param_delta_norm"
STATIC_ACCEPTANCE_LENGTH = "static_acceptance_length"
#: ... a row per step ...
BENCH_DRIFT_STEP_KEYS = ("step", "domain", POLICY_KL, PARAM_DELTA_NORM,
                         STATIC_ACCEPTANCE_LENGTH)
#: ... and the run's figures.
BENCH_DRIFT_SUMMARY_KEYS = ("policy_kl_last_step", "policy_kl_final", "param_delta_norm_final",
                            "static_acceptance_length_first", "static_acceptance_length_last",
                            "static_acceptance_drop")
BENCH_DRIFT_METRICS: dict[str, str] = {
    POLICY_KL: "KL(pi_s || pi_0) per token, nats: the full-distribution KL of the policy "
               "that sampled step s's rollouts from the initial policy, at the sampling "
               "temperature, averaged over the completion positions of the step's tail "
               "group (none's); 0 at the first step",
    PARAM_DELTA_NORM: "||theta_s - theta_0||: how far the weights that sampled step s are "
                      "from the initial ones (L2 over every trained parameter)",
    STATIC_ACCEPTANCE_LENGTH: "atlas-static's tail acceptance length at step s: the frozen "
                              "drafter on the current policy (None where it drafted "
                              "nothing)",
    "policy_kl_last_step": "policy_kl of the last step's sampling policy",
    "policy_kl_final": "KL of the policy after the last update, on the last step's tail "
                       "group",
    "param_delta_norm_final": "||theta_S - theta_0|| after the last update",
    "static_acceptance_length_first": "static_acceptance_length of the first step (that "
                                      "has one)",
    "static_acceptance_length_last": "static_acceptance_length of the last step (that has "
                                     "one)",
    "static_acceptance_drop": "1 - last / first: the frozen drafter's loss of acceptance "
                              "length over the run",
}


def atlas_name(key: str) -> str:
    """The name the TRL integration logs `key` under."""
    return METRIC_PREFIX + key


def trainer_metric_names(max_lookahead: int = 8, arms: Sequence[str] = ARMS) -> list[str]:
    """Every ``atlas/*`` scalar the TRL integration can log, families expanded for
    draft positions ``0..max_lookahead-1`` and the given arms."""
    keys = list(TRAINER_METRICS)
    for template in TRAINER_METRIC_FAMILIES:
        if "{i}" in template:
            keys += [template.format(i=i) for i in range(max_lookahead)]
        elif "{reason}" in template:
            keys += [template.format(reason=r) for r in CLOSED_REASONS]
        else:
            keys += [template.format(arm=arm) for arm in arms]
    return [atlas_name(k) for k in keys]


def is_arm_metric(key: str) -> bool:
    """`drafts_{arm}` / `acceptance_length_{arm}`: which arm drafted, and how well (and
    `drafts_history`, `acceptance_length_history` / `_global`: from which corpus the
    suffix index drafted); `closed_by_{reason}` / `closed_probe_steps`: where the
    controller did not draft at all, and why."""
    return key.startswith(ARM_PREFIXES)


def arm_metrics(stats: dict) -> dict:
    """The per-arm entries of a stats dict, as they are."""
    return {k: v for k, v in stats.items() if is_arm_metric(k)}


def trainer_metrics(stats: dict, update: dict, drafter_rollbacks: float) -> dict[str, float]:
    """The ``atlas/*`` scalars of one generation: from the engine's batch stats, the
    speculator update's dict and the adaptive drafter's rollbacks so far (0 without one)."""
    out = {atlas_name(k): float(stats[k]) for k in ROLLOUT_METRICS if k in stats}
    out.update({atlas_name(k): float(v) for k, v in stats.items() if k.startswith(POS_PREFIX)})
    out[atlas_name("update_seconds")] = float(update.get("update_seconds", 0.0))
    out.update({atlas_name(k): float(update[k]) for k in UPDATE_METRICS if k in update})
    out[atlas_name("drafter_rollbacks")] = float(drafter_rollbacks)
    out.update({atlas_name(k): float(v) for k, v in arm_metrics(stats).items()})
    steps = stats.get("request_steps")
    if steps:
        # Without a baseline run: tokens per request-step. It ignores what verifying
        # drafts costs, so it bounds the speedup from above.
        est = tokens_per_request_step(stats.get("num_tokens"), stats["num_accepted_tokens"],
                                      steps)
        if est is not None:
            out[atlas_name("speedup_estimate")] = est
        out[atlas_name("drafted_fraction")] = drafted_fraction(stats.get("lookahead_hist"), steps)
    return out


def tokens_per_request_step(num_tokens: int | None, num_accepted: int,
                            request_steps: int | None = None) -> float | None:
    """Tokens per request-step (target pass of one request), drafted or not: every pass
    yields one token of its own (the bonus or the recovered one) plus the drafts it
    accepted, so passes = tokens - accepted and this is tokens / (tokens - accepted) =
    1 + accepted / passes: what `atlas-rl bench` reports and the trainer logs as
    ``speedup_estimate``. Without a token count, 1 + accepted / `request_steps` (the
    proposer's hand-overs of drafts, one per live request and step, which need not match
    the passes one for one: up to ~3% apart on short batches). None without either."""
    if num_tokens:
        return float(num_tokens / (num_tokens - num_accepted)) if num_tokens > num_accepted else None
    if request_steps:
        return float(1.0 + num_accepted / request_steps)
    return None


def drafted_fraction(lookahead_hist: Sequence[int] | None, request_steps: int) -> float:
    """Share of request-steps that drafted: 1 - (request-steps with lookahead 0) / all."""
    return float(1.0 - (lookahead_hist or [request_steps])[0] / request_steps)


# --- summaries and formatting -----------------------------------------------------

def median(xs: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    """`x` formatted with `spec`, "-" for None (a figure a run did not produce)."""
    return "-" if x is None else format(x, spec)

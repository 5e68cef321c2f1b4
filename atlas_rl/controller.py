"""The confidence-aware controller: which speculator, which kind of draft, how long.

Three parts, all learned online on the machine it runs on:

- `ConfidenceCalibrator`, one per *arm* (a speculator and a draft kind: one-hot or a
  distribution draft) and draft position: maps the speculator's raw confidence to the
  acceptance probability the verifier actually shows (conditional on the earlier
  positions being accepted), from the accept/reject feedback.
- `StepCostModel`: the wall time of an engine step as a function of the running
  sequences (a bucket per power of two) and the draft tokens verified:
  T(B, D) = base_b(B) + [D > 0] overhead_b + slope_b D, fitted from the measured steps
  with exponential forgetting. `base` is what a step costs without speculation (the
  median of the bucket's recent steps without drafts, each moved to B along the cost of
  one more sequence, which B's moves within the bucket measure; one step in 64 goes
  without drafts to keep measuring it);
  `overhead` what verification costs at all (vLLM's rejection sampler path); `slope`
  the price of one more verified token (near zero while the forward is memory-bound,
  about base/B once it is compute-bound).
- `AtlasController`: per step, `plan_step` decides before any drafting which speculators
  run, for how many positions, in which draft kind per request (a speculator that drafts
  both kinds from one lookup, the suffix index, makes both, and the request keeps the
  better), and whether the step only probes the cost; `choose_drafts` then takes each
  request's best draft (the arm whose calibrated expected accepted tokens is largest)
  and makes a goodput cut across
  the batch (TLT's rule):
  draft positions are added in order of their probability of being accepted while each
  adds more expected tokens than it costs in time at the current throughput, and the
  whole plan is dropped unless it beats no speculation, which is always a choice, by a
  margin (`min_gain`); a batch size whose drafting steps were worth less than nothing on
  average stops drafting but for probes (`drafting_value`: the drafting pass is paid
  before the cut sees a confidence; a drafter's new weights, `speculator_changed`,
  re-open what the old ones had closed). Some
  exploration keeps every arm's estimate fresh, so the controller notices when the
  adaptive speculator has become better; an arm whose measured acceptance collapses is
  benched for a while and then probed again. Feedback arrives through
  `record_acceptance` (what the verifier accepted), `record_step_time` (an engine step's
  wall time) and `record_draft_time` (a speculator's drafting time, per step and per
  draft position: a position must pay for its verification and its drafting pass).
  `lookahead_goodput` is the offline yardstick of the lookahead: expected tokens/s at
  each lookahead from measured acceptance and costs (scripts/profile_step.py).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from atlas_rl.speculators.base import DISTRIBUTION, EMPTY_DRAFT, Arm, Draft


@dataclass
class ConfidenceCalibrator:
    """Raw confidence -> observed conditional acceptance rate, per confidence bucket.

    Position i of a verified draft counts as a trial only if positions < i were
    accepted (that is what the conditional confidence claims). Each bucket's estimate
    is (accepted + s * c) / (trials + s): the raw confidence c acts as a prior worth s
    trials (via the rate over all buckets, see `calibrate`). Counts are halved past
    `max_trials` so that the estimate follows drift.
    """

    num_buckets: int = 10
    prior_strength: float = 4.0
    max_trials: float = 500.0
    trials: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.trials = self.trials or [0.0] * self.num_buckets
        self.accepted = self.accepted or [0.0] * self.num_buckets
        self._best: float | None = None  # `best_rate`, until the next trial

    def _bucket(self, c: float) -> int:
        return min(self.num_buckets - 1, max(0, int(c * self.num_buckets)))

    def calibrate(self, c: float) -> float:
        # Shrink the bucket towards the rate over all buckets (itself shrunk towards c),
        # so that a confidence never seen yet inherits what this arm has shown so far.
        return self._calibrated(self._bucket(c), c, sum(self.accepted), sum(self.trials))

    def _calibrated(self, b: int, c: float, total_accepted: float, total_trials: float) -> float:
        s = self.prior_strength
        overall = (total_accepted + s * c) / (total_trials + s)
        return (self.accepted[b] + s * overall) / (self.trials[b] + s)

    def best_rate(self) -> float:
        """The largest `calibrate` over the buckets (at each bucket's middle confidence):
        the best acceptance this arm has shown at this position (kept until the next
        trial)."""
        if self._best is None:
            n, total_a, total_t = self.num_buckets, sum(self.accepted), sum(self.trials)
            self._best = max(self._calibrated(b, (b + 0.5) / n, total_a, total_t)
                             for b in range(n))
        return self._best

    def add_trial(self, c: float, accepted: bool) -> None:
        self._best = None
        b = self._bucket(c)
        self.trials[b] += 1
        self.accepted[b] += bool(accepted)
        if self.trials[b] > self.max_trials:
            self.trials[b] /= 2
            self.accepted[b] /= 2

    @property
    def total_trials(self) -> float:
        return sum(self.trials)

    def to_dict(self) -> dict:
        return {"trials": list(self.trials), "accepted": list(self.accepted)}


class ArmCalibration:
    """A calibrator per draft position for one arm, plus a recent acceptance rate."""

    def __init__(self, max_lookahead: int):
        self.positions = [ConfidenceCalibrator() for _ in range(max_lookahead)]
        self.recent_trials = 0.0
        self.recent_accepted = 0.0

    def calibrate(self, pos: int, c: float) -> float:
        return self.positions[min(pos, len(self.positions) - 1)].calibrate(c)

    def add_draft(self, confidence: list[float], num_accepted: int) -> None:
        """Position i counts as a trial if positions < i were accepted (the conditional
        confidence's claim)."""
        for i, c in enumerate(confidence[: num_accepted + 1]):
            self.positions[min(i, len(self.positions) - 1)].add_trial(c, i < num_accepted)
            self.recent_trials = 0.99 * self.recent_trials + 1
            self.recent_accepted = 0.99 * self.recent_accepted + (i < num_accepted)

    @property
    def recent_rate(self) -> float | None:
        return self.recent_accepted / self.recent_trials if self.recent_trials >= 30 else None

    def to_dict(self) -> dict:
        return {"positions": [c.to_dict() for c in self.positions],
                "recent": [self.recent_trials, self.recent_accepted]}

    def load_dict(self, d: dict) -> None:
        for cal, saved in zip(self.positions, d["positions"]):
            cal.trials, cal.accepted = list(saved["trials"]), list(saved["accepted"])
            cal._best = None
        self.recent_trials, self.recent_accepted = d["recent"]


class _Fit:
    """Exponentially weighted least squares of y on x (one feature), with a prior."""

    def __init__(self, decay: float):
        self.decay = decay
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w = d * self.w + 1
        self.sx = d * self.sx + x
        self.sy = d * self.sy + y
        self.sxx = d * self.sxx + x * x
        self.sxy = d * self.sxy + x * y

    #: Weights of the priors, per unit of `strength`: the intercept's is light (a tenth of
    #: one observation: the data set it as soon as there are any); the slope's is half of
    #: what one pseudo-observation at x = 0 and one at x = 8 weigh on a slope (their sum of
    #: squares about their mean, 32), so that a slope needs draft counts that vary to move.
    intercept_prior_weight = 0.1
    slope_prior_weight = 16.0

    def solve(self, prior_intercept: float, prior_slope: float, strength: float) -> tuple[float, float]:
        """Ridge towards the prior, on the intercept and the slope apart: minimises
        sum w (y - a - b x)^2 + s_a strength (a - a0)^2 + s_b strength (b - b0)^2.

        Kept apart so that observations at one x alone (probes: one draft token, step
        after step) move the intercept and leave the slope at its prior: they say what a
        step with one draft costs, nothing about what each further token adds. (A prior
        made of pseudo-observations at x = 0 and x = 8 was tilted by them instead: probes
        that cost more than the prior's intercept pulled the slope towards 0, and the
        controller then let nearly every request of a compute-bound 64-sequence batch
        draft: 63-283 draft tokens in one batch, which then ran at 0.85-0.90x.)"""
        la, lb = self.intercept_prior_weight * strength, self.slope_prior_weight * strength
        a11, a12, a22 = self.w + la, self.sx, self.sxx + lb
        r1, r2 = self.sy + la * prior_intercept, self.sxy + lb * prior_slope
        det = a11 * a22 - a12 * a12
        if det <= 1e-12:
            return prior_intercept, prior_slope
        return (r1 * a22 - a12 * r2) / det, (a11 * r2 - a12 * r1) / det


class StepCostModel:
    """Seconds per engine step vs running sequences B and verified draft tokens D.

    Per batch-size bucket (a power of two), a step without drafts costs
    base(B) = level + row_cost * B, and one with D > 0 draft tokens costs base(B) +
    overhead + slope * D. B moves inside a bucket (a server's requests come and go, the
    tail's sequences finish one by one), and the steps that draft are not at the B of
    the ones that do not: comparing a drafting step at 13 sequences with a base measured
    at 16 made verification look free (a loaded server here: its drafting steps ran at
    B ~13, 82-88 ms, its plain ones at B ~16, 81 ms, and the fit's overhead and slope
    clamped towards 0). So each drafting step is compared with the base at its own B."""

    #: No-draft steps per batch-size bucket kept to measure the base (the most recent).
    base_window = 32

    #: The prior's draft-token cost as a share of a sequence token's average cost.
    prior_slope_factor = 0.8

    #: Pairs of no-draft steps at different B whose weight equals the row cost's prior.
    row_cost_prior_pairs = 8

    def __init__(self, decay: float = 0.98, prior_strength: float = 1.0):
        self.decay = decay
        self.prior_strength = prior_strength
        self.base: dict[int, deque] = {}   # bucket -> recent (B, seconds) of no-draft steps
        self.spec: dict[int, _Fit] = {}    # bucket -> fit of (seconds - base(B)) on D (D > 0)
        self._levels: dict[int, tuple[float, float]] = {}  # bucket -> (level, row cost)
        self.observations = 0

    @staticmethod
    def bucket(num_seqs: int) -> int:
        return max(0, math.ceil(math.log2(max(1, num_seqs))))

    #: An observation is capped at this multiple of what the model predicts for it: a
    #: one-off stall (a JIT compile, a page-in, a noisy neighbour) then moves the estimate
    #: by a bounded amount instead of switching speculation off for hundreds of steps.
    outlier_factor = 3.0

    def predict(self, num_seqs: int, num_draft_tokens: int) -> float | None:
        base = self.base_seconds(num_seqs)
        if base is None or num_draft_tokens == 0:
            return base
        overhead, slope = self.spec_cost(num_seqs)
        return base + overhead + slope * num_draft_tokens

    def add_step(self, num_seqs: int, num_draft_tokens: int, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        expected = self.predict(num_seqs, num_draft_tokens)
        if expected is not None:
            seconds = min(seconds, self.outlier_factor * expected)
        b = self.bucket(num_seqs)
        self.observations += 1
        if num_draft_tokens == 0:
            self.base.setdefault(b, deque(maxlen=self.base_window)).append(
                (int(num_seqs), seconds))
            self._levels.pop(b, None)
            return
        base = self.base_seconds(num_seqs)
        if base is not None:  # what drafting added, at this step's own B
            self.spec.setdefault(b, _Fit(self.decay)).add(float(num_draft_tokens),
                                                          seconds - base)

    def _level(self, bucket: int) -> tuple[float, float] | None:
        """(level, row cost) of a bucket: base(B) = level + row cost * B (cached until
        the bucket's next no-draft step)."""
        cached = self._levels.get(bucket)
        if cached is not None:
            return cached
        steps = self.base.get(bucket)
        if not steps:
            return None
        row = self._row_cost(steps)
        shifted = [t - row * b for b, t in steps]
        level = statistics.median(shifted) if len(shifted) >= 8 else min(shifted)
        self._levels[bucket] = (level, row)
        return level, row

    def _row_cost(self, steps) -> float:
        """What one more sequence adds to a step without drafts: the median slope over
        pairs of the bucket's recent no-draft steps at different B (Theil-Sen: a stalled
        step or two do not move it), shrunk towards the prior (`prior_slope_factor` of
        the average token's cost) by `row_cost_prior_pairs`, and never above the
        average token's cost."""
        steps = list(steps)
        typical_b = statistics.median(b for b, _ in steps)
        typical_t = statistics.median(t for _, t in steps)
        average = typical_t / max(typical_b, 1)
        prior = self.prior_slope_factor * typical_t / max(typical_b, 16)
        slopes = [(t1 - t2) / (b1 - b2) for i, (b1, t1) in enumerate(steps)
                  for b2, t2 in steps[i + 1:] if b1 != b2]
        if not slopes:
            return prior
        k = self.row_cost_prior_pairs * self.prior_strength
        row = (len(slopes) * statistics.median(slopes) + k * prior) / (len(slopes) + k)
        return min(max(row, 0.0), average)

    def base_seconds(self, num_seqs: int) -> float | None:
        """What a step of `num_seqs` sequences costs without speculation, or None until
        a step of its batch-size bucket was measured. Never extrapolated from another
        bucket: decoding is memory-bound at small batches and compute-bound at large
        ones, so a guess from the tail's 4 sequences would put a 64-sequence step at 16x
        its cost, and make speculation there look nearly free.

        Within the bucket, the recent no-draft steps are each moved to `num_seqs` along
        the row cost (`_row_cost`), and their median taken, not a mean: the first steps
        at a new batch size are the slow ones (oneDNN creates its kernels for each new
        shape: 2-3x a step here), and a base inflated by them made verification look
        free (the fit's overhead and slope clamp at 0 below it) for the whole run. While
        fewer than 8 were seen, their minimum (a stall only ever adds time)."""
        fit = self._level(self.bucket(num_seqs))
        if fit is None:
            return None
        level, row = fit
        return level + row * num_seqs

    def row_cost(self, num_seqs: int) -> float | None:
        """Seconds one more sequence adds to a step of this size without drafts."""
        fit = self._level(self.bucket(num_seqs))
        return None if fit is None else fit[1]

    def base_count(self, num_seqs: int) -> int:
        """No-draft steps measured (recently) in this batch size's bucket."""
        return len(self.base.get(self.bucket(num_seqs), ()))

    def spec_cost(self, num_seqs: int) -> tuple[float, float] | None:
        """(overhead, slope): a step with D > 0 draft tokens costs
        base + overhead + slope * D seconds. None until a step without drafts was seen."""
        base = self.base_seconds(num_seqs)
        if base is None:
            return None
        # Prior: verification costs 5% of a step, and a draft token a little less than
        # a sequence's token costs when the step is compute-bound (0.8 base / B, at least
        # base / 16 of it): a step also has a part that does not grow with its tokens
        # (the marginal token cost 0.56-0.85 of the average on a 2-core AMD EPYC, float32,
        # 8-64 sequences). Below 1 so that a batch is not hopeless on the prior alone:
        # only drafting steps, whose draft tokens vary, can measure the slope (probes,
        # one token each, cannot), and on a GPU it is far below the prior.
        prior_slope = self.prior_slope_factor * base / max(num_seqs, 16)
        fit = self.spec.get(self.bucket(num_seqs))
        if fit is None:
            return 0.05 * base, prior_slope
        overhead, slope = fit.solve(0.05 * base, prior_slope, self.prior_strength)
        return max(0.0, overhead), max(slope, 0.0)

    def to_dict(self) -> dict:
        return {"base_sized": {str(k): [list(x) for x in v] for k, v in self.base.items()},
                "spec_added": {str(k): [f.w, f.sx, f.sy, f.sxx, f.sxy]
                               for k, f in self.spec.items()}}

    def load_dict(self, d: dict) -> None:
        self.base, self.spec, self._levels = {}, {}, {}
        for k, v in d.get("base_sized", {}).items():
            self.base[int(k)] = deque(((int(b), float(t)) for b, t in v),
                                      maxlen=self.base_window)
        # Saved before the base knew B (the bucket's largest B stands in): the plain
        # steps' seconds, or earlier still their mean. Fits of that time regressed whole
        # step times, not what drafting added, and are not loaded.
        for k, v in d.get("base_steps", {}).items():
            self.base.setdefault(int(k), deque(((2 ** int(k), float(t)) for t in v),
                                               maxlen=self.base_window))
        for k, (w, total) in d.get("base", {}).items():
            if w > 0:
                self.base.setdefault(int(k), deque([(2 ** int(k), total / w)],
                                                   maxlen=self.base_window))
        for k, v in d.get("spec_added", {}).items():
            f = _Fit(self.decay)
            f.w, f.sx, f.sy, f.sxx, f.sxy = v
            self.spec[int(k)] = f


@dataclass
class StepPlan:
    """The controller's decision for one engine step, made before any drafting."""

    num_seqs: int
    lookahead: int = 0                # longest draft any request may get (0: none)
    speculators: list[str] = field(default_factory=list)   # the ones to run this step
    sample: dict[str, list[bool]] = field(default_factory=dict)  # per speculator and request: distribution draft?
    both: set[str] = field(default_factory=set)  # speculators that draft each request both ways
    lookaheads: dict[str, int] = field(default_factory=dict)     # per speculator: draft steps
    probe: bool = False               # speculation does not pay here: at most one probe token
    closed: str | None = None         # why drafting is closed (`metrics.CLOSED_REASONS`)


class AtlasController:
    """Chooses per request and step the speculator, the draft kind and the lookahead
    that maximise expected tokens per second (see the module docstring)."""

    #: After this many consecutive steps of a batch-size bucket in which the goodput cut
    #: dropped every draft, drafting itself is skipped there (but for explore-rate probes).
    cut_patience = 8
    #: No-draft steps measured at a batch size before drafting there (their median is
    #: the base every decision compares against), and the drafting steps after which one
    #: no-draft step re-measures it (~1.5% of the tail's steps: the base moves as the
    #: sequences grow, and the controller would otherwise never see it again).
    min_base_steps = 3
    base_refresh_steps = 64
    #: Share of steps on which one draft position past the useful ones is drafted, so
    #: that the calibration of the next position keeps being measured.
    explore_position = 0.25
    #: The drafting steps' value (`_record_value`): a bucket whose drafting steps were
    #: worth less than nothing on average over the last ~1 / (1 - value_decay) of them,
    #: and over at least `min_value_steps`, drafts only on explore-rate probes.
    value_decay = 0.9
    min_value_steps = 8
    #: The least gain in tokens per second, over no speculation, that the cost model must
    #: expect of a step's drafts for the cut to keep any: its errors are not symmetric.
    #: On a loaded server's 16 sequences on a 2-core AMD EPYC the model expected small
    #: gains that did not come (atlas-static 0.96-0.97x no speculation in the five load
    #: runs where it drafted 715-4,700 times, 0.98-1.0x in those where it drafted under
    #: 110 times: an accepted token of one of a request's n sequences does not free its
    #: slot until its siblings finish, and steps with prompt chunks are not measured).
    min_gain = 0.03

    def __init__(self, max_lookahead: int, speculators: list[str], explore: float = 0.05,
                 collapse_rate: float = 0.03, cooldown_steps: int = 200,
                 max_batch_size: int | None = None, always: bool = False, seed: int = 0,
                 both_kinds: Iterable[str] | Mapping[str, int | None] = ()):
        self.max_lookahead = int(max_lookahead)
        self.speculators = list(speculators)
        # speculators whose one call drafts both kinds (`Speculator.drafts_both_kinds`):
        # the kind is chosen per request from the two drafts' calibrated values, up to the
        # batch size each names (`Speculator.both_kinds_max_batch`; None: any)
        limits = both_kinds if isinstance(both_kinds, Mapping) else dict.fromkeys(both_kinds)
        self.both_kinds = {s: limits[s] for s in limits if s in self.speculators}
        self.arms = [a for s in self.speculators for a in Arm.both(s)]
        self.calibration = {a: ArmCalibration(self.max_lookahead) for a in self.arms}
        self.cost = StepCostModel()
        self.explore = float(explore)
        self.collapse_rate = float(collapse_rate)
        self.cooldown_steps = int(cooldown_steps)
        self.max_batch_size = max_batch_size  # a hard cap on top of the cost model (None: off)
        self.always = bool(always)  # no cost model: every proposal in full (tests, debugging)
        self.draft_seconds = {s: 0.0 for s in self.speculators}  # median drafting time per step, recent calls
        # median drafting time per draft position (a neural drafter runs once per position)
        self.draft_position_seconds = {s: 0.0 for s in self.speculators}
        self.benched: dict[Arm, int] = {}  # arm -> steps left on the bench
        self.collapses = 0
        self.probes = 0  # steps where one token was drafted only to re-measure the cost
        self._draft_times: dict[str, deque] = {}
        self._position_times: dict[str, deque] = {}
        self._cut_streak: dict[int, int] = {}  # batch bucket -> steps the cut dropped all drafts
        self._value: dict[int, list[float]] = {}  # batch bucket -> [decayed sum, weight, steps]
        self._since_base: dict[int, int] = {}  # batch bucket -> steps planned since a no-draft one
        self.steps = 0
        self._acceptances = 0  # drafts whose acceptance was recorded
        self._best_acceptance: tuple | None = None  # (its key, `best_acceptance`)
        self._rng = random.Random(seed)

    # --- feedback ---------------------------------------------------------------------

    def record_acceptance(self, draft: Draft, num_accepted: int) -> None:
        """The verifier accepted the first `num_accepted` tokens of `draft`; an arm whose
        recent acceptance collapses is benched for `cooldown_steps`."""
        arm = draft.arm
        cal = self.calibration.get(arm)
        if cal is None:
            return
        cal.add_draft(draft.confidence, num_accepted)
        self._acceptances += 1
        rate = cal.recent_rate
        if rate is not None and rate < self.collapse_rate and arm not in self.benched:
            self.benched[arm] = self.cooldown_steps
            self.collapses += 1
            cal.recent_trials = cal.recent_accepted = 0.0  # probe afresh after the bench

    def record_step_time(self, num_seqs: int, num_draft_tokens: int, seconds: float) -> None:
        """A pure decode step of `num_seqs` sequences verifying `num_draft_tokens` took
        `seconds` (the cost model's data)."""
        self.cost.add_step(num_seqs, num_draft_tokens, seconds)

    def record_draft_time(self, speculator: str, seconds: float, positions: int = 1) -> None:
        """A speculator drafted `positions` positions (for every request at once) in
        `seconds`: drafting time per step and per position, each the median of the last 15
        calls (a stalled call does not count). The per-position cost is what one more
        lookahead position costs besides its verification (`_position_floor`)."""
        recent = self._draft_times.setdefault(speculator, deque(maxlen=15))
        recent.append(float(seconds))
        self.draft_seconds[speculator] = statistics.median(recent)
        per = self._position_times.setdefault(speculator, deque(maxlen=15))
        per.append(float(seconds) / max(1, int(positions)))
        self.draft_position_seconds[speculator] = statistics.median(per)

    def speculator_changed(self, speculator: str) -> None:
        """`speculator` has new weights (an adaptive drafter published an update): what
        the drafting steps were worth (`drafting_value`) and the cut's streaks were
        measured with the old ones, so they are forgotten, and a batch size where drafting
        had stopped paying drafts again and measures the new drafter, rather than waiting
        for explore-rate probes to lift an average the old one set. (On the domain gap,
        bfloat16 on an Intel Xeon, one run's atlas drafted on 1-12% of the request-steps
        for three RL steps of a new domain, the probes' share, while its drafter learnt
        it; at 83-99% from the fourth.) Where drafting still does not pay, it stops again
        after `cut_patience` steps or `min_value_steps` of them. The arms' calibration
        stays: it follows the drafter through its own halving counts."""
        if speculator in self.speculators:
            self._value.clear()
            self._cut_streak.clear()

    # --- planning ---------------------------------------------------------------------

    def _arm_value(self, arm: Arm, pos: int = 0) -> float:
        """Calibrated acceptance of the arm at a position, at a middling confidence."""
        cal = self.calibration[arm].positions[pos]
        n = cal.total_trials
        return (sum(cal.accepted) + 0.5) / (n + 1.0)

    def plan_step(self, num_seqs: int) -> StepPlan:
        """Which speculators to run (and in which draft kind per request), and the
        longest draft worth making, before any drafting is done."""
        self.steps += 1
        self._tick_bench()
        speculate, probe, closed = self._worth_drafting(num_seqs)
        plan = StepPlan(num_seqs, probe=probe, closed=closed)
        if not speculate:
            return plan
        for spec in self.speculators:
            usable = [a for a in Arm.both(spec) if a not in self.benched]
            k = self._useful_positions(usable, self._position_floor(num_seqs, spec)) \
                if usable else 0
            if k == 0:
                continue
            best = max(usable, key=self._arm_value)
            other = [a for a in usable if a != best]
            plan.speculators.append(spec)
            plan.lookaheads[spec] = k
            if spec in self.both_kinds and len(usable) == 2 and (
                    self.both_kinds[spec] is None or num_seqs <= self.both_kinds[spec]):
                # both drafts are made; `choose_drafts` keeps the one worth more
                plan.both.add(spec)
            plan.sample[spec] = [
                (other[0] if other and self._rng.random() < self.explore else best
                 ).draft_kind == DISTRIBUTION
                for _ in range(num_seqs)]
        plan.lookahead = max(plan.lookaheads.values(), default=0)
        return plan

    def _tick_bench(self) -> None:
        for arm in list(self.benched):
            self.benched[arm] -= 1
            if self.benched[arm] <= 0:
                del self.benched[arm]

    #: The per-position acceptance of a good drafter (what EAGLE-3 drafters reach at
    #: temperature 1: 0.5-0.6): `drafting_could_pay` asks whether one would pay.
    good_acceptance = 0.6

    def cost_hopeless(self, num_seqs: int) -> bool:
        """Drafting cannot pay at this batch size even at its best: were every request
        to draft at the best acceptance any usable arm has shown (`best_acceptance`),
        at whichever lookahead did best, the step's measured verification cost (the
        step-cost model's overhead and slope; drafting itself counted as free) would
        leave it short of no speculation's tokens per second by `min_gain`
        (`lookahead_goodput`). Then the drafting pass, which runs before the cut sees a
        confidence, is not paid at all (but for explore-rate probes). Where the
        verification of a batch's drafts costs more than the acceptance any arm shows
        can earn back (64 sequences on a 2-core CPU: a fixed ~9 ms and ~1.5 ms a draft
        token on a ~120 ms step, against a first position accepted ~0.3-0.9 of the
        time), this closes drafting from the start instead of after `cut_patience`
        steps of drafting passes the cut drops, and a drafter's new weights
        (`speculator_changed`) do not re-open it until its arms show more."""
        base = self.cost.base_seconds(num_seqs)
        cost = self.cost.spec_cost(num_seqs)
        if not base or cost is None:
            return False
        overhead, slope = cost
        if num_seqs / base * slope >= 1.0:  # not even a surely accepted token pays
            return True
        goodput = lookahead_goodput(self.best_acceptance(), num_seqs, base, overhead, slope)
        return max(goodput[1:], default=0.0) <= (1 + self.min_gain) * goodput[0]

    def best_acceptance(self) -> list[float]:
        """Per draft position, the probability that it is accepted (all positions before
        it too) were each position drafted at the best acceptance any usable arm has
        shown there: the largest calibrated acceptance over its confidence buckets (each
        bucket shrunk towards the arm's rate, `ConfidenceCalibrator.calibrate`: an arm
        that has shown nothing keeps its prior, the bucket's confidence). An upper bound
        on what choosing per request among the arms' drafts can expect."""
        key = (self._acceptances, frozenset(self.benched))
        if self._best_acceptance is not None and self._best_acceptance[0] == key:
            return self._best_acceptance[1]
        arms = [a for a in self.arms if a not in self.benched]
        out, run = [], 1.0
        for pos in range(self.max_lookahead if arms else 0):
            run *= max(self.calibration[a].positions[pos].best_rate() for a in arms)
            if run < 1e-3:
                break
            out.append(run)
        self._best_acceptance = (key, out)
        return out

    def drafting_could_pay(self, num_seqs: int) -> bool:
        """Whether a good drafter (`good_acceptance` per position) would beat no
        speculation at this batch size: its first position's expected token is worth
        more than the verification of a draft token for every request, a B x slope /
        base (the step-cost model's measured base and per-token slope; verification's
        fixed overhead, which longer drafts amortise and a transient stall inflates, is
        left out). True while the size's cost is unmeasured; False over the batch cap.
        The adaptive drafter's learning budget follows it
        (`speculation.learning_budget`): where even a good drafter would not pay,
        learning cannot either."""
        if self.max_batch_size is not None and num_seqs > self.max_batch_size:
            return False
        if self.always:
            return True
        base = self.cost.base_seconds(num_seqs)
        if not base:
            return True
        return num_seqs * self.cost.spec_cost(num_seqs)[1] / base < self.good_acceptance

    def _worth_drafting(self, num_seqs: int) -> tuple[bool, bool, str | None]:
        """(draft this step?, only to probe the cost?, why drafting is closed: one of
        `metrics.CLOSED_REASONS`, or None where it is open). Over the hard batch cap: no. A
        batch size whose cost without speculation was never measured: no, measure it
        first (a step or two per power-of-two bucket, once), since every decision
        compares against it. Where drafting cannot pay even at the best acceptance the
        arms have shown (`cost_hopeless`), or the goodput cut has dropped every draft for
        a while, or the
        drafting steps are worth less than nothing on average (`drafting_loses`): only on
        explore-rate steps, and those probe the cost."""
        if self.max_batch_size is not None and num_seqs > self.max_batch_size:
            return False, False, "cap"
        if self.always:
            return True, False, None
        bucket = self.cost.bucket(num_seqs)
        since = self._since_base.get(bucket, 0)
        if self.cost.base_count(num_seqs) < self.min_base_steps or since >= self.base_refresh_steps:
            self._since_base[bucket] = 0
            return False, False, "base"
        self._since_base[bucket] = since + 1
        closed = ("cost" if self.cost_hopeless(num_seqs)
                  else "cut" if self._cut_streak.get(bucket, 0) >= self.cut_patience
                  else "value" if self.drafting_loses(num_seqs) else None)
        if closed is None:
            return True, False, None
        probe = self._rng.random() < self.explore
        return probe, probe, closed

    def _position_floor(self, num_seqs: int, speculator: str | None = None) -> float:
        """The cumulative acceptance probability below which one more draft position
        does not pay for itself, at the batch's no-speculation throughput B / base: the
        position brings B * a expected tokens and costs B * slope of verification plus
        one more drafting pass of the speculator (`draft_position_seconds`), so it pays
        while a >= (B * slope + draft) / base."""
        base = self.cost.base_seconds(num_seqs)
        cost = self.cost.spec_cost(num_seqs)
        if self.always or base is None or cost is None:
            return 0.0
        draft = self.draft_position_seconds.get(speculator, 0.0) if speculator else 0.0
        return (num_seqs * cost[1] + draft) / base

    def _useful_positions(self, arms: list[Arm], floor: float) -> int:
        """How many draft steps are worth asking a speculator for: positions while the
        arms' average cumulative acceptance stays above the floor, plus, on a quarter of
        the steps (`explore_position`), one more to keep that position's calibration
        current. Drafting costs time per position (a neural drafter runs once per
        position), so a position the goodput cut would drop is not drafted every step."""
        if self.always:
            return self.max_lookahead
        best = 0
        for arm in arms:
            run, k = 1.0, 0
            for pos in range(self.max_lookahead):
                run *= self._arm_value(arm, pos)
                if run < max(floor, 0.05):
                    break
                k += 1
            best = max(best, k)
        explore = 1 if self._rng.random() < self.explore_position else 0
        return min(self.max_lookahead, best + explore)

    def choose_drafts(self, plan: StepPlan, candidates: list[list[Draft]]) -> list[Draft]:
        """Per request, the best of its candidate drafts, then the goodput cut."""
        chosen = []
        for cands in candidates:
            best, best_value, scored = EMPTY_DRAFT, 0.0, []
            for d in cands:
                if not d.tokens or d.arm not in self.calibration:
                    continue
                value = sum(self._cumulative(d))
                scored.append((value, d))
                if value > best_value:
                    best, best_value = d, value
            if len(scored) > 1 and self._rng.random() < self.explore:
                best = self._rng.choice(scored)[1]  # keep every arm's estimate fresh
            chosen.append(best)
        return chosen if self.always else self._goodput_cut(chosen, plan)

    def _cumulative(self, draft: Draft) -> list[float]:
        cal = self.calibration[draft.arm]
        out, run = [], 1.0
        for i, c in enumerate(draft.confidence):
            run *= cal.calibrate(i, c)
            out.append(run)
        return out

    def _goodput_cut(self, drafts: list[Draft], plan: StepPlan) -> list[Draft]:
        num_seqs = plan.num_seqs
        base = self.cost.base_seconds(num_seqs)
        cost = self.cost.spec_cost(num_seqs)
        if base is None or cost is None:  # no measurements yet: keep likely-accepted prefixes
            return [d.truncate(sum(p >= 0.25 for p in self._cumulative(d))) if d.tokens else d
                    for d in drafts]
        overhead, slope = cost
        # the drafting passes this step ran (every planned speculator's), and those of the
        # speculators whose drafts are in play (what keeping them is charged)
        drafting = sum(self.draft_seconds.get(s, 0.0) for s in plan.speculators)
        in_play = sum(self.draft_seconds.get(s, 0.0) for s in {d.source for d in drafts if d.tokens})
        overhead += in_play
        gains = sorted(((p, r) for r, d in enumerate(drafts) if d.tokens
                        for p in self._cumulative(d)), reverse=True)
        tokens, seconds = float(num_seqs), base + overhead
        keep = [0] * len(drafts)
        for p, r in gains:
            if p * seconds <= tokens * slope:  # this token would lower tokens per second
                break
            tokens += p
            seconds += slope
            keep[r] += 1
        bucket = self.cost.bucket(num_seqs)
        if not any(keep) or tokens / seconds <= (1 + self.min_gain) * num_seqs / base:
            self._cut_streak[bucket] = self._cut_streak.get(bucket, 0) + 1
            self._record_value(bucket, -drafting)
            return self._probe(drafts, plan.probe)
        self._cut_streak[bucket] = 0
        # what no speculation would take for these tokens, less what this step takes
        self._record_value(bucket, tokens * base / num_seqs - seconds - max(0.0, drafting - in_play))
        return [d.truncate(k) if k else EMPTY_DRAFT for d, k in zip(drafts, keep)]

    def _record_value(self, bucket: int, seconds_saved: float) -> None:
        value = self._value.setdefault(bucket, [0.0, 0.0, 0])
        d = self.value_decay
        value[0] = d * value[0] + (1 - d) * seconds_saved
        value[1] = d * value[1] + (1 - d)
        value[2] += 1

    def drafting_value(self, num_seqs: int) -> float | None:
        """Seconds a drafting step of this batch size saved, by the cost model, on
        recent average (None before any): the kept drafts' expected tokens at the
        no-speculation rate, less the step's verification and its drafting pass. A step
        whose drafts the cut dropped saved minus its drafting pass: that pass runs for
        every request before the cut sees a single confidence, so a batch size where
        only a rare draft pays (a loaded server's 16 sequences on a 2-core CPU, where a
        draft token costs ~0.6 of a sequence's token and the drafter's first tokens are
        accepted ~0.4 of the time) pays it on every step it plans drafting on."""
        value = self._value.get(self.cost.bucket(num_seqs))
        return None if value is None or value[1] <= 0 else value[0] / value[1]

    def drafting_loses(self, num_seqs: int) -> bool:
        """The drafting steps of this batch size were worth less than nothing on
        average, over at least `min_value_steps` of them (`drafting_value`)."""
        value = self.drafting_value(num_seqs)
        steps = self._value.get(self.cost.bucket(num_seqs), (0, 0, 0))[2]
        return value is not None and steps >= self.min_value_steps and value < 0

    def _probe(self, drafts: list[Draft], planned: bool) -> list[Draft]:
        """No speculation this step, except one draft token where the plan was a probe
        or, otherwise, with probability `explore`: a cheap measurement that keeps the
        cost model current (its estimate of speculation's overhead is otherwise only ever
        updated by steps that speculate, so a stale, too-high one would never be
        corrected), for the request likeliest to accept it."""
        empty = [EMPTY_DRAFT] * len(drafts)
        if not planned and self._rng.random() >= self.explore:
            return empty
        firsts = [(self._cumulative(d)[0], r) for r, d in enumerate(drafts) if d.tokens]
        if not firsts:
            return empty
        r = max(firsts)[1]
        empty[r] = drafts[r].truncate(1)
        self.probes += 1
        return empty

    # --- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"calibration": {a.label: c.to_dict() for a, c in self.calibration.items()},
                "cost": self.cost.to_dict(), "draft_seconds": dict(self.draft_seconds),
                "draft_position_seconds": dict(self.draft_position_seconds),
                "benched": {a.label: n for a, n in self.benched.items()},
                "collapses": self.collapses}

    def load_state_dict(self, d: dict) -> None:
        arms = {a.label: a for a in self.arms}
        for label, saved in d.get("calibration", {}).items():
            if label in arms:
                self.calibration[arms[label]].load_dict(saved)
        self.cost.load_dict(d.get("cost", {}))
        self.draft_seconds.update(d.get("draft_seconds", {}))
        self.draft_position_seconds.update(d.get("draft_position_seconds", {}))
        self.benched = {arms[k]: int(v) for k, v in d.get("benched", {}).items() if k in arms}
        self.collapses = int(d.get("collapses", 0))
        self._best_acceptance = None


def lookahead_goodput(acceptance: list[float], num_seqs: int, base: float, overhead: float,
                      slope: float, draft_position: float = 0.0) -> list[float]:
    """Expected tokens per second of a step at each lookahead k = 0 .. len(acceptance),
    every request drafting k tokens: the offline yardstick for the controller's choices.

    ``acceptance[i]``: the probability that draft position i is accepted (cumulative: all
    positions before it accepted too; ``acceptance_rate_pos_i``); a step of ``num_seqs``
    requests costs ``base`` seconds without drafts and base + overhead + k * (num_seqs *
    slope + draft_position) with k-token drafts (`StepCostModel`, and the drafting time
    per position), and yields num_seqs * (1 + sum_{i<k} acceptance[i]) tokens."""
    out = [num_seqs / base]
    tokens, seconds = float(num_seqs), base + overhead
    for a in acceptance:
        tokens += num_seqs * a
        seconds += num_seqs * slope + draft_position
        out.append(tokens / seconds)
    return out

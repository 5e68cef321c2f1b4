"""Choosing the lookahead per request and step.

`ThresholdController` is the rule atlas-rl starts from:
- no speculation above a batch size (verifying k+1 tokens per sequence is compute-bound
  there; FIELD-NOTES measures 0.87x at batch 16 on 2 CPU cores);
- per request, a draft cut where the *calibrated* probability that all of it is
  accepted, prod_{i<j} c_i, falls below a floor. The calibration maps the speculator's
  raw per-token confidence to the acceptance rate actually observed at that confidence
  (learned online from the verifier's feedback), so drafts shorten by themselves when
  acceptance drops (temperature 1, a policy that drifted) and lengthen when it recovers.
"No speculation" is always a possible outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from atlas_rl.speculators.base import EMPTY_DRAFT, Draft


@dataclass
class ConfidenceCalibrator:
    """Raw confidence -> observed conditional acceptance rate, per confidence bucket.

    Position i of a verified draft counts as a trial only if positions < i were
    accepted (that is what the conditional confidence claims). Each bucket's estimate
    is (accepted + s * c) / (trials + s): the raw confidence c acts as a prior worth s
    trials. Counts are halved past `max_trials` so that the estimate follows drift.
    """

    num_buckets: int = 10
    prior_strength: float = 4.0
    max_trials: float = 2000.0
    trials: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.trials = self.trials or [0.0] * self.num_buckets
        self.accepted = self.accepted or [0.0] * self.num_buckets

    def _bucket(self, c: float) -> int:
        return min(self.num_buckets - 1, max(0, int(c * self.num_buckets)))

    def calibrate(self, c: float) -> float:
        b = self._bucket(c)
        return (self.accepted[b] + self.prior_strength * c) / (self.trials[b] + self.prior_strength)

    def observe(self, confidence: list[float], num_accepted: int) -> None:
        for i, c in enumerate(confidence[: num_accepted + 1]):
            b = self._bucket(c)
            self.trials[b] += 1
            self.accepted[b] += i < num_accepted
            if self.trials[b] > self.max_trials:
                self.trials[b] /= 2
                self.accepted[b] /= 2


@dataclass
class ThresholdController:
    max_lookahead: int
    min_confidence: float = 0.1
    max_batch_size: int = 8
    calibrator: ConfidenceCalibrator = field(default_factory=ConfidenceCalibrator)

    def step_lookahead(self, num_running: int) -> int:
        """Longest draft any request may get this step, given the live batch size."""
        return self.max_lookahead if num_running <= self.max_batch_size else 0

    def trim(self, draft: Draft) -> Draft:
        """Keep the draft's prefix whose calibrated probability of full acceptance,
        prod_{i<j} calibrate(confidence_i), stays at or above the floor."""
        if not draft.tokens:
            return EMPTY_DRAFT
        p, keep = 1.0, 0
        for c in draft.confidence:
            p *= self.calibrator.calibrate(c)
            if p < self.min_confidence:
                break
            keep += 1
        return draft.truncate(keep) if keep else EMPTY_DRAFT

    def observe(self, draft: Draft, num_accepted: int) -> None:
        """Feedback: the verifier accepted the first `num_accepted` tokens of `draft`."""
        self.calibrator.observe(draft.confidence, num_accepted)

"""Choosing the lookahead per request and step.

`ThresholdController` is the simple rule atlas-rl starts from: no speculation above a
batch size (verification of k+1 tokens per sequence is compute-bound there; FIELD-NOTES
measures 0.87x at batch 16 on 2 CPU cores), and per request a draft cut where the
speculator's cumulative acceptance estimate (the product of its per-token confidences)
falls below a floor. "No speculation" is always a possible outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas_rl.speculators.base import EMPTY_DRAFT, Draft


@dataclass
class ThresholdController:
    max_lookahead: int
    min_confidence: float = 0.1
    max_batch_size: int = 8

    def step_lookahead(self, num_running: int) -> int:
        """Longest draft any request may get this step, given the live batch size."""
        return self.max_lookahead if num_running <= self.max_batch_size else 0

    def trim(self, draft: Draft) -> Draft:
        """Keep the draft's prefix whose probability of full acceptance stays above
        the floor: P(first j accepted) = prod_{i<j} confidence_i."""
        if not draft.tokens:
            return EMPTY_DRAFT
        p, keep = 1.0, 0
        for c in draft.confidence:
            p *= c
            if p < self.min_confidence:
                break
            keep += 1
        return draft.truncate(keep) if keep else EMPTY_DRAFT

"""Speculation metrics: one definition each, the same names everywhere (DESIGN.md).

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
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import math


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

    def record_verified(self, num_verified: int, num_accepted: int, source: str = "",
                        distribution: bool = False) -> None:
        """One request-step: `num_verified` draft tokens checked, the first
        `num_accepted` of them accepted (no draft: nothing to record)."""
        if num_verified > 0:
            self.add(1, num_verified, num_accepted, [1] * num_verified, [1] * num_accepted)
            name = f"{source}-dist" if distribution else source
            if name in ARMS:
                i = ARMS.index(name)
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

    def record_lookahead(self, lookahead: int) -> None:
        _grow(self.lookahead_hist, lookahead + 1)
        self.lookahead_hist[lookahead] += 1

    def copy(self) -> "SpecCounters":
        return SpecCounters(**{f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                               for f in fields(self)})

    def since(self, earlier: "SpecCounters") -> "SpecCounters":
        out = SpecCounters()
        for f in fields(self):
            now, then = getattr(self, f.name), getattr(earlier, f.name)
            if isinstance(now, list):
                then = then + [0] * (len(now) - len(then))
                setattr(out, f.name, [a - b for a, b in zip(now, then)])
            else:
                setattr(out, f.name, now - then)
        return out


def _grow(xs: list[int], n: int) -> None:
    if len(xs) < n:
        xs.extend([0] * (n - len(xs)))


def summarize(c: SpecCounters | None) -> dict[str, float]:
    """Metric dict (DESIGN.md names) from counters; None means no speculation."""
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

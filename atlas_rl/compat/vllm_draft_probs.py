"""Draft probabilities from a ``custom_class`` drafter (vLLM 0.32, any platform).

vLLM's rejection sampler can verify a draft token x that was *sampled* from a
distribution q: it accepts x with probability min(1, p(x) / q(x)) and, on rejection,
samples from max(0, p - q) normalised, so the output is distributed exactly as p and a
draft is accepted with probability 1 - TV(p, q) (a one-hot draft: only p(x)). The V1
runner feeds it q from its own model-based drafters (``drafter.take_last_draft_probs()``
read right after ``propose``, stored in ``runner._draft_probs`` with the request ids it
belongs to), but not from a ``custom_class`` drafter: that branch of
``propose_draft_token_ids`` never asks. `hand_over` closes the gap: called after the
runner's ``propose_draft_token_ids`` returns, it stores the drafter's
``[num_reqs, k, vocab]`` probabilities the way the runner stores its own, and
``_get_spec_decode_draft_probs`` then passes them to the rejection sampler.

Version-gated: on a vLLM whose runner lacks ``_draft_probs`` /
``_get_spec_decode_draft_probs`` it does nothing and says so in `status()` (drafts stay
one-hot there: still lossless, just accepted less). Off with ``ATLAS_RL_COMPAT=off``
(distribution drafts are then verified as one-hot drafts, which is also exact).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_STATUS: dict[str, str] = {}


def supported(runner) -> bool:
    return (os.environ.get("ATLAS_RL_COMPAT", "on").lower() != "off"
            and hasattr(runner, "_draft_probs") and hasattr(runner, "_draft_prob_req_ids")
            and hasattr(type(runner), "_get_spec_decode_draft_probs"))


def status() -> dict[str, str]:
    return dict(_STATUS)


def hand_over(runner, drafter, packed: bool = False) -> bool:
    """Give the runner the drafter's last draft probabilities (if any). True if handed.
    ``packed``: the runner verifies with atlas-rl's verifier, which takes them packed
    sparse (`atlas_rl.kernels.rejection.pack_sparse_q`) instead of [reqs, k, vocab]."""
    probs = drafter.take_last_packed_q() if packed else drafter.take_last_draft_probs()
    if probs is None:
        return False
    if not supported(runner):
        if "draft_probs" not in _STATUS:
            _STATUS["draft_probs"] = "not applied (this vLLM has no draft-probability path, or compat is off): distribution drafts are verified one-hot"
            logger.info("atlas-rl: %s", _STATUS["draft_probs"])
        return False
    _STATUS["draft_probs"] = "applied"
    runner._draft_probs = probs
    runner._draft_prob_req_ids = list(runner.input_batch.req_ids)
    return True

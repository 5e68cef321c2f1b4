"""Drawing tokens from a distribution: the one way atlas-rl samples (the verifier's
recovered tokens, the neural drafter's and the suffix index's distribution drafts).

Inverse CDF with one uniform per row: a row's draw is the first index whose cumulative
weight exceeds u * total. One uniform per row is what makes a seeded request's draws
reproducible and cheap to route through a per-request generator (``torch.multinomial``
hides its draws and was slower here)."""

from __future__ import annotations

import torch


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, dtype: torch.dtype = torch.float64,
                fallback=None) -> torch.Tensor:
    """One draw per row of ``weights`` [rows, n] (unnormalised, >= 0) with uniforms ``u``
    [rows] in [0, 1): int64 indices [rows]. The cumulative sums run in ``dtype``. A row
    whose weights are all 0 draws from ``fallback``'s row instead (if given: a tensor
    like ``weights``, or a function of the empty rows' indices returning their rows)."""
    cdf = torch.cumsum(weights.to(dtype), dim=1)
    total = cdf[:, -1]
    if fallback is not None:
        empty = (total <= 0).nonzero().squeeze(1)
        if empty.numel():
            rows = fallback(empty) if callable(fallback) else fallback[empty]
            cdf[empty] = torch.cumsum(rows.to(dtype), dim=1)
            total = cdf[:, -1]
    t = (u.to(dtype) * total)[:, None]
    return torch.searchsorted(cdf, t, right=True).squeeze(1).clamp_(max=weights.shape[1] - 1)

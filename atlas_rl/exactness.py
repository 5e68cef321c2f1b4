"""Checks that speculation changed nothing about what is sampled.

- Greedy: completions equal token for token with and without speculation.
- Sampling: for each sampled token x at a position with next-token distribution p
  (computed independently by transformers for the same prefix), the randomized
  probability integral transform u = P(X < x) + V * p(x), V ~ U(0, 1), is Uniform(0, 1)
  exactly when x ~ p. A Kolmogorov-Smirnov test of all u values against U(0, 1) then
  tests the sampler as a whole, across positions whose distributions all differ.
- Logprobs: the returned logprob of each sampled token against transformers'
  log-softmax at that position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

# Completion positions turned into float64 log-probabilities at once by `sampling_values`
PIT_CHUNK_ROWS = 32


@dataclass
class SamplingCheck:
    num_tokens: int
    ks_statistic: float
    ks_pvalue: float
    logprob_max_abs_err: float
    logprob_mean_abs_err: float
    logprob_p99_abs_err: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)

    def passed(self, alpha: float = 1e-3, logprob_tol: float = 1e-3,
               statistic: str = "max") -> bool:
        """Uniform PIT values (KS p above alpha) and logprobs within tolerance: every one
        (``statistic="max"``, float32), or 99 in 100 (``"p99"``: bfloat16, where a token
        deep in the tail of its distribution can be nats off in every engine, vLLM's own
        included). NaN logprobs (what vLLM's CPU sampling bug produces) fail."""
        if statistic not in ("max", "p99"):
            raise ValueError(f"statistic must be 'max' or 'p99', got {statistic!r}")
        err = self.logprob_max_abs_err if statistic == "max" else self.logprob_p99_abs_err
        return self.ks_pvalue > alpha and err < logprob_tol

    def passed_beside(self, reference: SamplingCheck, alpha: float = 1e-3,
                      slack: float = 1.5) -> bool:
        """Uniform PIT values (KS p above alpha) and logprob errors no more than `slack`
        times the `reference`'s, at the mean and at the 99th percentile: the judge of a
        lower precision, where the reference is the same engine without speculation in
        the same dtype (its errors against the float32 policy are what the dtype costs,
        not speculation). A verifier that handed back another distribution's logprobs
        would be off on most tokens (the mean), one off on a few on the 99th percentile.
        NaN anywhere fails."""
        ok = self.ks_pvalue > alpha
        return bool(ok and self.logprob_mean_abs_err <= slack * reference.logprob_mean_abs_err
                    and self.logprob_p99_abs_err <= slack * reference.logprob_p99_abs_err)


def last_logits(model, ids, k: int):
    """The logits of the last ``k`` positions of ``ids`` [1, L]: [k, vocab], computed for
    those positions only (transformers' ``logits_to_keep``), so that a long prompt over a
    large vocabulary (262,144 tokens) costs no [L, vocab] float32 tensor."""
    try:
        return model(input_ids=ids, logits_to_keep=k).logits[0]
    except TypeError:  # a model class without logits_to_keep
        return model(input_ids=ids).logits[0, -k:]


def completion_logits(model, ids, n: int):
    """The logits that sampled the last ``n`` tokens of ``ids`` [1, L]: [n, vocab]
    (`last_logits` of n + 1 positions, less the last one)."""
    return last_logits(model, ids, n + 1)[:-1]


def load_reference_model(model_path: str, dtype: torch.dtype = torch.float32):
    """The policy as transformers computes it (float32 by default: the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.eval()


def logits_to_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Rows of logits to log-probabilities at `temperature`, in float64."""
    logits = logits.double()
    if temperature > 0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def randomized_pit(logprobs: torch.Tensor, tokens: Sequence[int],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """u_t = P(X < x_t) + V_t * p(x_t) under each row's distribution (ordered by token id)."""
    probs = logprobs.exp()
    idx = torch.tensor(list(tokens), dtype=torch.long)
    below = torch.cumsum(probs, dim=-1).gather(1, idx[:, None])[:, 0] - probs.gather(1, idx[:, None])[:, 0]
    v = torch.rand(len(idx), generator=generator, dtype=torch.float64)
    return (below + v * probs.gather(1, idx[:, None])[:, 0]).clamp(0.0, 1.0)


def sampling_values(model, completions, temperature: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PIT values and |logprob errors| of completions' tokens against the reference
    model, to pool across calls (e.g. the steps of a benchmark whose policy changes:
    pass the policy as it was when the completions were sampled)."""
    us, errs = [], []
    for c in completions:
        if not c.completion_ids:
            continue
        with torch.no_grad():
            logits = completion_logits(model, torch.tensor(
                [list(c.prompt_ids) + list(c.completion_ids)]), len(c.completion_ids))
        # float64 rows a chunk at a time: [positions, vocab] in float64 with its cumsum
        # would be 0.8 GB for 128 positions of a 262,144-token vocabulary
        for start in range(0, len(c.completion_ids), PIT_CHUNK_ROWS):
            rows = slice(start, start + PIT_CHUNK_ROWS)
            ref = logits_to_logprobs(logits[rows], temperature)
            tokens = c.completion_ids[rows]
            us.append(randomized_pit(ref, tokens, generator))
            ref_lp = ref.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            errs.append((ref_lp - torch.tensor(c.logprobs[rows], dtype=torch.float64)).abs())
    empty = torch.zeros(0, dtype=torch.float64)
    return (torch.cat(us) if us else empty), (torch.cat(errs) if errs else empty)


def sampling_check(u: torch.Tensor, err: torch.Tensor) -> SamplingCheck:
    """KS test of pooled PIT values against U(0, 1), and the logprob errors."""
    from scipy import stats

    if len(u) == 0:
        raise ValueError("no sampled tokens to check: the completions were all empty")
    ks = stats.kstest(u.numpy(), "uniform")
    return SamplingCheck(num_tokens=len(u), ks_statistic=float(ks.statistic),
                         ks_pvalue=float(ks.pvalue),
                         logprob_max_abs_err=float(err.max()),
                         logprob_mean_abs_err=float(err.mean()),
                         # (NaN anywhere makes it NaN: it fails, as the max does)
                         logprob_p99_abs_err=float(err.quantile(0.99)) if not
                         bool(err.isnan().any()) else float("nan"))


def check_sampling(model, batch, temperature: float = 1.0, seed: int = 0) -> SamplingCheck:
    """PIT/KS and logprob errors of a RolloutBatch against the reference model."""
    gen = torch.Generator().manual_seed(seed)
    return sampling_check(*sampling_values(model, batch.completions, temperature, gen))


def greedy_mismatches(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> list[int]:
    """Indices of completions that differ token for token."""
    return [i for i, (a, b) in enumerate(zip(reference, other)) if list(a) != list(b)]


@torch.no_grad()
def greedy_divergence_margin(model, prompt_ids: Sequence[int], reference: Sequence[int],
                             other: Sequence[int]) -> tuple[int, float] | None:
    """Where two greedy completions of one prompt first differ, and by how much the
    reference model (float32) prefers one of the two tokens there: |l_a - l_b| in nats
    (logits and logprobs differ by the same constant per row). None if they agree.

    A greedy decoder in a lower precision (bfloat16 keeps 8 mantissa bits) can flip a
    near-tie whenever the batch shape changes, with or without speculation; a margin
    within that precision's error is such a tie, a larger one is a real divergence."""
    t = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), None)
    if t is None:
        return None
    logits = last_logits(model, torch.tensor([list(prompt_ids) + list(reference[:t])]), 1)[0]
    return t, float((logits[reference[t]] - logits[other[t]]).abs())

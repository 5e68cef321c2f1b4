"""Model-free drafting by n-gram (suffix) matching.

Drafts continue the longest recent n-gram of a request's context that was seen before,
in any of:
- the request's own context (prompt and completion so far: prompt lookup),
- the other requests of the same generate call (in GRPO several completions of one
  prompt run side by side, and siblings repeat each other),
- earlier rollouts that were passed to `learn` (bounded FIFO corpus).

Where several earlier occurrences continue the n-gram, the draft follows the majority
branch, and each token's confidence is its branch's share of the occurrences that
reached it, smoothed: count / (total + 1). A single occurrence gives 0.5; four that
agree give 0.8.

With ``sample`` set for a request, the draft is a distribution draft instead: each token
is sampled from the empirical distribution of the continuations still in agreement, and
that distribution goes to the verifier (1 - TV(p, q) acceptance instead of p(token)).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Sequence

import torch

from atlas_rl.kernels.sampling import inverse_cdf
from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, Speculator


def _as_list(tokens) -> list[int]:
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)


class NGramIndex:
    """n-gram -> the most recent positions where it ended, over a set of sequences."""

    def __init__(self, ngram_sizes: Sequence[int], max_occurrences: int):
        self.ngram_sizes = tuple(sorted(set(ngram_sizes)))
        self.max_occurrences = max_occurrences
        self.seqs: dict[object, list[int]] = {}
        self.table: dict[tuple[int, ...], deque] = {}
        self.num_tokens = 0

    def extend(self, key, new_tokens: Sequence[int]) -> None:
        seq = self.seqs.setdefault(key, [])
        table, cap = self.table, self.max_occurrences
        for tok in new_tokens:
            seq.append(tok)
            end = len(seq)
            for n in self.ngram_sizes:
                if end < n:
                    break
                gram = tuple(seq[end - n:end])
                occ = table.get(gram)
                if occ is None:
                    table[gram] = occ = deque(maxlen=cap)
                occ.append((key, end))
        self.num_tokens += len(new_tokens)

    def continuations(self, gram: tuple[int, ...], length: int, exclude=None):
        """Up to `length` tokens following each occurrence of `gram`, newest first."""
        occ = self.table.get(gram)
        if not occ:
            return []
        out = []
        for key, end in reversed(occ):
            if (key, end) == exclude:
                continue
            seq = self.seqs.get(key)
            if seq is None or end >= len(seq):
                continue
            out.append(seq[end:end + length])
        return out


class SuffixSpeculator(Speculator):
    """n-gram matching over the prompt, sibling completions and past rollouts."""

    name = "suffix"

    def __init__(self, ngram_sizes: Sequence[int] = (2, 3, 4, 6), max_occurrences: int = 16,
                 max_corpus_tokens: int = 2_000_000, frozen: bool = False, seed: int = 0):
        if not ngram_sizes or min(ngram_sizes) < 1:
            raise ValueError(f"ngram_sizes must be positive integers, got {ngram_sizes!r}")
        self.ngram_sizes = tuple(sorted(set(int(n) for n in ngram_sizes)))
        self.max_occurrences = int(max_occurrences)
        self.max_corpus_tokens = int(max_corpus_tokens)
        self._live = NGramIndex(self.ngram_sizes, self.max_occurrences)
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences)
        self._past_order: deque = deque()  # FIFO of corpus keys, for eviction
        self._next_past_key = 0
        self.frozen = bool(frozen)  # atlas-static: no learning from past rollouts
        self._generator = torch.Generator().manual_seed(seed)

    # --- drafting ------------------------------------------------------------------

    def propose(self, keys, contexts, max_lengths, sample=None) -> list[Draft]:
        drafts = []
        for i, (key, context, max_len) in enumerate(zip(keys, contexts, max_lengths)):
            seq = self._sync_live(key, context)
            drafts.append(self._draft(key, seq, max_len, bool(sample and sample[i]))
                          if max_len > 0 else EMPTY_DRAFT)
        return drafts

    def _sync_live(self, key, context) -> list[int]:
        seq = self._live.seqs.get(key)
        have = 0 if seq is None else len(seq)
        if len(context) > have:
            self._live.extend(key, _as_list(context[have:]))
        return self._live.seqs[key]

    def _draft(self, key, seq: list[int], max_len: int, sample: bool = False) -> Draft:
        exclude = (key, len(seq))  # the context's own tail has no continuation yet
        for n in reversed(self._live.ngram_sizes):
            if len(seq) < n:
                continue
            gram = tuple(seq[-n:])
            conts = self._live.continuations(gram, max_len, exclude)
            conts += self._past.continuations(gram, max_len)
            if conts:
                conts = conts[: self.max_occurrences]
                if sample:
                    return self._sampled(conts, max_len)
                return self._majority(conts, max_len)
        return EMPTY_DRAFT

    @staticmethod
    def _majority(conts: list[list[int]], max_len: int) -> Draft:
        tokens, confidence = [], []
        alive = conts
        for i in range(max_len):
            reach = [c for c in alive if len(c) > i]
            if not reach:
                break
            tok, cnt = Counter(c[i] for c in reach).most_common(1)[0]
            tokens.append(tok)
            confidence.append(cnt / (len(reach) + 1))
            alive = [c for c in reach if c[i] == tok]
        return Draft(tokens, confidence, source="suffix")

    def _sampled(self, conts: list[list[int]], max_len: int) -> Draft:
        """A distribution draft: token i is sampled from the empirical distribution of
        the continuations that agree with the draft so far, and that distribution is q_i."""
        tokens, confidence, ids, probs = [], [], [], []
        alive = conts
        for i in range(max_len):
            reach = [c for c in alive if len(c) > i]
            if not reach:
                break
            counts = Counter(c[i] for c in reach)
            support = list(counts)
            weights = torch.tensor([counts[t] for t in support], dtype=torch.float32)
            weights /= weights.sum()
            j = int(inverse_cdf(weights[None], torch.rand(1, generator=self._generator))[0])
            tok = support[j]
            tokens.append(tok)
            confidence.append(counts[tok] / (len(reach) + 1))
            ids.append(support)
            probs.append(weights)
            alive = [c for c in reach if c[i] == tok]
        if not tokens:
            return EMPTY_DRAFT
        width = max(len(x) for x in ids)
        q_ids = torch.zeros(len(ids), width, dtype=torch.long)
        q = torch.zeros(len(ids), width)
        for i, (support, w) in enumerate(zip(ids, probs)):
            q_ids[i, :len(support)] = torch.tensor(support)
            q[i, :len(support)] = w
        return Draft(tokens, confidence, q_ids, q, source="suffix")

    def begin_batch(self) -> None:
        self._live = NGramIndex(self.ngram_sizes, self.max_occurrences)

    # --- learning ------------------------------------------------------------------

    def learn(self, sequences, time_budget=None) -> dict[str, float]:
        if self.frozen:
            return {}
        return self._add(sequences)

    def _add(self, sequences) -> dict[str, float]:
        for seq in sequences:
            key = self._next_past_key
            self._next_past_key += 1
            self._past.extend(key, _as_list(seq))
            self._past_order.append(key)
        if self._past.num_tokens > self.max_corpus_tokens:
            self._evict()
        return {"index_tokens": float(self._past.num_tokens),
                "index_sequences": float(len(self._past.seqs))}

    def _evict(self) -> None:
        # Drop the oldest sequences down to 3/4 of the bound, then rebuild the table
        # once (cheaper than removing occurrences one by one).
        keep = dict(self._past.seqs)
        total = self._past.num_tokens
        while self._past_order and total > 0.75 * self.max_corpus_tokens:
            total -= len(keep.pop(self._past_order.popleft()))
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences)
        for key in self._past_order:
            self._past.extend(key, keep[key])

    # --- state ---------------------------------------------------------------------

    def state(self):
        seqs = [self._past.seqs[k] for k in self._past_order]
        flat = [t for s in seqs for t in s]
        tensors = {"corpus_tokens": torch.tensor(flat, dtype=torch.int64),
                   "corpus_lengths": torch.tensor([len(s) for s in seqs], dtype=torch.int64)}
        meta = {"ngram_sizes": list(self.ngram_sizes), "max_occurrences": self.max_occurrences,
                "max_corpus_tokens": self.max_corpus_tokens}
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        self.ngram_sizes = tuple(meta["ngram_sizes"])
        self.max_occurrences = int(meta["max_occurrences"])
        self.max_corpus_tokens = int(meta["max_corpus_tokens"])
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences)
        self._past_order.clear()
        self._next_past_key = 0
        self.begin_batch()
        flat = tensors["corpus_tokens"].tolist()
        start = 0
        seqs = []
        for n in tensors["corpus_lengths"].tolist():
            seqs.append(flat[start:start + n])
            start += n
        self._add(seqs)

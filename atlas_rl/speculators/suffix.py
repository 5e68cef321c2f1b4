"""Model-free drafting by n-gram (suffix) matching.

Drafts continue the longest recent n-gram of a request's context that was seen before,
in any of:
- the request's own context (prompt and completion so far: prompt lookup),
- the other requests of the same generate call (in GRPO several completions of one
  prompt run side by side, and siblings repeat each other),
- earlier rollouts that were passed to `learn` (bounded FIFO corpus).

History drafting: RL revisits prompts (epochs over a dataset, a group of completions
per prompt), so a request whose prompt is known (`begin_request`) drafts first from that
prompt's own corpus: the live completions of its siblings (the other requests of the
same prompt in this generate call) and the prompt's earlier completions, learned from
`learn` and kept per prompt within a token budget, least recently used prompts evicted
first (`PromptHistory`). Only where that corpus has no match does the draft come from
the global n-grams above. Learned rollouts are prompt + completion with no boundary;
they are keyed by the prompts registered since the last `learn` (the longest one that
prefixes the rollout): a rollout of a prompt this process did not see generating (e.g.
another rank's, under data parallelism) goes to the global corpus only.

Where several earlier occurrences continue the n-gram, the draft follows the majority
branch, and each token's confidence is its branch's share of the occurrences that
reached it, smoothed: count / (total + 1). A single occurrence gives 0.5; four that
agree give 0.8.

With ``sample`` set for a request, the draft is a distribution draft instead: each token
is sampled from the empirical distribution of the continuations still in agreement, and
that distribution goes to the verifier (1 - TV(p, q) acceptance instead of p(token)).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from typing import Sequence

import torch

from atlas_rl.config import check_history_budget
from atlas_rl.kernels.sampling import inverse_cdf
from atlas_rl.speculators.base import EMPTY_DRAFT, Draft, Speculator


def _as_list(tokens) -> list[int]:
    return tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return array("q", tokens).tobytes()


_TOKEN_BYTES = array("q").itemsize


def _digest(token_bytes: bytes) -> str:
    return hashlib.blake2b(token_bytes, digest_size=16).hexdigest()


def prompt_key(prompt: Sequence[int]) -> str:
    """The key of a prompt's corpus: a digest of its token ids."""
    return _digest(_token_bytes(_as_list(prompt)))


class NGramIndex:
    """n-gram -> the most recent positions where it ended, over a set of sequences.

    Kept compact, since a long-running server or RL run indexes millions of tokens: the
    table is keyed by the n-gram's hash (an int, not the tuple; a collision, at 64 bits
    negligible, could only cost a draft its acceptance, never exactness), and an
    occurrence is one int (sequence number << 32 | end), stored bare while an n-gram has
    one occurrence and in a list (trimmed to the newest `max_occurrences`) after. About
    0.5 KB per token with four n-gram sizes, against 3.7 KB with tuple keys and deques of
    (key, end) pairs."""

    def __init__(self, ngram_sizes: Sequence[int], max_occurrences: int):
        self.ngram_sizes = tuple(sorted(set(ngram_sizes)))
        self.max_occurrences = max_occurrences
        self.seqs: dict[object, list[int]] = {}
        self.table: dict[int, int | list[int]] = {}
        self.num_tokens = 0
        self._ids: dict[object, int] = {}  # sequence key -> its number
        self._keys: list = []               # number -> key

    def extend(self, key, new_tokens: Sequence[int]) -> None:
        seq = self.seqs.get(key)
        if seq is None:
            seq = self.seqs[key] = []
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = len(self._keys)
            self._keys.append(key)
        table, cap, base = self.table, self.max_occurrences, sid << 32
        for tok in new_tokens:
            seq.append(tok)
            end = len(seq)
            for n in self.ngram_sizes:
                if end < n:
                    break
                gram = hash(tuple(seq[end - n:end]))
                occ = table.get(gram)
                if occ is None:
                    table[gram] = base | end
                elif isinstance(occ, int):
                    table[gram] = [occ, base | end]
                else:
                    occ.append(base | end)
                    if len(occ) > 2 * cap:
                        del occ[:-cap]
        self.num_tokens += len(new_tokens)

    def continuations(self, gram: tuple[int, ...], length: int, exclude=None, skip_key=None):
        """Up to `length` tokens following each occurrence of `gram`, newest first
        (but the occurrence `exclude`, a (key, end) pair, and those in sequence `skip_key`)."""
        occ = self.table.get(hash(tuple(gram)))
        if occ is None:
            return []
        codes = (occ,) if isinstance(occ, int) else occ[-self.max_occurrences:]
        out = []
        for code in reversed(codes):
            key, end = self._keys[code >> 32], code & 0xFFFFFFFF
            if (key, end) == exclude or key == skip_key:
                continue
            seq = self.seqs.get(key)
            if seq is None or end >= len(seq):
                continue
            out.append(seq[end:end + length])
        return out


def _without(index: NGramIndex, keys: set) -> NGramIndex:
    """`index` rebuilt without the sequences `keys` (in their original order)."""
    out = NGramIndex(index.ngram_sizes, index.max_occurrences)
    for key, seq in index.seqs.items():
        if key not in keys:
            out.extend(key, seq)
    return out


class PromptCorpus:
    """One prompt's earlier completions, each stored after the prompt's last few tokens
    (so that n-grams across the prompt's end match), oldest first."""

    def __init__(self, ngram_sizes: Sequence[int], max_occurrences: int):
        self.index = NGramIndex(ngram_sizes, max_occurrences)
        self.order: deque = deque()
        self._next = 0

    @property
    def num_tokens(self) -> int:
        return self.index.num_tokens

    def add(self, seq: list[int]) -> None:
        self.index.extend(self._next, seq)
        self.order.append(self._next)
        self._next += 1

    def sequences(self) -> list[list[int]]:
        return [self.index.seqs[k] for k in self.order]

    def keep_newest(self, max_tokens: int) -> None:
        """Drop the oldest completions until at most `max_tokens` tokens are left."""
        seqs = self.sequences()
        total = self.num_tokens
        while seqs and total > max_tokens:
            total -= len(seqs.pop(0))
        self.index = NGramIndex(self.index.ngram_sizes, self.index.max_occurrences)
        self.order.clear()
        for seq in seqs:
            self.add(seq)


class PromptHistory:
    """Earlier completions keyed by prompt (`prompt_key`), within ``max_tokens`` tokens
    over all prompts: past the bound, the least recently used prompts are evicted (a
    prompt is used when completions of it are learned or a request of it starts); a
    prompt that alone exceeds the bound keeps its newest completions."""

    def __init__(self, ngram_sizes: Sequence[int], max_occurrences: int, max_tokens: int):
        self.ngram_sizes = tuple(ngram_sizes)
        self.max_occurrences = max_occurrences
        self.max_tokens = int(max_tokens)
        self.prompts: OrderedDict[str, PromptCorpus] = OrderedDict()  # least recent first
        self.num_tokens = 0

    def get(self, key: str) -> PromptCorpus | None:
        return self.prompts.get(key)

    def touch(self, key: str) -> None:
        if key in self.prompts:
            self.prompts.move_to_end(key)

    def add(self, key: str, completions: Sequence[list[int]]) -> None:
        completions = [c for c in completions if 0 < len(c) <= self.max_tokens]
        if not completions:
            return
        corpus = self.prompts.get(key)
        if corpus is None:
            corpus = self.prompts[key] = PromptCorpus(self.ngram_sizes, self.max_occurrences)
        self.prompts.move_to_end(key)
        before = corpus.num_tokens
        for c in completions:
            corpus.add(c)
        self.num_tokens += corpus.num_tokens - before
        self._bound()

    def _bound(self) -> None:
        while self.num_tokens > self.max_tokens:
            if len(self.prompts) > 1:  # the least recently used prompt goes
                _, corpus = self.prompts.popitem(last=False)
                self.num_tokens -= corpus.num_tokens
            else:  # one prompt over the bound on its own: its oldest completions go
                key, corpus = next(iter(self.prompts.items()))
                before = corpus.num_tokens
                corpus.keep_newest(self.max_tokens)
                self.num_tokens -= before - corpus.num_tokens
                if not corpus.order:
                    del self.prompts[key]

    def __len__(self) -> int:
        return len(self.prompts)


class SuffixSpeculator(Speculator):
    """n-gram matching over the prompt, sibling completions and past rollouts; a
    request's own prompt's completions (earlier and sibling) first (history drafting)."""

    name = "suffix"

    def __init__(self, ngram_sizes: Sequence[int] = (2, 3, 4, 6), max_occurrences: int = 16,
                 max_corpus_tokens: int = 2_000_000, frozen: bool = False, seed: int = 0,
                 max_history_tokens: int = 1_000_000, max_finished_live: int = 1024):
        if not ngram_sizes or min(ngram_sizes) < 1:
            raise ValueError(f"ngram_sizes must be positive integers, got {ngram_sizes!r}")
        check_history_budget(max_history_tokens)
        self.ngram_sizes = tuple(sorted(set(int(n) for n in ngram_sizes)))
        self.max_occurrences = int(max_occurrences)
        self.max_corpus_tokens = int(max_corpus_tokens)
        self._live = NGramIndex(self.ngram_sizes, self.max_occurrences)
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences)
        self._past_order: deque = deque()  # FIFO of corpus keys, for eviction
        self._next_past_key = 0
        self.frozen = bool(frozen)  # atlas-static: no learning from past rollouts
        self._generator = torch.Generator().manual_seed(seed)
        # History drafting: earlier completions per prompt, live completions per prompt.
        self._history = PromptHistory(self.ngram_sizes, self.max_occurrences, max_history_tokens)
        self._requests: dict[str, tuple[str, int, int]] = {}  # key -> (prompt key, prompt len, tail len)
        self._siblings: dict[str, NGramIndex] = {}  # prompt key -> its live completions
        self._unlearned: OrderedDict[str, int] = OrderedDict()  # prompt key -> length, since learn
        # finished requests whose contexts still draft (key -> prompt key or None), oldest first
        self._finished: OrderedDict = OrderedDict()
        self.max_finished_live = max(1, int(max_finished_live))

    #: Most prompts remembered between two `learn` calls (to key the rollouts learned).
    max_unlearned_prompts = 65536
    # max_finished_live: most finished requests whose contexts keep drafting for the live
    # ones. A batch's finished requests draft for the rest of it (`begin_batch` drops
    # them); a server has no batches, so past this bound the oldest half is dropped
    # (their rollouts reach the corpus by `learn`): a long-running server's memory stays
    # bounded.

    @property
    def max_history_tokens(self) -> int:
        return self._history.max_tokens

    @property
    def _tail(self) -> int:
        # prompt tokens kept before each completion: an n-gram ending at the completion's
        # first token has n - 1 of them
        return max(self.ngram_sizes)

    # --- requests ------------------------------------------------------------------

    def begin_request(self, key, prompt) -> None:
        prompt = _as_list(prompt)
        if not prompt:
            return
        pkey = prompt_key(prompt)
        tail = prompt[-self._tail:]
        self._requests[key] = (pkey, len(prompt), len(tail))
        siblings = self._siblings.get(pkey)
        if siblings is None:
            siblings = self._siblings[pkey] = NGramIndex(self.ngram_sizes, self.max_occurrences)
        if key not in siblings.seqs:
            siblings.extend(key, tail)
        # its history is touched (least recently used order) when the batch is learnt, in
        # the order of `_unlearned`, which data-parallel ranks share (`add_unlearned`)
        if not self.frozen and self.max_history_tokens > 0:
            self._unlearned[pkey] = len(prompt)
            self._unlearned.move_to_end(pkey)
            while len(self._unlearned) > self.max_unlearned_prompts:
                self._unlearned.popitem(last=False)

    def finish(self, key) -> None:
        # Its completion stays among its siblings' until the batch ends (or, in a server,
        # until `max_finished_live` later requests finished); it grows no more.
        request = self._requests.pop(key, None)
        if request is None and key not in self._live.seqs:
            return
        self._finished[key] = request[0] if request is not None else None
        if len(self._finished) > self.max_finished_live:
            self._drop_finished(len(self._finished) // 2)

    def _drop_finished(self, count: int) -> None:
        """Forget the `count` oldest finished requests' contexts: the live index and the
        siblings' indexes are rebuilt without them (amortised: half of them at a time)."""
        dropped = [self._finished.popitem(last=False) for _ in range(count)]
        gone = {key for key, _ in dropped}
        self._live = _without(self._live, gone)
        for pkey in {pkey for _, pkey in dropped if pkey is not None}:
            siblings = self._siblings.get(pkey)
            if siblings is None:
                continue
            if all(k in gone for k in siblings.seqs):
                del self._siblings[pkey]  # no request of that prompt drafts from them
            else:
                self._siblings[pkey] = _without(siblings, gone)

    # --- drafting ------------------------------------------------------------------

    def propose(self, keys, contexts, max_lengths, sample=None) -> list[Draft]:
        # Every request's context first, so that siblings see each other's latest tokens.
        seqs = [self._sync_live(key, context) for key, context in zip(keys, contexts)]
        drafts = []
        for i, (key, seq, max_len) in enumerate(zip(keys, seqs, max_lengths)):
            drafts.append(self._draft(key, seq, max_len, bool(sample and sample[i]))
                          if max_len > 0 else EMPTY_DRAFT)
        return drafts

    def _sync_live(self, key, context) -> list[int]:
        seq = self._live.seqs.get(key)
        have = 0 if seq is None else len(seq)
        if len(context) > have:
            self._live.extend(key, _as_list(context[have:]))
        seq = self._live.seqs[key]
        request = self._requests.get(key)
        if request is not None:  # its completion, after the prompt's tail, among its siblings
            pkey, prompt_len, tail = request
            siblings = self._siblings[pkey]
            done = prompt_len + len(siblings.seqs[key]) - tail  # context tokens it has
            if len(seq) > done:
                siblings.extend(key, seq[done:])
        return seq

    def _draft(self, key, seq: list[int], max_len: int, sample: bool = False) -> Draft:
        request = self._requests.get(key)
        if request is not None:
            draft = self._draft_from_history(key, request[0], seq, max_len, sample)
            if draft.tokens:
                return draft
        exclude = (key, len(seq))  # the context's own tail has no continuation yet
        for n in reversed(self._live.ngram_sizes):
            if len(seq) < n:
                continue
            gram = tuple(seq[-n:])
            conts = self._live.continuations(gram, max_len, exclude)
            conts += self._past.continuations(gram, max_len)
            if conts:
                return self._from(conts, max_len, sample)
        return EMPTY_DRAFT

    def _draft_from_history(self, key, pkey: str, seq: list[int], max_len: int,
                            sample: bool) -> Draft:
        """The longest match of the context's tail among the prompt's own completions:
        its live siblings' (newest first) and its earlier ones. Its own completion is
        no history (the global stage matches it)."""
        siblings = self._siblings[pkey]
        corpus = self._history.get(pkey)
        for n in reversed(self.ngram_sizes):
            if len(seq) < n:
                continue
            gram = tuple(seq[-n:])
            conts = siblings.continuations(gram, max_len, skip_key=key)
            if corpus is not None:
                conts += corpus.index.continuations(gram, max_len)
            if conts:
                return self._from(conts, max_len, sample, from_history=True)
        return EMPTY_DRAFT

    def _from(self, conts: list[list[int]], max_len: int, sample: bool,
              from_history: bool = False) -> Draft:
        conts = conts[: self.max_occurrences]
        draft = self._sampled(conts, max_len) if sample else self._majority(conts, max_len)
        if from_history and draft.tokens:
            draft.from_history = True  # a new Draft (never the shared EMPTY_DRAFT)
        return draft

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
        self._requests.clear()
        self._siblings.clear()
        self._finished.clear()

    # --- learning ------------------------------------------------------------------

    def learn(self, sequences, time_budget=None) -> dict[str, float]:
        if self.frozen:
            return {}
        sequences = [_as_list(s) for s in sequences]
        stats = self._add(sequences)
        stats.update(self._learn_history(sequences))
        return stats

    def _learn_history(self, sequences: list[list[int]]) -> dict[str, float]:
        """Each rollout's completion goes to the corpus of its prompt: the longest prompt
        registered since the last `learn` that prefixes it (by digest)."""
        by_length: dict[int, set[str]] = {}
        for pkey, n in self._unlearned.items():
            by_length.setdefault(n, set()).add(pkey)
        touched = list(self._unlearned)
        self._unlearned.clear()
        lengths = sorted(by_length, reverse=True)
        completions: dict[str, list[list[int]]] = {}
        for seq in sequences if self.max_history_tokens > 0 else ():
            raw = None
            for n in lengths:
                if n >= len(seq):  # no completion after a prompt this long
                    continue
                raw = raw if raw is not None else _token_bytes(seq)
                pkey = _digest(raw[:n * _TOKEN_BYTES])
                if pkey in by_length[n]:
                    completions.setdefault(pkey, []).append(seq[n - min(n, self._tail):])
                    break
        for pkey in touched:
            self._history.touch(pkey)
        for pkey, seqs in completions.items():
            self._history.add(pkey, seqs)
        return self.history_stats()

    def unlearned_prompts(self) -> list[tuple[str, int]]:
        """The prompts (digest, length) of the requests started since the last `learn`,
        oldest first: what a data-parallel rank shares with the others (`add_unlearned`),
        so that every rank files every rank's rollouts under their prompts."""
        return list(self._unlearned.items())

    def add_unlearned(self, prompts) -> None:
        """Make `prompts` (every rank's `unlearned_prompts`, in rank order) this rank's:
        all ranks then hold the same prompts in the same order."""
        self._unlearned.clear()
        for pkey, n in prompts:
            self._unlearned[pkey] = int(n)
            self._unlearned.move_to_end(pkey)

    def history_stats(self) -> dict[str, float]:
        return {"history_tokens": float(self._history.num_tokens),
                "history_prompts": float(len(self._history))}

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
                "max_corpus_tokens": self.max_corpus_tokens,
                "max_history_tokens": self.max_history_tokens}
        # History: each prompt's completions (prompt tail + completion), least recent first.
        prompts, counts, hist = [], [], []
        for pkey, corpus in self._history.prompts.items():
            seqs = corpus.sequences()
            prompts.append(pkey)
            counts.append(len(seqs))
            hist.extend(seqs)
        tensors["history_tokens"] = torch.tensor([t for s in hist for t in s], dtype=torch.int64)
        tensors["history_lengths"] = torch.tensor([len(s) for s in hist], dtype=torch.int64)
        tensors["history_counts"] = torch.tensor(counts, dtype=torch.int64)
        meta["history_prompts"] = prompts
        return tensors, meta

    def load_state(self, tensors, meta) -> None:
        self.ngram_sizes = tuple(meta["ngram_sizes"])
        self.max_occurrences = int(meta["max_occurrences"])
        self.max_corpus_tokens = int(meta["max_corpus_tokens"])
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences)
        self._past_order.clear()
        self._next_past_key = 0
        self.begin_batch()
        self._add(_split(tensors["corpus_tokens"], tensors["corpus_lengths"]))
        max_history = int(meta.get("max_history_tokens", self.max_history_tokens))
        check_history_budget(max_history)
        self._history = PromptHistory(self.ngram_sizes, self.max_occurrences, max_history)
        self._unlearned.clear()
        if "history_prompts" in meta:  # saved before history drafting: none
            seqs = _split(tensors["history_tokens"], tensors["history_lengths"])
            start = 0
            for pkey, n in zip(meta["history_prompts"], tensors["history_counts"].tolist()):
                self._history.add(pkey, seqs[start:start + n])  # in order: LRU order kept
                start += n


def _split(flat: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    flat, out, start = flat.tolist(), [], 0
    for n in lengths.tolist():
        out.append(flat[start:start + n])
        start += n
    return out


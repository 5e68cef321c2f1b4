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
`propose_both` makes both drafts of a request from one lookup, and the controller keeps
the one it values more.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import ChainMap, Counter, OrderedDict, deque
from collections.abc import Mapping
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


_CODE = 8  # bytes per packed occurrence code (unsigned 64-bit, little-endian)
_SLICE_GRAMS = 256  # n-gram occurrences removed per step of `NGramIndex.removal`


class NGramIndex:
    """n-gram -> the most recent positions where it ended, over a set of sequences.

    Kept compact, since a long-running server or RL run indexes millions of tokens: the
    table is keyed by the n-gram's hash (an int, not the tuple; a collision, at 64 bits
    negligible, could only cost a draft its acceptance, never exactness), and an
    occurrence is one code, sequence number << 32 | end: stored as a bare int while an
    n-gram has one occurrence, packed in `bytes` after (8 per code, oldest first, trimmed
    to the newest `max_occurrences` once past twice that). Neither is an object the
    garbage collector tracks, so the table is not one either: a full collection walks
    only the sequences (lists of token ids), not a container per n-gram (lists of codes
    made it walk millions of objects, a pause of seconds at millions of tokens).

    Sequences are removed (`remove`, `remove_oldest`) at the cost of adding them. With
    FIFO use (each sequence added whole, removed oldest first: the speculator's corpus, a
    prompt's history) `continuations` then answers exactly as an index built afresh over
    the sequences left (`remove_oldest`)."""

    def __init__(self, ngram_sizes: Sequence[int], max_occurrences: int, shards: int = 1):
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, got {shards!r}")
        self.ngram_sizes = tuple(sorted(set(ngram_sizes)))
        self.max_occurrences = max_occurrences
        self.seqs: dict[object, list[int]] = {}
        # n-gram hash -> codes, in `shards` dicts by the hash's low bits: a dict that
        # grows, or is compacted after deletions, rehashes all it holds in one go (~0.1 s
        # per million entries); a shard holds 1/shards of them
        self._shards: list[dict[int, int | bytes]] = [{} for _ in range(shards)]
        self._mask = shards - 1
        self.num_tokens = 0
        self._ids: dict[object, int] = {}  # sequence key -> its number
        self._keys: dict[int, object] = {}  # number -> key
        self._next_id = 0

    @property
    def table(self) -> Mapping[int, int | bytes]:
        """n-gram hash -> its codes (a bare code, or packed), over all shards (read-only)."""
        return self._shards[0] if len(self._shards) == 1 else ChainMap(*self._shards)

    def extend(self, key, new_tokens: Sequence[int]) -> None:
        seq = self.seqs.get(key)
        if seq is None:
            seq = self.seqs[key] = []
        sid = self._ids.get(key)
        if sid is None:
            sid = self._ids[key] = self._next_id
            self._keys[sid] = key
            self._next_id += 1
        shards, mask, base = self._shards, self._mask, sid << 32
        full = 2 * _CODE * self.max_occurrences  # bytes of 2 x max_occurrences codes
        # from where the newest max_occurrences - 1 codes start (none: past the end)
        keep = -_CODE * (self.max_occurrences - 1) if self.max_occurrences > 1 else full
        for tok in new_tokens:
            seq.append(tok)
            end = len(seq)
            for n in self.ngram_sizes:
                if end < n:
                    break
                gram = hash(tuple(seq[end - n:end]))
                table = shards[gram & mask]
                occ = table.get(gram)
                if occ is None:
                    table[gram] = base | end
                elif type(occ) is int:
                    table[gram] = occ.to_bytes(_CODE, "little") + (base | end).to_bytes(_CODE, "little")
                elif len(occ) < full:
                    table[gram] = occ + (base | end).to_bytes(_CODE, "little")
                else:  # past 2 x max_occurrences: the newest max_occurrences stay
                    table[gram] = occ[keep:] + (base | end).to_bytes(_CODE, "little")
        self.num_tokens += len(new_tokens)

    def remove(self, key) -> list[int]:
        """Remove sequence `key` and return its tokens; the cost is that of adding it.

        Each of its occurrences goes from its n-gram's codes (where still held: the
        trimmed ones are gone already). With FIFO use this is exact (`remove_oldest`);
        otherwise an n-gram that occurred more than 2 x `max_occurrences` times may then
        hold fewer of the others' occurrences than an index built afresh would (older
        ones were trimmed): fewer continuations, never a wrong one."""
        seq = self.seqs[key]
        for _ in self.removal(key):
            pass
        return seq

    def removal(self, key, slice_grams: int = _SLICE_GRAMS):
        """`remove`, a slice at a time: a generator that removes up to `slice_grams` of
        the sequence's n-gram occurrences at each `next` (and the sequence with the last
        one), so that a long sequence's removal can be spread over engine steps. Until it
        is done what is left of the sequence still drafts; it must not grow meanwhile."""
        seq, sid = self.seqs[key], self._ids[key]
        shards, mask, base = self._shards, self._mask, sid << 32
        done = 0
        for n in self.ngram_sizes:
            if len(seq) < n:
                break
            # the hashes of its n-grams, ends n, n + 1, ...: hash(tuple(seq[end - n:end]))
            grams = map(hash, zip(*[seq[i:] for i in range(n)]))
            for end, gram in enumerate(grams, n):
                done += 1
                if done == slice_grams:
                    done = 0
                    yield
                code = base | end
                table = shards[gram & mask]
                occ = table.get(gram)
                if occ is None:
                    continue
                if type(occ) is int:
                    if occ == code:
                        del table[gram]
                    continue
                packed = code.to_bytes(_CODE, "little")
                if occ.startswith(packed):  # the oldest: FIFO use
                    rest = occ[_CODE:]
                else:
                    codes = memoryview(occ).cast("Q").tolist()
                    if code not in codes:
                        continue
                    codes.remove(code)
                    rest = array("Q", codes).tobytes()
                # as an index built afresh holds it: bare while one occurrence, or gone
                if len(rest) > _CODE:
                    table[gram] = rest
                elif rest:
                    table[gram] = int.from_bytes(rest, "little")
                else:
                    del table[gram]
        if self._ids.get(key) == sid:  # (not removed meanwhile by another removal)
            del self.seqs[key], self._ids[key], self._keys[sid]
            self.num_tokens -= len(seq)

    def remove_oldest(self, key) -> list[int]:
        """Remove sequence `key`, the oldest in the index (FIFO use: each sequence added
        whole by one `extend`, removed in the order added), and return its tokens.

        Exact: afterwards `continuations` answers as an index built afresh from the
        sequences left would. It reads each n-gram's newest `max_occurrences`
        occurrences; the table holds a gram's occurrences in the order added, the newest
        at least `max_occurrences` of them (or all). This sequence's occurrences are the
        oldest of all, so those still held lead their codes (removed from the front, in
        the order added), and any trimmed before them were older still: this sequence's
        or an already removed one's. E.g., oldest sequence s, cap 2, a gram's codes
        [s:3, s:9, t:4, u:2] -> [t:4, u:2]; [s:9, t:4] -> the bare t:4; a bare s:3 -> the
        gram leaves the table."""
        oldest = next(iter(self.seqs), None)
        if oldest != key:
            raise ValueError(f"remove_oldest({key!r}): the oldest sequence in the index is "
                             f"{oldest!r}; remove sequences in the order they were added")
        return self.remove(key)

    def occurrences(self, gram_hash: int) -> Sequence[int]:
        """The codes of an n-gram (by hash) that drafting reads: its newest
        `max_occurrences`, oldest first."""
        occ = self._shards[gram_hash & self._mask].get(gram_hash)
        if occ is None:
            return ()
        if type(occ) is int:
            return (occ,)
        return memoryview(occ[-_CODE * self.max_occurrences:]).cast("Q").tolist()

    def continuations(self, gram: tuple[int, ...], length: int, exclude=None, skip_key=None):
        """Up to `length` tokens following each occurrence of `gram`, newest first
        (but the occurrence `exclude`, a (key, end) pair, and those in sequence `skip_key`)."""
        gram_hash = hash(tuple(gram))  # as `occurrences`, inline: the hot path
        occ = self._shards[gram_hash & self._mask].get(gram_hash)
        if occ is None:
            return []
        if type(occ) is int:
            codes = (occ,)
        else:
            codes = memoryview(occ[-_CODE * self.max_occurrences:]).cast("Q").tolist()
            codes.reverse()
        out = []
        for code in codes:
            key, end = self._keys[code >> 32], code & 0xFFFFFFFF
            if (key, end) == exclude or key == skip_key:
                continue
            seq = self.seqs.get(key)
            if seq is None or end >= len(seq):
                continue
            out.append(seq[end:end + length])
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
        """Drop the oldest completions until at most `max_tokens` tokens are left (each
        at the cost of adding it: `NGramIndex.remove_oldest`)."""
        while self.order and self.num_tokens > max_tokens:
            self.index.remove_oldest(self.order.popleft())


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


# The corpus' and the live requests' tables (millions of entries) in shards; a prompt's
# history and its siblings' (thousands) in one dict each.
_SHARDS = 64


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
        self._live = NGramIndex(self.ngram_sizes, self.max_occurrences, _SHARDS)
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences, _SHARDS)
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
        self._retiring: deque = deque()  # removals of dropped contexts under way
        self._retiring_slices = 0  # their slices left, about
        self.max_finished_live = max(1, int(max_finished_live))

    #: Most prompts remembered between two `learn` calls (to key the rollouts learned).
    max_unlearned_prompts = 65536
    #: Slices of `_SLICE_GRAMS` n-gram occurrences of dropped contexts removed per
    #: `propose` or `finish` call at least (~1.5 ms on a 2-core Xeon).
    retire_slices = 4
    # max_finished_live: most finished requests whose contexts keep drafting for the live
    # ones. A batch's finished requests draft for the rest of it (`begin_batch` drops
    # them); a server has no batches, so past this bound the oldest is dropped as each
    # new one finishes (their rollouts reach the corpus by `learn`): a long-running
    # server's memory stays bounded, and its removal is spread over the next calls
    # (`_retire`): no step pays for a whole context, however long.

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
        while len(self._finished) > self.max_finished_live:
            self._drop_finished()
        self._retire()

    def _drop_finished(self) -> None:
        """Forget the oldest finished request's context: its removal from the live index
        and its siblings' (`NGramIndex.removal`: no index is rebuilt) is queued, and done
        a bounded amount per call (`_retire`)."""
        key, pkey = self._finished.popitem(last=False)
        if key in self._live.seqs:
            self._queue_removal(self._live.removal(key), len(self._live.seqs[key]))
        siblings = self._siblings.get(pkey) if pkey is not None else None
        if siblings is not None and key in siblings.seqs:
            self._queue_removal(self._sibling_removal(pkey, siblings, key),
                                len(siblings.seqs[key]))

    def _sibling_removal(self, pkey: str, siblings: NGramIndex, key):
        yield from siblings.removal(key)
        if not siblings.seqs and self._siblings.get(pkey) is siblings:
            del self._siblings[pkey]  # no request of that prompt drafts from them

    def _queue_removal(self, removal, num_tokens: int) -> None:
        self._retiring.append(removal)
        self._retiring_slices += -(-num_tokens * len(self.ngram_sizes) // _SLICE_GRAMS)

    def _retire(self, slices: float | None = None) -> None:
        """Advance the queued removals of dropped contexts by `slices` slices of
        `_SLICE_GRAMS` n-gram occurrences: by default `retire_slices`, or an eighth of the
        backlog if more (so that it drains within a few calls however fast requests
        finish); the cost per call is bounded whatever a context's length."""
        if slices is None:
            slices = max(self.retire_slices, self._retiring_slices // 8)
        while self._retiring and slices > 0:
            if next(self._retiring[0], StopIteration) is StopIteration:
                self._retiring.popleft()
            else:
                slices -= 1
                self._retiring_slices -= 1
        if not self._retiring:
            self._retiring_slices = 0

    # --- drafting ------------------------------------------------------------------

    def propose(self, keys, contexts, max_lengths, sample=None) -> list[Draft]:
        seqs = self._begin_drafting(keys, contexts)
        drafts = []
        for i, (key, seq, max_len) in enumerate(zip(keys, seqs, max_lengths)):
            drafts.append(self._draft(key, seq, max_len, bool(sample and sample[i]))
                          if max_len > 0 else EMPTY_DRAFT)
        return drafts

    drafts_both_kinds = True

    def propose_both(self, keys, contexts, max_lengths) -> list[tuple[Draft, Draft]]:
        """Both drafts of each request from one lookup: the majority branch (one-hot)
        and a draft sampled from the same continuations (their q to the verifier)."""
        seqs = self._begin_drafting(keys, contexts)
        pairs = []
        for key, seq, max_len in zip(keys, seqs, max_lengths):
            conts, from_history = self._continuations(key, seq, max_len) if max_len > 0 \
                else ([], False)
            pairs.append((self._from(conts, max_len, False, from_history),
                          self._from(conts, max_len, True, from_history)) if conts
                         else (EMPTY_DRAFT, EMPTY_DRAFT))
        return pairs

    def _begin_drafting(self, keys, contexts) -> list[list[int]]:
        """Retire what is due, then bring every request's context up to date first, so
        that siblings see each other's latest tokens; the contexts, as the index holds them."""
        self._retire()
        return [self._sync_live(key, context) for key, context in zip(keys, contexts)]

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
        conts, from_history = self._continuations(key, seq, max_len)
        return self._from(conts, max_len, sample, from_history) if conts else EMPTY_DRAFT

    def _continuations(self, key, seq: list[int], max_len: int) -> tuple[list, bool]:
        """What the draft follows: the continuations of the context's longest matching
        tail in the request's history, else in the global corpus; and whether they
        came from its history."""
        request = self._requests.get(key)
        if request is not None:
            conts = self._history_continuations(key, request[0], seq, max_len)
            if conts:
                return conts, True
        exclude = (key, len(seq))  # the context's own tail has no continuation yet
        for n in reversed(self._live.ngram_sizes):
            if len(seq) < n:
                continue
            gram = tuple(seq[-n:])
            conts = self._live.continuations(gram, max_len, exclude)
            conts += self._past.continuations(gram, max_len)
            if conts:
                return conts, False
        return [], False

    def _history_continuations(self, key, pkey: str, seq: list[int], max_len: int) -> list:
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
                return conts
        return []

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
        self._retiring.clear()
        self._retiring_slices = 0
        self._live = NGramIndex(self.ngram_sizes, self.max_occurrences, _SHARDS)
        self._requests.clear()
        self._siblings.clear()
        self._finished.clear()

    # --- learning ------------------------------------------------------------------

    def learn(self, sequences, time_budget=None, stop=None) -> dict[str, float]:
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
        """The corpus keeps the newest sequences within `max_corpus_tokens`: the longest
        run of the newest whose tokens fit, FIFO. Eviction is incremental: the oldest go
        one at a time (`NGramIndex.remove_oldest`), so a call costs what it adds and
        removes, never a rebuild of the corpus. New sequences that would not survive the
        call are never indexed."""
        sequences = [_as_list(s) for s in sequences]
        keep, total = len(sequences), 0
        while keep and total + len(sequences[keep - 1]) <= self.max_corpus_tokens:
            keep -= 1
            total += len(sequences[keep])
        # first, so that memory never holds more than the bound; where a new sequence
        # does not fit, no older one stays either
        self._evict(self.max_corpus_tokens - total if keep == 0 else -1)
        for seq in sequences[keep:]:
            key = self._next_past_key
            self._next_past_key += 1
            self._past.extend(key, seq)
            self._past_order.append(key)
        return {"index_tokens": float(self._past.num_tokens),
                "index_sequences": float(len(self._past.seqs))}

    def _evict(self, max_tokens: int) -> None:
        """Drop the oldest sequences until at most `max_tokens` tokens are left (-1: all)."""
        while self._past_order and self._past.num_tokens > max_tokens:
            self._past.remove_oldest(self._past_order.popleft())

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
        self._past = NGramIndex(self.ngram_sizes, self.max_occurrences, _SHARDS)
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


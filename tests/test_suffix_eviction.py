"""The suffix corpus past `max_corpus_tokens`: incremental eviction against an index
built afresh over the same retained sequences (the reference), and the bound."""

from __future__ import annotations

import math
import random

import pytest

from atlas_rl.speculators import NGramIndex, SuffixSpeculator
from atlas_rl.speculators.suffix import PromptCorpus, _split


def _retained(spec: SuffixSpeculator) -> list[list[int]]:
    """The corpus the speculator keeps, oldest first (as `state()` saves it)."""
    tensors, _ = spec.state()
    return _split(tensors["corpus_tokens"], tensors["corpus_lengths"])


def _view(index: NGramIndex) -> dict[int, tuple]:
    """What `continuations` reads: per n-gram hash, its newest `max_occurrences`
    occurrences as (sequence's rank among the index's sequences, end): the same for two
    indexes over the same sequences in the same order, whatever their keys."""
    rank = {index._ids[key]: i for i, key in enumerate(index.seqs)}
    return {gram: tuple((rank[c >> 32], c & 0xFFFFFFFF) for c in index.occurrences(gram))
            for gram in index.table}


def _fresh(sizes, cap, sequences) -> NGramIndex:
    index = NGramIndex(sizes, cap)
    for i, seq in enumerate(sequences):
        index.extend(i, seq)
    return index


def _rollout(rng: random.Random, vocab: int, phrases: list[list[int]]) -> list[int]:
    """Random lengths (some empty, some past a small bound), tokens from a small vocabulary
    and shared phrases: n-grams recur in many sequences, so occurrence lists fill past
    `max_occurrences` and get trimmed."""
    out: list[int] = []
    length = rng.choice([0, 1, 2, 5, 20, 40, 80, 200])
    while len(out) < length:
        out += rng.choice(phrases) if rng.random() < 0.5 else [rng.randrange(vocab)]
    return out[:length]


def _proposals(spec: SuffixSpeculator, contexts, sample: bool):
    out = []
    for i, ctx in enumerate(contexts):
        spec.begin_batch()  # only the corpus drafts: no live request carries over
        (d,) = spec.propose([f"q{i}"], [ctx], [4], sample=[sample])
        q = None if d.q is None else (d.q_ids.tolist(), d.q.tolist())
        out.append((d.tokens, d.confidence, q))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_eviction_answers_as_an_index_built_afresh(seed):
    """Many rounds of learning past a small bound: after each, the table (every n-gram's
    occurrences that drafting reads), the counts and the drafts (majority and sampled)
    equal those of an index built from scratch over the retained sequences."""
    rng = random.Random(seed)
    sizes, cap, bound = (1, 2, 3, 5), 3, 400
    phrases = [[rng.randrange(12) for _ in range(rng.randint(2, 6))] for _ in range(8)]
    spec = SuffixSpeculator(ngram_sizes=sizes, max_occurrences=cap, max_corpus_tokens=bound,
                            max_history_tokens=0)
    learned: list[list[int]] = []
    for round_ in range(120):
        batch = [_rollout(rng, 12, phrases) for _ in range(rng.choice([1, 1, 2, 3, 6]))]
        learned += batch
        stats = spec.learn(batch)
        kept = _retained(spec)
        fresh = _fresh(sizes, cap, kept)
        assert _view(spec._past) == _view(fresh), f"round {round_}"
        assert set(spec._past.table) == set(fresh.table)
        assert stats["index_tokens"] == fresh.num_tokens == sum(map(len, kept))
        assert stats["index_sequences"] == len(kept) == len(spec._past._keys)
        if round_ % 10 == 0:
            reference = SuffixSpeculator(ngram_sizes=sizes, max_occurrences=cap,
                                         max_corpus_tokens=10**9, max_history_tokens=0,
                                         seed=round_)
            reference.learn(kept)
            spec._generator.manual_seed(round_)
            contexts = [_rollout(rng, 12, phrases)[:rng.randint(1, 12)] or [0]
                        for _ in range(30)] + [s[-6:] for s in kept[-5:] if s]
            for sample in (False, True):
                assert _proposals(spec, contexts, sample) == _proposals(reference, contexts, sample)
    assert len(learned) > len(_retained(spec))  # it evicted


def test_the_corpus_keeps_the_newest_sequences_that_fit_the_bound():
    """FIFO within the bound: after every learn, at most `max_corpus_tokens` tokens, and
    they are the longest run of the newest sequences that fits (a sequence longer than
    the bound empties the corpus; so does one that does not fit after newer ones)."""
    rng = random.Random(3)
    bound = 250
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_corpus_tokens=bound, max_history_tokens=0)
    learned: list[list[int]] = []
    for _ in range(200):
        batch = [[rng.randrange(50) for _ in range(rng.choice([0, 3, 30, 90, 240, 260]))]
                 for _ in range(rng.choice([1, 2, 4]))]
        learned += batch
        expected, total = [], 0
        for seq in reversed(learned):
            if total + len(seq) > bound:
                break
            expected.insert(0, seq)
            total += len(seq)
        stats = spec.learn(batch)
        assert stats["index_tokens"] <= bound
        assert _retained(spec) == expected


def test_a_learn_past_the_bound_indexes_only_what_it_learns(monkeypatch):
    """No rebuild: a learn call that takes the corpus past its bound puts into the index
    only the tokens it learns (the oldest sequences are removed from it), not the
    retained corpus again; and so does every learn after."""
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_corpus_tokens=10_000, max_history_tokens=0)
    rng = random.Random(4)
    for _ in range(50):
        spec.learn([[rng.randrange(100) for _ in range(200)]])
    assert spec._past.num_tokens == 10_000  # at the bound, not past it
    extended = []
    extend = NGramIndex.extend
    monkeypatch.setattr(NGramIndex, "extend",
                        lambda self, key, toks: (extended.append(len(toks)), extend(self, key, toks))[1])
    for _ in range(5):
        extended.clear()
        spec.learn([[rng.randrange(100) for _ in range(300)]])
        assert sum(extended) == 300
        assert 10_000 - 200 < spec._past.num_tokens <= 10_000


def test_prompt_history_past_its_bound_answers_as_one_built_afresh():
    """One prompt's completions over the history budget keep their newest (`keep_newest`,
    incremental): the same occurrences as a corpus built from the kept completions."""
    rng = random.Random(5)
    corpus = PromptCorpus((2, 4), 2)
    for _ in range(300):
        corpus.add([rng.randrange(6) for _ in range(rng.randint(1, 30))])
        corpus.keep_newest(200)
        assert corpus.num_tokens <= 200
        assert _view(corpus.index) == _view(_fresh((2, 4), 2, corpus.sequences()))


def test_remove_oldest_refuses_another_sequence():
    index = NGramIndex((2,), 4)
    index.extend("a", [1, 2, 3])
    index.extend("b", [1, 2, 4])
    with pytest.raises(ValueError, match="oldest sequence in the index is 'a'"):
        index.remove_oldest("b")
    assert index.remove_oldest("a") == [1, 2, 3]
    assert index.table == {hash((1, 2)): index._ids["b"] << 32 | 2,
                           hash((2, 4)): index._ids["b"] << 32 | 3}


def test_a_saved_corpus_past_the_bound_loads_as_learnt():
    """The state format is the corpus' sequences, oldest first, as before: a state saved
    after evictions loads with the same corpus and drafts; one saved by the earlier
    rebuild (any run of newest sequences within the bound) loads as it was."""
    rng = random.Random(6)
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_corpus_tokens=500)
    for _ in range(40):
        spec.learn([[rng.randrange(20) for _ in range(rng.randint(5, 60))]])
    other = SuffixSpeculator()
    other.load_state(*spec.state())
    assert _retained(other) == _retained(spec) and other.max_corpus_tokens == 500
    assert _view(other._past) == _view(spec._past)
    contexts = [[rng.randrange(20) for _ in range(4)] for _ in range(20)]
    assert _proposals(other, contexts, False) == _proposals(spec, contexts, False)


def _serve(spec: SuffixSpeculator, rng: random.Random, vocab: int, requests: int):
    """A server's life (no batches): requests of a few prompts start, grow a few tokens a
    step (drafted for), finish. Returns what reached the live index, (key, new tokens),
    in order."""
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(2, 8))] for _ in range(4)]
    events, running, started = [], {}, 0
    while started < requests or running:
        while started < requests and len(running) < 6:
            key, prompt = f"r{started}", rng.choice(prompts)
            spec.begin_request(key, prompt)
            running[key] = (list(prompt), rng.randint(1, 40))
            started += 1
        keys = list(running)
        for key in keys:
            context, _ = running[key]
            context += [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
        before = {key: len(spec._live.seqs.get(key, ())) for key in keys}
        spec.propose(keys, [running[k][0] for k in keys], [2] * len(keys))
        for key in keys:
            context, length = running[key]
            events.append((key, context[before[key]:]))
            if len(context) >= length:
                del running[key]
                spec.finish(key)
    return events


def test_finished_requests_leave_the_live_index_one_at_a_time_without_a_rebuild(monkeypatch):
    """A server past `max_finished_live`: each finish drops the oldest finished context by
    removing it (no index is rebuilt: nothing is re-added), and the live index answers as
    one replayed without the dropped contexts (a vocabulary wide enough that no n-gram's
    occurrences were trimmed: exact)."""
    rng = random.Random(7)
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_occurrences=64, max_finished_live=5)
    extended = []
    extend = NGramIndex.extend
    monkeypatch.setattr(NGramIndex, "extend",
                        lambda self, key, toks: (extended.append(key), extend(self, key, toks))[1])
    finish = SuffixSpeculator.finish

    def finishing(self, key):
        extended.clear()
        finish(self, key)
        assert not extended  # a finish adds nothing to any index
        assert len(self._finished) <= 5

    monkeypatch.setattr(SuffixSpeculator, "finish", finishing)
    events = _serve(spec, rng, vocab=5000, requests=60)
    spec._retire(math.inf)  # the removals still under way, to their end
    live = NGramIndex(spec.ngram_sizes, 64)
    for key, tokens in events:
        if key in spec._live.seqs:
            live.extend(key, tokens)
    assert list(spec._live.seqs) == list(live.seqs) and len(spec._live.seqs) == 5
    assert _view(spec._live) == _view(live)
    assert set(spec._live.table) == set(live.table)


def test_a_dropped_context_leaves_no_occurrence_behind_when_lists_were_trimmed():
    """With n-grams frequent enough to be trimmed, the live and sibling indexes after drops
    hold, per n-gram, the newest occurrences of the remaining contexts (a suffix of what
    an index replayed without the dropped ones reads: possibly fewer, never a dropped
    context's or a wrong one)."""
    rng = random.Random(8)
    spec = SuffixSpeculator(ngram_sizes=(1, 2), max_occurrences=2, max_finished_live=4)
    events = _serve(spec, rng, vocab=3, requests=80)
    spec._retire(math.inf)
    live = NGramIndex(spec.ngram_sizes, 2)
    for key, tokens in events:
        if key in spec._live.seqs:
            live.extend(key, tokens)
    held, replayed = _view(spec._live), _view(live)
    assert set(held) <= set(replayed)
    for gram, codes in held.items():
        assert 0 < len(codes) and replayed[gram][len(replayed[gram]) - len(codes):] == codes
    for index in spec._siblings.values():  # every code names a sequence it holds
        for gram in index.table:
            assert all((c >> 32) in index._keys for c in index.occurrences(gram))


def test_the_garbage_collector_does_not_walk_the_index():
    """The tables hold ints and bytes only, so Python's garbage collector tracks none of
    them: a full collection's pause does not grow with the corpus (lists of occurrences
    made it walk millions of objects)."""
    import gc

    rng = random.Random(9)
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_corpus_tokens=5000)
    for _ in range(40):
        spec.learn([[rng.randrange(30) for _ in range(200)]])
    spec.begin_request("a", [1, 2, 3])
    spec.propose(["a"], [[1, 2, 3] + [rng.randrange(30) for _ in range(300)]], [2])
    assert spec._past.num_tokens == 5000 and len(spec._past.table) > 100
    for index in (spec._past, spec._live, *spec._siblings.values()):
        assert not any(gc.is_tracked(shard) for shard in index._shards)


def test_a_long_finished_context_leaves_over_several_calls_each_bounded():
    """A dropped context's removal is spread over the next `propose`/`finish` calls, each
    removing at most `retire_slices` slices (or an eighth of the backlog): a step never
    pays for a whole long context; the backlog drains, and the live index ends as one
    that never saw it."""
    from atlas_rl.speculators import suffix

    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_finished_live=1)
    rng = random.Random(10)
    long = [rng.randrange(10_000) for _ in range(20_000)]
    spec.begin_request("long", [1, 2])
    spec.propose(["long"], [[1, 2] + long], [0])
    spec.finish("long")
    entries = len(spec._live.table)
    spec.begin_request("b", [1, 2])
    spec.propose(["b"], [[1, 2, 3, 4]], [0])
    spec.finish("b")  # drops "long": queued, begun
    assert "long" in spec._live.seqs and spec._retiring
    removed, calls = [entries - len(spec._live.table)], 1
    while spec._retiring:
        before = len(spec._live.table)
        spec.propose(["c"], [[5, 6]], [1])
        removed.append(before - len(spec._live.table))
        calls += 1
    total = 2 * 2 * len(long)  # its n-grams, in the live and the siblings' index
    assert 4 <= calls <= 30
    assert max(removed) <= total / 8 + spec.retire_slices * suffix._SLICE_GRAMS
    assert "long" not in spec._live.seqs and set(spec._live.seqs) == {"b", "c"}
    fresh = NGramIndex(spec.ngram_sizes, spec.max_occurrences)
    fresh.extend("b", [1, 2, 3, 4])
    fresh.extend("c", [5, 6])
    assert _view(spec._live) == _view(fresh)

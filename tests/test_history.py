"""History drafting (issue 17, item 5): a request whose prompt was seen before drafts
from that prompt's earlier completions and from its live siblings, before the global
n-gram index; the per-prompt corpus stays within its token budget (least recently used
prompts evicted first) and survives save/load. One test runs the real engine."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.config import AtlasConfig
from atlas_rl.speculators import SuffixSpeculator
from atlas_rl.speculators.suffix import prompt_key

P1 = [100, 101, 102, 103]
P2 = [200, 201, 202, 203]
SHARED = [5, 6, 7, 8]  # both prompts' completions start alike, then part ways


def _generate(spec: SuffixSpeculator, prompts_and_completions) -> list[list[int]]:
    """What the proposer does over one generate call: a new batch, each request
    announced with its prompt, its context growing; returns the rollouts to learn."""
    spec.begin_batch()
    rollouts = []
    for i, (prompt, completion) in enumerate(prompts_and_completions):
        spec.begin_request(f"g{i}", prompt)
        spec.propose([f"g{i}"], [prompt + completion], [0])
        rollouts.append(prompt + completion)
    return rollouts


def test_drafts_follow_the_same_prompts_earlier_completion():
    spec = SuffixSpeculator(ngram_sizes=(2, 3))
    # Epoch 1: P1 once, P2 twice; after SHARED, P1 went on with 10, 11, 12 and P2 with
    # 20, 21, 22: globally, P2's continuation is the majority.
    spec.learn(_generate(spec, [(P1, SHARED + [10, 11, 12]), (P2, SHARED + [20, 21, 22]),
                                (P2, SHARED + [20, 21, 22])]))
    assert spec.history_stats()["history_prompts"] == 2
    # Epoch 2: each prompt's request drafts its own prompt's continuation.
    spec.begin_batch()
    spec.begin_request("a", P1)
    spec.begin_request("b", P2)
    a, b = spec.propose(["a", "b"], [P1 + SHARED, P2 + SHARED], [3, 3])
    assert a.tokens == [10, 11, 12] and a.from_history
    assert b.tokens == [20, 21, 22] and b.from_history
    assert a.confidence == pytest.approx([0.5] * 3)  # one earlier completion: 1 / (1 + 1)
    # Its first draft, right after the prompt, comes from the same history too.
    spec.begin_request("c", P1)
    (c,) = spec.propose(["c"], [P1 + [5]], [3])
    assert c.tokens == [6, 7, 8] and c.from_history
    # A request whose prompt the speculator was not told drafts from the global index:
    # the majority branch, not a history draft.
    (g,) = spec.propose(["unknown"], [[999] + SHARED], [3])
    assert g.tokens == [20, 21, 22] and not g.from_history
    # A rollout of a prompt never registered (another rank's) goes to the global index only.
    spec.learn([[300, 301, 302] + SHARED + [30, 31]])
    assert spec.history_stats()["history_prompts"] == 2


def test_live_siblings_of_the_same_prompt_draft_for_each_other():
    spec = SuffixSpeculator(ngram_sizes=(2,))
    spec.begin_batch()
    for key, prompt in (("a", P1), ("b", P1), ("c", P2)):
        spec.begin_request(key, prompt)
    # a (prompt P1) is ahead of its sibling b; c, another prompt's request, continued
    # the same bigram (1, 2) differently, and more recently.
    drafts = spec.propose(["a", "c", "b"], [P1 + [1, 2, 3, 4, 5], P2 + [1, 2, 9, 9, 9], P1 + [1, 2]],
                          [0, 0, 3])
    assert drafts[2].tokens == [3, 4, 5] and drafts[2].from_history
    spec.finish("c")  # a finished sibling still drafts for the rest of its batch
    spec.begin_request("d", P2)
    (d,) = spec.propose(["d"], [P2 + [1, 2]], [3])
    assert d.tokens == [9, 9, 9] and d.from_history
    # Its own tail is no sibling: a lone request of a new prompt has no history draft.
    spec.begin_request("e", [7, 7, 7])
    (e,) = spec.propose(["e"], [[7, 7, 7, 1, 2]], [2])
    assert not e.from_history
    spec.begin_batch()  # the batch is over: siblings are no longer live
    spec.begin_request("b2", P1)
    (b2,) = spec.propose(["b2"], [P1 + [1, 2]], [3])
    assert not b2.from_history


def _tokens_held(spec: SuffixSpeculator) -> int:
    return sum(len(s) for c in spec._history.prompts.values() for s in c.sequences())


def test_history_stays_within_its_budget_evicting_least_recently_used_prompts():
    budget = 60
    spec = SuffixSpeculator(ngram_sizes=(2,), max_history_tokens=budget)
    prompts = [[1000 + i, 1, 2] for i in range(12)]

    def completion(i, j=0):
        return [50 + i, 60 + j] + list(range(300, 316))  # 18 tokens (+ 2 of prompt tail)

    def learn(i):
        stats = spec.learn(_generate(spec, [(prompts[i], completion(i))]))
        assert stats["history_tokens"] <= budget
        assert stats["history_tokens"] == _tokens_held(spec) == spec._history.num_tokens

    def held():
        return [[prompt_key(p) for p in prompts].index(k) for k in spec._history.prompts]

    for i in range(3):  # 20 tokens a prompt: 3 fit
        learn(i)
    assert held() == [0, 1, 2]  # least recently used first
    spec.begin_batch()
    spec.begin_request("r", prompts[0])  # a request of prompt 0 starts: it is used ...
    assert held() == [0, 1, 2]  # ... as of the batch's learn (the order all ranks share)
    learn(3)
    assert held() == [2, 0, 3]  # prompt 1 went, not the older prompt 0 (not FIFO)
    learn(4)
    assert held() == [0, 3, 4]
    for i in range(5, 12):
        learn(i)
    assert held() == [9, 10, 11]
    # A prompt over the budget on its own keeps its newest completions.
    spec.learn(_generate(spec, [(prompts[0], completion(0, j)) for j in range(5)]))
    assert spec._history.num_tokens <= budget and list(spec._history.prompts) == [prompt_key(prompts[0])]
    (corpus,) = spec._history.prompts.values()
    assert [s[3] for s in corpus.sequences()] == [62, 63, 64]  # completions j = 2, 3, 4
    # Budget 0: no history at all; a bad budget is refused with the value and the fix.
    off = SuffixSpeculator(ngram_sizes=(2,), max_history_tokens=0)
    assert off.learn(_generate(off, [(P1, [1, 2, 3])]))["history_tokens"] == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"max_history_tokens .*got {bad!r}.*AtlasConfig\("):
            AtlasConfig(max_history_tokens=bad)
    assert AtlasConfig().max_history_tokens > 0


def test_history_distribution_draft_is_the_prompts_empirical_continuation():
    spec = SuffixSpeculator(ngram_sizes=(2,), seed=1)
    # P1 continued (1, 2) with 3 three times and with 6 once; P2 always with 7.
    spec.learn(_generate(spec, [(P1, [1, 2, 3, 4]), (P1, [1, 2, 3, 5]), (P1, [1, 2, 3, 4]),
                                (P1, [1, 2, 6, 7])] + [(P2, [1, 2, 7, 7])] * 6))
    seen = set()
    for i in range(100):
        spec.begin_batch()
        spec.begin_request(f"r{i}", P1)
        (d,) = spec.propose([f"r{i}"], [P1 + [9, 1, 2]], [2], sample=[True])
        assert d.is_distribution and d.from_history and d.source == "suffix"
        for pos in range(len(d)):
            ids, q = d.q_ids[pos], d.q[pos]
            support = ids[q > 0].tolist()
            assert len(support) == len(set(support))  # distinct ids
            assert torch.all(q >= 0) and float(q.sum()) == pytest.approx(1.0)
            assert d.tokens[pos] in support
        q0 = dict(zip(d.q_ids[0].tolist(), d.q[0].tolist()))
        assert q0 == pytest.approx({3: 0.75, 6: 0.25})  # P1's history only: no 7
        if d.tokens[0] == 3:
            assert dict(zip(d.q_ids[1].tolist(), d.q[1].tolist())) == pytest.approx({4: 2 / 3, 5: 1 / 3})
        seen.add(d.tokens[0])
    assert seen == {3, 6}


def test_history_state_round_trip(tmp_path):
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_history_tokens=500)
    spec.learn(_generate(spec, [(P1, SHARED + [10, 11, 12]), (P2, SHARED + [20, 21, 22]),
                                (P1, SHARED + [10, 11, 13])]))
    spec.begin_batch()
    spec.begin_request("t", P1)  # used as of the next learn, not yet
    spec.save(tmp_path)
    other = SuffixSpeculator()
    other.load(tmp_path)
    assert other.max_history_tokens == 500
    assert list(other._history.prompts) == list(spec._history.prompts) == [prompt_key(P1), prompt_key(P2)]
    assert other.history_stats() == spec.history_stats()
    for prompt, want in ((P1, [10, 11, 13]), (P2, [20, 21, 22])):  # ties: newest
        drafts = []
        for s in (spec, other):
            s.begin_batch()
            s.begin_request("x", prompt)
            drafts.append(s.propose(["x"], [prompt + SHARED], [3])[0])
        assert drafts[0].tokens == drafts[1].tokens == want and drafts[1].from_history
    # State saved before history drafting existed loads with an empty history.
    tensors, meta = spec.state()
    for k in ("history_tokens", "history_lengths", "history_counts"):
        tensors.pop(k)
    del meta["history_prompts"], meta["max_history_tokens"]
    old = SuffixSpeculator()
    old.load_state(tensors, meta)
    assert old.history_stats()["history_prompts"] == 0 and old._past.num_tokens == spec._past.num_tokens


def test_history_and_global_drafts_are_counted_apart_under_registered_names():
    from atlas_rl.metrics import (SpecCounters, summarize_history, trainer_metric_names,
                                  trainer_metrics)

    c = SpecCounters()
    c.record_verified(4, 4, "suffix", history=True)
    c.record_verified(2, 0, "suffix-dist", history=True)
    c.record_verified(3, 1, "suffix")
    c.record_verified(5, 5, "neural")  # not the suffix index's: neither
    s = summarize_history(c)
    assert s["num_history_drafts"] == 2 and s["num_global_drafts"] == 1
    assert s["drafts_history"] == pytest.approx(2 / 3)
    assert s["acceptance_length_history"] == pytest.approx(1 + 4 / 2)
    assert s["acceptance_length_global"] == pytest.approx(1 + 1 / 1)
    later = c.copy()
    later.record_verified(1, 1, "suffix", history=True)
    assert summarize_history(later.since(c))["num_history_drafts"] == 1
    logged = trainer_metrics(s, {}, 0.0)
    assert {"atlas/drafts_history", "atlas/acceptance_length_history",
            "atlas/acceptance_length_global"} <= set(logged) <= set(trainer_metric_names())
    assert summarize_history(SpecCounters()) == {"drafts_history": 0.0, "num_history_drafts": 0,
                                                 "num_global_drafts": 0}


# --- through the real engine ------------------------------------------------------------

@pytest.mark.slow
def test_second_epoch_drafts_from_history_and_stays_exact(make_engine, real_model_path):
    """Two epochs over the same prompts, greedy: in the second, the suffix index drafts
    from each prompt's first-epoch completion, and the output is token for token what
    decoding without speculation gives."""
    prompts = ["Write a Python function that returns the n-th Fibonacci number.",
               "List three prime numbers and explain why each is prime."]
    cfg = dict(dtype="float32", neural_drafter=False, speculate_always=True, explore=0.0)
    baseline = make_engine(real_model_path, "none", **cfg).generate(
        prompts, temperature=0.0, max_tokens=48)
    engine = make_engine(real_model_path, "atlas", **cfg)
    first = engine.generate(prompts, temperature=0.0, max_tokens=48)
    info = engine.update(first)
    assert info["history_prompts"] == len(prompts) and info["history_tokens"] > 0
    second = engine.generate(prompts, temperature=0.0, max_tokens=48)
    for batch in (first, second):
        assert batch.completion_ids == baseline.completion_ids
    assert first.stats["num_history_drafts"] == 0  # one request a prompt, nothing learned yet
    s = second.stats
    assert s["num_history_drafts"] > 0 and s["drafts_history"] > 0.5, s
    # The same greedy completion again: its history drafts are accepted nearly whole.
    assert s["acceptance_length_history"] > 3.0, s
    assert s["acceptance_length"] > first.stats["acceptance_length"], (first.stats, s)

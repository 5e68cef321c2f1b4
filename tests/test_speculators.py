"""SuffixSpeculator and ThresholdController, without vLLM."""

from __future__ import annotations

import pytest

from atlas_rl.controller import ConfidenceCalibrator, ThresholdController
from atlas_rl.speculators import Draft, SuffixSpeculator


def test_drafts_from_learned_rollouts_with_majority_confidence():
    spec = SuffixSpeculator(ngram_sizes=(2, 3))
    spec.learn([[1, 2, 3, 4, 5, 6], [9, 2, 3, 4, 5, 7], [8, 2, 3, 4, 5, 6]])
    (draft,) = spec.propose(["r"], [[0, 0, 2, 3]], [4])
    assert draft.tokens == [4, 5, 6]
    # 3 occurrences agree on 4 and 5 (3/(3+1)); 2 of 3 continue with 6 (2/(3+1)).
    assert draft.confidence == pytest.approx([0.75, 0.75, 0.5])


def test_drafts_from_sibling_requests_of_the_same_batch():
    spec = SuffixSpeculator(ngram_sizes=(2,))
    spec.begin_batch()
    # Request a is ahead of its sibling b; b's tail (7, 8) was continued by a with 9, 10.
    spec.propose(["a"], [[5, 7, 8, 9, 10, 11]], [0])
    (draft,) = spec.propose(["b"], [[5, 7, 8]], [3])
    assert draft.tokens == [9, 10, 11]
    spec.begin_batch()  # a new generate call forgets the live requests
    (draft,) = spec.propose(["b"], [[5, 7, 8]], [3])
    assert draft.tokens == []


def test_prompt_lookup_within_own_context_excludes_its_own_tail():
    spec = SuffixSpeculator(ngram_sizes=(2,))
    (draft,) = spec.propose(["r"], [[1, 2, 3, 4, 1, 2]], [2])
    assert draft.tokens == [3, 4]
    spec.begin_batch()
    (draft,) = spec.propose(["s"], [[1, 2]], [2])
    assert draft.tokens == []  # its only occurrence is the tail itself


def test_max_length_zero_still_indexes_context():
    spec = SuffixSpeculator(ngram_sizes=(2,))
    assert spec.propose(["a"], [[4, 5, 6, 7]], [0])[0].tokens == []
    assert spec.propose(["b"], [[4, 5]], [2])[0].tokens == [6, 7]


def test_corpus_stays_under_its_bound_and_keeps_newest():
    spec = SuffixSpeculator(ngram_sizes=(2,), max_corpus_tokens=100)
    for i in range(50):
        spec.learn([[1000 + i, 1, 2, 3 + i, 4, 5, 6, 7, 8, 9]])
    assert spec._past.num_tokens <= 100
    (draft,) = spec.propose(["r"], [[1, 2]], [1])
    assert draft.tokens == [3 + 49]  # newest occurrence first in the majority tie


def test_save_load_roundtrip(tmp_path):
    spec = SuffixSpeculator(ngram_sizes=(2, 4), max_occurrences=4)
    spec.learn([[1, 2, 3, 4, 5], [6, 2, 3, 4, 9]])
    spec.save(tmp_path)
    other = SuffixSpeculator()
    other.load(tmp_path)
    assert other.ngram_sizes == (2, 4) and other.max_occurrences == 4
    ctx = [[7, 2, 3]]
    assert other.propose(["r"], ctx, [3])[0].tokens == spec.propose(["r"], ctx, [3])[0].tokens
    with pytest.raises(FileNotFoundError, match="no saved state"):
        SuffixSpeculator().load(tmp_path / "missing")


def test_bad_ngram_sizes():
    with pytest.raises(ValueError, match="ngram_sizes"):
        SuffixSpeculator(ngram_sizes=(0, 2))


def test_controller_cuts_by_cumulative_confidence_and_batch_size():
    # prior_strength huge: calibrated confidence == raw confidence
    ctl = ThresholdController(max_lookahead=8, min_confidence=0.3, max_batch_size=4,
                              calibrator=ConfidenceCalibrator(prior_strength=1e12))
    d = Draft([1, 2, 3, 4], [0.9, 0.8, 0.5, 0.9])
    # cumulative: 0.9, 0.72, 0.36, 0.324 -> all above 0.3
    assert ctl.trim(d).tokens == [1, 2, 3, 4]
    d = Draft([1, 2, 3], [0.9, 0.5, 0.5])  # 0.9, 0.45, 0.225
    assert ctl.trim(d).tokens == [1, 2]
    assert ctl.trim(Draft([1], [0.2])).tokens == []
    assert ctl.step_lookahead(4) == 8 and ctl.step_lookahead(5) == 0


def test_calibration_follows_observed_acceptance():
    ctl = ThresholdController(max_lookahead=8, min_confidence=0.1)
    draft = Draft([1, 2, 3], [0.5, 0.5, 0.5])
    assert ctl.trim(draft).tokens == [1, 2, 3]  # prior: 0.5, 0.25, 0.125
    for _ in range(100):  # the policy rejects these drafts at once
        ctl.observe(draft, 0)
    assert ctl.calibrator.calibrate(0.5) < 0.05
    assert ctl.trim(draft).tokens == []  # speculation switches itself off
    for _ in range(2000):  # acceptance recovers (drift): the estimate follows
        ctl.observe(draft, 3)
    assert ctl.calibrator.calibrate(0.5) > 0.9
    assert ctl.trim(draft).tokens == [1, 2, 3]


def test_calibrator_counts_only_reached_positions():
    cal = ConfidenceCalibrator(prior_strength=0.0)
    cal.observe([0.95, 0.15, 0.55], 1)  # pos 0 accepted, pos 1 rejected, pos 2 never reached
    assert cal.trials[9] == 1 and cal.accepted[9] == 1
    assert cal.trials[1] == 1 and cal.accepted[1] == 0
    assert cal.trials[5] == 0

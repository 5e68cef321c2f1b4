"""Metric definitions (DESIGN.md)."""

from __future__ import annotations

import math

import pytest

from atlas_rl.metrics import (SpecCounters, expected_acceptance_length,
                              oracle_acceptance_length, summarize)


def test_expected_acceptance_length_matches_closed_form():
    for a in (0.1, 0.5, 0.9):
        for k in (1, 4, 8):
            closed = (1 - a ** (k + 1)) / (1 - a)
            assert expected_acceptance_length([a] * k, k) == pytest.approx(closed)


def test_oracle_bounds():
    k = 4
    assert oracle_acceptance_length([[0.0] * 50], k) == pytest.approx(
        sum(min(k, 50 - t) + 1 for t in range(50)) / 50)  # p_max = 1 everywhere
    assert oracle_acceptance_length([[math.log(1e-9)] * 20], k) == pytest.approx(1.0, abs=1e-6)
    assert oracle_acceptance_length([], k) == 1.0


def test_counters_and_summary():
    c = SpecCounters()
    c.record_verified(4, 2)
    c.record_verified(2, 2)
    c.record_verified(0, 0)  # no draft: not a drafting step
    for k in (4, 2, 0):
        c.record_lookahead(k)
    s = summarize(c)
    assert s["num_drafts"] == 2 and s["num_draft_tokens"] == 6 and s["num_accepted_tokens"] == 4
    assert s["acceptance_length"] == pytest.approx(1 + 4 / 2)
    assert s["acceptance_rate"] == pytest.approx(4 / 6)
    assert s["acceptance_rate_pos_0"] == 1.0 and s["acceptance_rate_pos_2"] == 0.0
    assert s["lookahead"] == pytest.approx(3.0)
    assert c.lookahead_hist == [1, 0, 1, 0, 1]
    before = c.copy()
    c.record_verified(1, 1)
    d = c.since(before)
    assert (d.num_drafts, d.num_draft_tokens, d.num_accepted_tokens) == (1, 1, 1)
    assert d.accepted_per_pos[0] == 1 and sum(d.accepted_per_pos) == 1


def test_no_speculation_is_acceptance_length_one():
    assert summarize(None)["acceptance_length"] == 1.0
    assert summarize(SpecCounters())["acceptance_length"] == 1.0


def test_training_plots_write_pngs(tmp_path):
    from atlas_rl.plots import plot_demo, plot_speculation

    rows = [{"step": i, "atlas/acceptance_length": 1.0 + i / 10, "atlas/acceptance_rate": 0.2,
             "atlas/tokens_per_s": 40.0, "atlas/speedup_estimate": 1.1} for i in (1, 2, 3)]
    demo = [{"step": i, "reward": {"none": 0.1, "atlas": 0.2}, "acceptance_length": 1.4,
             "rollout_seconds": {"none": 6.0, "atlas": 7.0}} for i in (1, 2, 3, 4)]
    for path in (plot_speculation(rows, tmp_path / "a" / "spec.png"),
                 plot_demo(demo, 2, tmp_path / "demo.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

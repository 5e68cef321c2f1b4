"""Metric definitions (DESIGN.md)."""

from __future__ import annotations

import importlib
import math

import pytest

from atlas_rl.metrics import (
    ARMS,
    METRIC_PREFIX,
    ROLLOUT_METRICS,
    TRAINER_METRIC_FAMILIES,
    TRAINER_METRICS,
    TRL_LOGP_GAP,
    TRL_REWARD,
    SpecCounters,
    atlas_name,
    expected_acceptance_length,
    fmt,
    median,
    oracle_acceptance_length,
    summarize,
    trainer_metric_names,
    trainer_metrics,
)


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


# --- the registry of names ---------------------------------------------------------

def test_median_skips_none_and_fmt_prints_a_dash_for_none():
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([4, 1, None, 2, 3]) == 2.5
    assert median([None, None]) is None and median([]) is None
    assert median(x for x in (1.0, None)) == 1.0  # any iterable
    assert fmt(None) == "-" and fmt(None, ".1e") == "-"
    assert fmt(1.234) == "1.23" and fmt(8.6e-5, ".1e") == "8.6e-05"


STATS = {"acceptance_length": 2.5, "acceptance_rate": 0.375, "lookahead": 4.0,
         "tokens_per_s": 123.4, "rollout_seconds": 3.2, "num_tokens": 35, "num_drafts": 10,
         "num_draft_tokens": 40, "num_accepted_tokens": 15, "request_steps": 20,
         "lookahead_hist": [8, 0, 0, 4, 8], "acceptance_rate_pos_0": 0.7,
         "acceptance_rate_pos_1": 0.4, "acceptance_rate_pos_3": 0.1, "drafts_suffix": 0.6,
         "drafts_neural": 0.4, "drafts_suffix-dist": 0.0, "drafts_neural-dist": 0.0,
         "acceptance_length_suffix": 2.0, "acceptance_length_neural": 3.25,
         "oracle_acceptance_length": 3.0, "engine_steps": 200}
UPDATE = {"update_seconds": 0.05, "drafter_loss": 1.5, "drafter_train_seconds": 0.3,
          "update_budget_seconds": 0.32, "drafter_version": 3, "index_tokens": 999}
# What the TRL integration logs for them (one value per name and generation): the stats
# it names, per position and per arm as they are; the update's figures; the rollbacks;
# 1 + accepted / request-steps; the share of request-steps with a draft (lookahead > 0).
LOGGED = {"atlas/acceptance_length": 2.5, "atlas/acceptance_rate": 0.375,
          "atlas/lookahead": 4.0, "atlas/tokens_per_s": 123.4, "atlas/rollout_seconds": 3.2,
          "atlas/acceptance_rate_pos_0": 0.7, "atlas/acceptance_rate_pos_1": 0.4,
          "atlas/acceptance_rate_pos_3": 0.1, "atlas/update_seconds": 0.05,
          "atlas/drafter_loss": 1.5, "atlas/drafter_train_seconds": 0.3,
          "atlas/update_budget_seconds": 0.32, "atlas/drafter_rollbacks": 2.0,
          "atlas/drafts_suffix": 0.6, "atlas/drafts_neural": 0.4,
          "atlas/drafts_suffix-dist": 0.0, "atlas/drafts_neural-dist": 0.0,
          "atlas/acceptance_length_suffix": 2.0, "atlas/acceptance_length_neural": 3.25,
          "atlas/speedup_estimate": 1.75, "atlas/drafted_fraction": 0.6}
NO_UPDATE = {k: v for k, v in LOGGED.items() if not k.startswith(("atlas/drafter_",
                                                                  "atlas/update_budget"))}


@pytest.mark.parametrize("stats, update, rollbacks, expected", [
    (STATS, UPDATE, 2, LOGGED),
    (STATS, {}, 0.0, {**NO_UPDATE, "atlas/update_seconds": 0.0,
                      "atlas/drafter_rollbacks": 0.0}),
    ({**STATS, "lookahead_hist": []}, UPDATE, 2.0, {**LOGGED, "atlas/drafted_fraction": 0.0}),
    # no speculation: no request-steps, positions or arms
    ({**summarize(None), "tokens_per_s": 50.0, "rollout_seconds": 1.0}, {}, 0.0,
     {"atlas/acceptance_length": 1.0, "atlas/acceptance_rate": 0.0, "atlas/lookahead": 0.0,
      "atlas/tokens_per_s": 50.0, "atlas/rollout_seconds": 1.0, "atlas/update_seconds": 0.0,
      "atlas/drafter_rollbacks": 0.0}),
])
def test_trainer_metrics_is_what_the_trl_integration_logs(stats, update, rollbacks, expected):
    got = trainer_metrics(stats, update, rollbacks)
    assert got == pytest.approx(expected) and set(got) == set(expected)
    assert all(type(v) is float for v in got.values())
    assert set(got) <= set(trainer_metric_names())


def test_the_registry_names_what_the_trl_integration_logs():
    trl = importlib.import_module("atlas_rl.integrations.trl")
    assert set(getattr(trl, "METRIC_KEYS", ROLLOUT_METRICS)) <= set(ROLLOUT_METRICS)
    assert set(ROLLOUT_METRICS) <= set(TRAINER_METRICS)
    names = trainer_metric_names()
    assert len(names) == len(set(names)) and all(n.startswith(METRIC_PREFIX) for n in names)
    assert {atlas_name(k) for k in (
        "acceptance_length", "acceptance_rate", "lookahead", "tokens_per_s", "rollout_seconds",
        "update_seconds", "drafter_loss", "drafter_train_seconds", "update_budget_seconds",
        "drafter_rollbacks", "speedup_estimate", "drafted_fraction", "acceptance_rate_pos_7",
        *(f"drafts_{arm}" for arm in ARMS), *(f"acceptance_length_{arm}" for arm in ARMS),
    )} <= set(names)
    assert "atlas/acceptance_rate_pos_8" not in names  # positions: 0..max_lookahead-1
    assert "atlas/acceptance_rate_pos_11" in trainer_metric_names(max_lookahead=12)
    assert all(TRAINER_METRICS.values()) and all(TRAINER_METRIC_FAMILIES.values())


def test_dashboards_name_only_registered_metrics():
    from atlas_rl.integrations.wandb import PLOT_KEY, ROW_KEY, TABLE_KEY
    from atlas_rl.integrations.wandb.dashboard import spec

    known = set(trainer_metric_names()) | {TABLE_KEY, PLOT_KEY, TRL_REWARD, TRL_LOGP_GAP}
    keys = {k for panels in spec().values() for p in panels for k in p["keys"]}
    assert keys <= known, keys - known
    assert ROW_KEY in trainer_metric_names()
    assert {TABLE_KEY, PLOT_KEY} == {"atlas/speculation_table", "atlas/speculation_plot"}


def test_the_trainers_speedup_estimate_is_the_benchs_tokens_per_request_step():
    """One definition for both: tokens over target passes (each pass yields one token of
    its own plus the drafts it accepted), not over the proposer's hand-overs, which need
    not match the passes one for one (1,400 tokens, 400 accepted: 1.40, where
    1 + 400 / 1,040 hand-overs would say 1.38)."""
    from atlas_rl.bench import tokens_per_request_step as bench_estimate

    stats = {**STATS, "num_tokens": 1400, "num_accepted_tokens": 400, "request_steps": 1040}
    logged = trainer_metrics(stats, {}, 0.0)["atlas/speedup_estimate"]
    assert logged == pytest.approx(1.40)
    assert logged == pytest.approx(bench_estimate([{"num_tokens": 1400,
                                                    "num_accepted_tokens": 400}]))
    # without a token count: the hand-overs
    no_tokens = {k: v for k, v in stats.items() if k != "num_tokens"}
    assert trainer_metrics(no_tokens, {}, 0.0)["atlas/speedup_estimate"] == \
        pytest.approx(1 + 400 / 1040)


def test_the_steps_where_the_controller_closed_drafting_are_counted_by_reason():
    """`closed_by_{reason}`: shares of the proposer's engine steps; a probe is a closed
    step that drafted anyway; the counters difference like every other counter."""
    from atlas_rl.metrics import CLOSED_REASONS, summarize_plans

    c = SpecCounters()
    for _ in range(3):
        c.record_batch(64, False, "base")
    before = c.copy()
    for i in range(20):
        c.record_batch(64, i == 0, "cost", probe=i == 0)
    for _ in range(4):
        c.record_batch(4, True)
    c.record_batch(4, False, "value")
    got = summarize_plans(c)
    assert set(got) == {f"closed_by_{r}" for r in CLOSED_REASONS} | {"closed_probe_steps"}
    assert got["closed_by_base"] == pytest.approx(3 / 28)
    assert got["closed_by_cost"] == pytest.approx(20 / 28)
    assert got["closed_by_value"] == pytest.approx(1 / 28)
    assert got["closed_by_cut"] == got["closed_by_cap"] == 0.0
    assert got["closed_probe_steps"] == pytest.approx(1 / 28)
    since = summarize_plans(c.since(before))
    assert since["closed_by_base"] == 0.0 and since["closed_by_cost"] == pytest.approx(20 / 25)
    assert summarize_plans(SpecCounters()) == {}
    names = trainer_metric_names()
    assert {atlas_name(f"closed_by_{r}") for r in CLOSED_REASONS} <= set(names)
    assert atlas_name("closed_probe_steps") in names
    logged = trainer_metrics({**STATS, **got}, {}, 0.0)
    assert logged[atlas_name("closed_by_cost")] == pytest.approx(20 / 28)

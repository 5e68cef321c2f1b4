"""Speculators and the controller, without vLLM."""

from __future__ import annotations

import random

import pytest
import torch

from atlas_rl.controller import ArmCalibration, AtlasController, ConfidenceCalibrator, StepPlan
from atlas_rl.speculators import Draft, NeuralSpeculator, SuffixSpeculator
from atlas_rl.speculators.base import Arm


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


def _fed_controller(base, overhead, slope, num_seqs, arms=("suffix",), steps=60):
    """A controller whose cost model measured T(D) = base + [D > 0] overhead + slope D."""
    ctl = AtlasController(max_lookahead=8, speculators=list(arms), explore=0.0)
    for i in range(steps):
        ctl.record_step_time(num_seqs, 0, base)
        d = 1 + i % 24
        ctl.record_step_time(num_seqs, d, base + overhead + slope * d)
    return ctl


def _train_arm(ctl, arm, rate, n=400, conf=0.8):
    rng = random.Random(0)
    for _ in range(n):
        draft = Draft([1, 2, 3, 4], [conf] * 4, source=arm.removesuffix("-dist"))
        if arm.endswith("-dist"):
            draft.q_ids, draft.q = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
        accepted = 0
        while accepted < 4 and rng.random() < rate:
            accepted += 1
        ctl.record_acceptance(draft, accepted)


def test_cost_model_recovers_the_step_cost():
    ctl = _fed_controller(base=0.075, overhead=0.008, slope=0.0003, num_seqs=4)
    overhead, slope = ctl.cost.spec_cost(4)
    assert ctl.cost.base_seconds(4) == pytest.approx(0.075)
    # within 20%: a light prior (one pseudo-step) still pulls a little
    assert overhead == pytest.approx(0.008, abs=1.6e-3) and slope == pytest.approx(0.0003, abs=1e-4)


def test_the_cost_model_compares_a_drafting_step_with_the_base_at_its_own_batch_size():
    """B moves inside a bucket (requests come and go), and the steps that draft are not at
    the B of those that do not: here plain steps at 14-16 sequences, drafting steps at
    10-13. Measured on a loaded server, a base taken at ~16 made drafting steps at ~13
    look as cheap as plain ones (overhead and slope fitted towards 0). The base moves
    along what one more sequence costs, and the drafting steps' overhead and slope come
    out as they are."""
    def truth(b, d):
        return 0.040 + 0.0025 * b + (0.002 + 0.0025 * d if d else 0.0)

    ctl = AtlasController(max_lookahead=8, speculators=["suffix"], explore=0.0)
    rng = random.Random(0)
    for i in range(120):
        b = (16, 15, 14)[i % 3]
        ctl.record_step_time(b, 0, truth(b, 0) * (1 + 0.01 * rng.uniform(-1, 1)))
        b, d = 10 + i % 4, 1 + i % 6
        ctl.record_step_time(b, d, truth(b, d) * (1 + 0.01 * rng.uniform(-1, 1)))
    cost = ctl.cost
    assert cost.row_cost(12) == pytest.approx(0.0025, rel=0.2)
    assert cost.base_seconds(12) == pytest.approx(truth(12, 0), rel=0.02)
    assert cost.base_seconds(16) == pytest.approx(truth(16, 0), rel=0.02)
    overhead, slope = cost.spec_cost(12)
    assert overhead == pytest.approx(0.002, abs=0.0012)
    assert slope == pytest.approx(0.0025, rel=0.25)
    for d in (1, 3, 6):
        assert cost.predict(11, d) == pytest.approx(truth(11, d), rel=0.02)
    # saved and loaded: the same model
    again = AtlasController(max_lookahead=8, speculators=["suffix"], explore=0.0)
    again.load_state_dict(ctl.state_dict())
    assert again.cost.predict(11, 3) == pytest.approx(cost.predict(11, 3), rel=1e-9)
    # a state saved before the base knew B: its plain steps load (at the bucket's top B),
    # its fits of whole step times do not (they are not what drafting added)
    old = AtlasController(max_lookahead=8, speculators=["suffix"], explore=0.0)
    old.load_state_dict({"cost": {"base_steps": {"4": [0.08] * 10},
                                  "spec": {"4": [10.0, 30.0, 0.9, 100.0, 2.7]}}})
    assert old.cost.base_seconds(16) == pytest.approx(0.08)
    assert old.cost.spec_cost(16)[0] == pytest.approx(0.05 * 0.08)


def test_a_batch_size_whose_drafting_steps_lose_on_average_stops_drafting():
    """The drafting pass runs for every request before the cut sees a confidence. At 16
    sequences here a draft token costs ~0.4 of a sequence's token and the pass 3.7 ms: a
    step with four confident drafts gains ~5 ms, and one with none loses the pass. When
    one step in four has them, every other step pays the pass for nothing: the cut never
    drops everything for `cut_patience` steps in a row, but the drafting steps lose on
    average, and the controller stops planning them. Where every step has them, it
    keeps drafting."""
    def controller():
        ctl = AtlasController(max_lookahead=4, speculators=["suffix"], explore=0.0)
        for i in range(60):
            ctl.record_step_time(16, 0, 0.08)
            d = 1 + i % 8
            ctl.record_step_time(16, d, 0.08 + 0.002 + 0.0019 * d)
        for _ in range(5):
            ctl.record_draft_time("suffix", 0.0037)
        _train_arm(ctl, "suffix", 0.9, conf=0.95)
        _train_arm(ctl, "suffix", 0.1, conf=0.1)
        return ctl

    def drafts(confident):
        return [[Draft([1], [0.95 if r < confident else 0.1], source="suffix")]
                for r in range(16)]

    ctl = controller()
    planned = 0
    for i in range(60):
        plan = ctl.plan_step(16)
        if plan.lookahead:
            planned += 1
            kept = ctl.choose_drafts(plan, drafts(4 if planned % 4 == 1 else 0))
            assert sum(len(d) for d in kept) in (0, 4)
    assert ctl.drafting_loses(16) and ctl.drafting_value(16) < 0
    assert planned < 25
    assert all(ctl.plan_step(16).lookahead == 0 for _ in range(50))
    # The drafter published new weights: their drafts are measured afresh, and where
    # they lose too, drafting stops again
    ctl.speculator_changed("suffix")
    assert not ctl.drafting_loses(16) and ctl.drafting_value(16) is None
    again = 0
    for _ in range(60):
        plan = ctl.plan_step(16)
        if plan.lookahead:
            again += 1
            ctl.choose_drafts(plan, drafts(0))
    assert 0 < again <= ctl.cut_patience + 1 and ctl.plan_step(16).lookahead == 0
    ctl.speculator_changed("another")  # not one of its speculators: nothing forgotten
    assert ctl.plan_step(16).lookahead == 0

    ctl = controller()
    for _ in range(60):
        plan = ctl.plan_step(16)
        assert plan.lookahead > 0 or ctl._since_base.get(4) == 0  # but the base's re-measuring
        if plan.lookahead:
            assert sum(len(d) for d in ctl.choose_drafts(plan, drafts(4))) == 4
    assert not ctl.drafting_loses(16) and ctl.drafting_value(16) > 0


def test_drafts_the_cost_model_expects_less_than_the_margin_from_are_not_verified():
    """The cut keeps a step's drafts only where the cost model expects them to raise
    tokens per second by `min_gain` (3%) at least: one draft accepted 60% of the time at
    16 sequences (+1.3% by the model) is not verified, two accepted 90% of the time
    (+6%) are."""
    ctl = AtlasController(max_lookahead=4, speculators=["suffix"], explore=0.0)
    for i in range(60):
        ctl.record_step_time(16, 0, 0.08)
        d = 1 + i % 8
        ctl.record_step_time(16, d, 0.08 + 0.0019 * d)
    _train_arm(ctl, "suffix", 0.9, conf=0.95)
    _train_arm(ctl, "suffix", 0.6, conf=0.6)
    plan = StepPlan(16)
    one = [[Draft([1], [0.6], source="suffix")]] + [[] for _ in range(15)]
    assert not any(d.tokens for d in ctl.choose_drafts(plan, one))
    two = [[Draft([1], [0.95], source="suffix")] for _ in range(2)] + [[] for _ in range(14)]
    assert sum(len(d) for d in ctl.choose_drafts(plan, two)) == 2
    ctl.min_gain = 0.0  # without the margin, the first is verified too
    assert sum(len(d) for d in ctl.choose_drafts(plan, one)) == 1


def test_probes_of_one_draft_token_do_not_make_verification_look_free():
    """A compute-bound 64-sequence batch: a draft token costs about what a sequence's
    token costs (base / 64). The probes measure steps with one draft token only, and each
    costs a fixed 16 ms more (vLLM's verification path). They say nothing of what each
    further token adds: the slope stays at its prior, and a suffix arm accepted 60% of
    the time is not let loose on all 64 requests (a step of 3-4x the plain one). Before,
    20 such probes pulled the slope to 43% of the truth, and such drafts passed the cut."""
    base = 0.11
    ctl = AtlasController(max_lookahead=8, speculators=["suffix"], explore=0.0)
    for _ in range(40):
        ctl.record_step_time(64, 0, base)
    for _ in range(20):
        ctl.record_step_time(64, 1, base + 0.016)
    overhead, slope = ctl.cost.spec_cost(64)
    assert slope == pytest.approx(ctl.cost.prior_slope_factor * base / 64, rel=0.1)
    assert overhead == pytest.approx(0.016, abs=0.004)  # the probes' fixed cost, measured
    _train_arm(ctl, "suffix", 0.6)
    drafts = [[Draft([1, 2, 3], [0.9] * 3, source="suffix")] for _ in range(64)]
    for _ in range(ctl.cut_patience):
        plan = ctl.plan_step(64)
        assert not any(d.tokens for d in ctl.choose_drafts(plan, drafts))
    assert all(ctl.plan_step(64).lookahead == 0 for _ in range(20))  # then not even drafted
    assert not ctl.drafting_could_pay(64)  # a good drafter would not pay here either
    ctl.explore = 1.0
    plan = ctl.plan_step(64)
    assert plan.probe and sum(len(d) for d in ctl.choose_drafts(plan, drafts)) == 1


def test_no_drafting_pass_where_even_the_best_acceptance_shown_cannot_pay():
    """64 sequences on a 2-core CPU: verification costs a fixed 9 ms and ~1.4 ms a draft
    token on a 110 ms step. At the best acceptance the arms have shown (0.7), no
    lookahead beats no speculation, so the speculators are not run at all from the first
    step (before: a drafting pass over every request for `cut_patience` steps, each
    dropped by the cut, and again after every publish of the adaptive drafter). At 4
    sequences the same arms draft."""
    ctl = AtlasController(max_lookahead=8, speculators=["suffix"], explore=0.0)
    for _ in range(40):
        ctl.record_step_time(64, 0, 0.11)
        ctl.record_step_time(4, 0, 0.03)
    for d in range(1, 25):
        ctl.record_step_time(64, d, 0.11 + 0.009 + 0.0014 * d)
        ctl.record_step_time(4, d, 0.03 + 0.002 + 0.0003 * d)
    _train_arm(ctl, "suffix", 0.7)
    _train_arm(ctl, "suffix-dist", 0.5)
    best = ctl.best_acceptance()
    assert 0.65 <= best[0] < 0.85 and best[1] < best[0]
    assert ctl.cost_hopeless(64) and not ctl.cost_hopeless(4)
    plans = [ctl.plan_step(64) for _ in range(20)]
    assert all(p.lookahead == 0 and p.closed == "cost" for p in plans)
    ctl.speculator_changed("suffix")  # new weights: the bound still holds
    assert ctl.plan_step(64).lookahead == 0
    open_plan = ctl.plan_step(4)
    assert open_plan.lookahead > 0 and open_plan.closed is None
    # an arm that has shown more re-opens it: a surely accepted arm pays even here
    _train_arm(ctl, "suffix", 1.0, n=2000, conf=0.95)
    assert not ctl.cost_hopeless(64)


def test_controller_picks_no_speculation_when_the_cost_model_says_it_loses():
    # Large batch, compute-bound: a draft token costs what a sequence's token costs.
    ctl = _fed_controller(base=0.15, overhead=0.01, slope=0.15 / 64 * 1.2, num_seqs=64)
    _train_arm(ctl, "suffix", 0.9)
    plan = ctl.plan_step(64)
    drafts = [Draft([1, 2, 3], [0.9] * 3, source="suffix") for _ in range(64)]
    assert plan.lookahead == 0 or all(not d.tokens for d in ctl.choose_drafts(StepPlan(64), [[d] for d in drafts]))
    # The tail, memory-bound: the same drafts pay, and are kept.
    ctl = _fed_controller(base=0.075, overhead=0.008, slope=0.0003, num_seqs=4)
    _train_arm(ctl, "suffix", 0.9)
    assert ctl.plan_step(4).lookahead >= 4  # every position the arm was measured at
    kept = ctl.choose_drafts(StepPlan(4), [[Draft([1, 2, 3], [0.9] * 3, source="suffix")] for _ in range(4)])
    assert all(len(d) == 3 for d in kept)
    # ...unless they are rarely accepted: then the verification overhead is not worth it.
    ctl = _fed_controller(base=0.075, overhead=0.008, slope=0.0003, num_seqs=4)
    _train_arm(ctl, "suffix", 0.02)
    kept = ctl.choose_drafts(StepPlan(4), [[Draft([1, 2, 3], [0.9] * 3, source="suffix")] for _ in range(4)])
    assert all(not d.tokens for d in kept)


def test_an_unmeasured_batch_size_is_measured_before_speculating():
    """The tail's cost says nothing about a 64-sequence step (memory- vs compute-bound):
    the first steps at a new batch-size bucket run without speculation, to measure it."""
    ctl = _fed_controller(base=0.075, overhead=0.008, slope=0.0003, num_seqs=4)
    _train_arm(ctl, "suffix", 0.9)
    assert ctl.plan_step(4).lookahead > 0
    assert ctl.cost.base_seconds(64) is None
    assert ctl.plan_step(64).lookahead == 0
    ctl.record_step_time(64, 0, 0.3)
    assert ctl.cost.base_seconds(64) == pytest.approx(0.3)
    assert ctl.cost.base_seconds(4) == pytest.approx(0.075)  # buckets stay apart


def test_a_one_off_stall_does_not_switch_speculation_off():
    """A 4.5 s step among 75 ms ones (e.g. a JIT compile on the first verification) moves
    the cost model by a bounded amount: the tail keeps speculating."""
    ctl = _fed_controller(base=0.075, overhead=0.008, slope=0.0003, num_seqs=4)
    _train_arm(ctl, "suffix", 0.9)
    for _ in range(5):
        ctl.record_draft_time("suffix", 0.002)
    ctl.record_step_time(4, 12, 4.5)
    ctl.record_draft_time("suffix", 4.5)  # and a stalled drafting call
    overhead, _ = ctl.cost.spec_cost(4)
    assert overhead < 0.075  # uncapped, the stall alone would add ~0.09 s
    kept = ctl.choose_drafts(StepPlan(4), [[Draft([1, 2, 3], [0.9] * 3, source="suffix")] for _ in range(4)])
    assert all(len(d) == 3 for d in kept)


def test_probes_correct_a_stale_too_high_cost_estimate():
    """The cost model believes speculation loses (overhead 0.2 s). With speculation off,
    only the controller's probes (one token, for one request, on `explore` of the steps)
    measure it again; once they show the true overhead, speculation comes back."""
    ctl = _fed_controller(base=0.075, overhead=0.2, slope=0.0003, num_seqs=4)
    ctl.explore = 0.2
    _train_arm(ctl, "suffix", 0.9)
    drafts = [[Draft([1, 2, 3], [0.9] * 3, source="suffix")] for _ in range(4)]
    probes = 0
    for _ in range(600):
        before = ctl.probes
        kept = ctl.choose_drafts(StepPlan(4), drafts)
        d = sum(len(k) for k in kept)
        if ctl.probes > before:  # a probe: one token (at this overhead no drafter would pay)
            assert d == 1
            probes += 1
        elif d:
            break
        ctl.record_step_time(4, d, 0.075 + (0.008 + 0.0003 * d if d else 0.0))
    else:
        pytest.fail("speculation never came back")
    assert probes >= 3  # it came back through probes, not by itself


def test_no_drafting_where_the_cut_keeps_dropping_every_draft():
    """Where speculation loses (the cut drops everything for `cut_patience` steps), the
    speculators are not even run, except on explore-rate steps, which then probe."""
    ctl = _fed_controller(base=0.075, overhead=0.2, slope=0.0003, num_seqs=4)
    _train_arm(ctl, "suffix", 0.9)
    drafts = [[Draft([1, 2, 3], [0.9] * 3, source="suffix")] for _ in range(4)]
    for _ in range(ctl.cut_patience):
        plan = ctl.plan_step(4)
        assert plan.lookahead > 0 and not plan.probe
        assert not any(d.tokens for d in ctl.choose_drafts(plan, drafts))
    assert all(ctl.plan_step(4).lookahead == 0 for _ in range(50))  # explore = 0
    ctl.explore = 1.0
    plan = ctl.plan_step(4)
    assert plan.lookahead > 0 and plan.probe
    assert sum(len(d) for d in ctl.choose_drafts(plan, drafts)) == 1  # the probe


def test_goodput_cut_keeps_the_likeliest_positions_first():
    ctl = _fed_controller(base=0.075, overhead=0.002, slope=0.004, num_seqs=2)
    _train_arm(ctl, "suffix", 0.7)
    sure = Draft([1, 2, 3, 4, 5, 6], [0.95] * 6, source="suffix")
    weak = Draft([7, 8, 9], [0.05] * 3, source="suffix")
    a, b = ctl.choose_drafts(StepPlan(2), [[sure], [weak]])
    assert len(a) >= 1 and len(b) <= len(a)  # never a longer draft where acceptance is less likely


def test_controller_follows_the_better_arm_and_the_draft_kind():
    ctl = _fed_controller(base=0.075, overhead=0.004, slope=0.0003, num_seqs=1,
                          arms=("suffix", "neural"))
    _train_arm(ctl, "suffix", 0.8)
    _train_arm(ctl, "neural", 0.2)
    _train_arm(ctl, "neural-dist", 0.2)
    pair = [Draft([1, 2, 3], [0.6] * 3, source="suffix"), Draft([4, 5, 6], [0.6] * 3, source="neural")]
    assert ctl.choose_drafts(StepPlan(1), [pair])[0].source == "suffix"
    # The adaptive drafter improved (drift): feedback moves the choice over.
    _train_arm(ctl, "suffix", 0.2, n=1500)
    _train_arm(ctl, "neural", 0.85, n=1500)
    assert ctl.choose_drafts(StepPlan(1), [pair])[0].source == "neural"
    # Distribution drafts accepted more than one-hot ones: the plan asks for them.
    _train_arm(ctl, "neural-dist", 0.95, n=1500)
    plan = ctl.plan_step(1)
    assert plan.sample["neural"] == [True]


def test_an_arm_whose_acceptance_collapses_is_benched_then_probed_again():
    ctl = AtlasController(max_lookahead=4, speculators=["suffix", "neural"], explore=0.0,
                          cooldown_steps=5, always=True)  # no cost model: benching alone
    _train_arm(ctl, "neural", 0.0, n=50)
    _train_arm(ctl, "neural-dist", 0.0, n=50)
    assert Arm("neural") in ctl.benched and ctl.collapses >= 1
    assert ctl.plan_step(1).speculators == ["suffix"]
    for _ in range(5):
        ctl.plan_step(1)
    assert "neural" in ctl.plan_step(1).speculators


def test_calibration_converges_on_synthetic_feedback():
    """Raw confidence c is accepted with probability 0.3 + 0.5 c (miscalibrated): the
    calibrator learns that mapping per bucket."""
    rng = random.Random(1)
    cal = ConfidenceCalibrator()
    for _ in range(20000):
        c = rng.random()
        cal.add_trial(c, rng.random() < 0.3 + 0.5 * c)
    for c in (0.05, 0.35, 0.65, 0.95):
        assert cal.calibrate(c) == pytest.approx(0.3 + 0.5 * c, abs=0.06)


def test_calibrator_counts_only_reached_positions():
    arm = ArmCalibration(max_lookahead=1)  # every position counts in one calibrator
    cal = arm.positions[0]
    cal.prior_strength = 0.0
    arm.add_draft([0.95, 0.15, 0.55], 1)  # pos 0 accepted, pos 1 rejected, pos 2 never reached
    assert cal.trials[9] == 1 and cal.accepted[9] == 1
    assert cal.trials[1] == 1 and cal.accepted[1] == 0
    assert cal.trials[5] == 0


def test_suffix_distribution_draft_samples_from_the_continuations_it_hands_over():
    spec = SuffixSpeculator(ngram_sizes=(2,))
    spec.learn([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 2, 3, 4]])
    seen = {}
    for i in range(200):
        spec.begin_batch()
        (d,) = spec.propose([f"r{i}"], [[9, 1, 2]], [2], sample=[True])
        assert d.is_distribution and d.source == "suffix"
        q0 = dict(zip(d.q_ids[0].tolist(), d.q[0].tolist()))
        assert q0 == pytest.approx({3: 0.75, 6: 0.25})  # empirical continuations of (1, 2)
        assert d.tokens[0] in q0
        if d.tokens[0] == 3:  # position 1 conditions on the draft so far: 4 (2/3) or 5 (1/3)
            assert dict(zip(d.q_ids[1].tolist(), d.q[1].tolist())) == pytest.approx({4: 2 / 3, 5: 1 / 3})
        seen[d.tokens[0]] = seen.get(d.tokens[0], 0) + 1
    assert 100 < seen[3] < 190 and seen[6] > 10  # sampled, not the majority every time
    (onehot,) = spec.propose(["x"], [[9, 1, 2]], [2])
    assert not onehot.is_distribution and onehot.tokens == [3, 4]


def test_suffix_drafts_both_kinds_from_one_lookup():
    """`propose_both`: per request the majority draft (one-hot, as `propose` makes it)
    and a distribution draft over the same continuations; nothing where nothing matches."""
    spec = SuffixSpeculator(ngram_sizes=(2,))
    assert spec.drafts_both_kinds
    spec.learn([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 2, 3, 4]])
    spec.begin_batch()
    (onehot, dist), (none1, none2) = spec.propose_both(["a", "b"], [[9, 1, 2], [8, 8]], [2, 2])
    assert not onehot.is_distribution and onehot.tokens == [3, 4]
    assert onehot.confidence == spec.propose(["c"], [[9, 1, 2]], [2])[0].confidence
    assert dist.is_distribution and dist.source == onehot.source == "suffix"
    assert dict(zip(dist.q_ids[0].tolist(), dist.q[0].tolist())) == pytest.approx({3: 0.75, 6: 0.25})
    assert not none1.tokens and not none2.tokens


def test_the_kind_of_draft_is_chosen_per_request_where_both_are_drafted():
    """A speculator that drafts both kinds in one call (`both_kinds`): the plan asks for
    both, and each request keeps the draft its arm's calibration values more. Without
    it, one kind per step is drafted: the arm that looks better over all requests."""
    def controller(onehot_rate, dist_rate, both=("suffix",)):
        ctl = AtlasController(max_lookahead=4, speculators=["suffix"], explore=0.0,
                              both_kinds=both)
        _train_arm(ctl, "suffix", onehot_rate, conf=0.45)
        _train_arm(ctl, "suffix-dist", dist_rate, conf=0.45)
        ctl.always = True  # no cost model fed here: the choice of kind alone
        return ctl

    def pair():
        return [Draft([3, 4], [0.45, 0.45], source="suffix"),
                Draft([6, 7], [0.45, 0.45], torch.tensor([[3, 6], [7, 0]]),
                      torch.tensor([[0.5, 0.5], [1.0, 0.0]]), source="suffix")]

    ctl = controller(0.3, 0.8)
    plan = ctl.plan_step(4)
    assert plan.both == {"suffix"}
    assert all(d.is_distribution for d in ctl.choose_drafts(plan, [pair() for _ in range(4)]))
    ctl = controller(0.8, 0.3)
    chosen = ctl.choose_drafts(ctl.plan_step(4), [pair() for _ in range(4)])
    assert all(d.tokens == [3, 4] and not d.is_distribution for d in chosen)

    single = controller(0.3, 0.8, both=())
    plan = single.plan_step(4)
    assert plan.both == set() and plan.sample["suffix"] == [True] * 4  # one kind, the better
    ctl = controller(0.3, 0.8)  # a benched kind is not drafted
    ctl.benched[Arm("suffix", "distribution")] = 10
    plan = ctl.plan_step(4)
    assert plan.both == set() and plan.sample["suffix"] == [False] * 4

    # A speculator whose two kinds cost twice the rows drafts both up to the batch it
    # names (`both_kinds_max_batch`), one kind per step above it
    limited = controller(0.3, 0.8, both={"suffix": 8})
    assert limited.plan_step(8).both == {"suffix"}
    plan = limited.plan_step(9)
    assert plan.both == set() and plan.sample["suffix"] == [True] * 9
    assert controller(0.3, 0.8, both={"suffix": None}).plan_step(64).both == {"suffix"}
    assert NeuralSpeculator.drafts_both_kinds and NeuralSpeculator.both_kinds_max_batch == 16
    assert SuffixSpeculator.both_kinds_max_batch is None  # one lookup makes both


def test_frozen_suffix_index_does_not_learn():
    spec = SuffixSpeculator(ngram_sizes=(2,), frozen=True)
    assert spec.learn([[1, 2, 3, 4]]) == {}
    assert spec.propose(["r"], [[1, 2]], [2])[0].tokens == []


def test_a_server_without_batches_keeps_bounded_live_state():
    """`vllm serve` never starts a batch: finished requests' contexts are dropped past
    `max_finished_live` (the oldest one as each finishes), so live state stays bounded, and a
    live request still drafts from its siblings and the rest."""
    spec = SuffixSpeculator(ngram_sizes=(2, 3), max_finished_live=8)
    prompt = [7, 8, 9]
    body = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    spec.begin_request("live", prompt)
    for i in range(100):
        key = f"r{i}"
        spec.begin_request(key, prompt if i % 2 else [100 + i, 9])
        spec.propose([key], [prompt + body], [2])
        spec.finish(key)
        assert len(spec._finished) <= 8
        assert len(spec._live.seqs) <= 8 + 1 and len(spec._siblings) <= 8 + 1
    draft = spec.propose(["live"], [prompt + [1, 2]], [3])[0]
    assert draft.tokens == [3, 4, 5]
    spec.begin_batch()  # a batch end still drops everything
    assert not spec._finished and not spec._live.seqs and not spec._siblings


def test_slow_first_steps_do_not_inflate_the_base_cost():
    """The first steps at a new batch size are slow (kernels created for new shapes): the
    base is the minimum of the few no-draft steps, then their median, never a mean
    dragged up by them. A base inflated by them made verification look free (the fit's
    overhead and slope clamp at 0 below it) and the controller draft far too long."""
    ctl = AtlasController(max_lookahead=8, speculators=["suffix"], explore=0.0)
    for seconds in (0.25, 0.2):  # kernel creation
        ctl.record_step_time(4, 0, seconds)
    assert ctl.plan_step(4).lookahead == 0  # fewer than min_base_steps measured: measure
    ctl.record_step_time(4, 0, 0.08)
    assert ctl.cost.base_seconds(4) == pytest.approx(0.08)
    for _ in range(20):
        ctl.record_step_time(4, 0, 0.08)
    assert ctl.cost.base_seconds(4) == pytest.approx(0.08)


def test_the_base_cost_is_measured_again_while_drafting():
    """A controller that drafts on every step would never see a step without drafts
    again: one step in `base_refresh_steps` goes without, so the base stays current."""
    ctl = _fed_controller(base=0.075, overhead=0.008, slope=0.0003, num_seqs=4)
    _train_arm(ctl, "suffix", 0.9)
    plans = [ctl.plan_step(4).lookahead for _ in range(3 * ctl.base_refresh_steps)]
    off = sum(1 for k in plans if k == 0)
    assert 2 <= off <= 4


def test_a_costly_draft_position_shortens_the_lookahead():
    """One more position costs its verification (B * slope) and one more drafting pass:
    the controller stops where a position's acceptance no longer pays for both."""
    ctl = _fed_controller(base=0.08, overhead=0.004, slope=0.0005, num_seqs=4)
    _train_arm(ctl, "suffix", 0.5)  # cumulative acceptance 0.5, 0.25, 0.125, ...
    free = ctl.plan_step(4).lookaheads["suffix"]
    for _ in range(15):
        ctl.record_draft_time("suffix", 0.012, positions=2)  # 6 ms per position
    assert ctl.draft_position_seconds["suffix"] == pytest.approx(0.006)
    costly = min(ctl.plan_step(4).lookaheads["suffix"] for _ in range(20))
    assert costly < free


def test_lookahead_goodput_is_tokens_over_seconds():
    from atlas_rl.controller import lookahead_goodput

    g = lookahead_goodput([0.5, 0.25], num_seqs=4, base=0.08, overhead=0.004, slope=0.001,
                          draft_position=0.002)
    assert g[0] == pytest.approx(4 / 0.08)
    assert g[1] == pytest.approx(4 * 1.5 / (0.08 + 0.004 + 0.004 + 0.002))
    assert g[2] == pytest.approx(4 * 1.75 / (0.08 + 0.004 + 2 * (0.004 + 0.002)))


def test_the_proposer_tells_the_controller_of_a_drafter_s_new_weights():
    """Each step the proposer compares every speculator's weights version with the last
    step's: a moved one (an update published) reaches `speculator_changed`; the first
    sight of a version, or one that did not move, does not."""
    import types

    from atlas_rl.backends.vllm.proposer import AtlasProposer

    changed = []
    proposer = AtlasProposer.__new__(AtlasProposer)
    proposer.controller = types.SimpleNamespace(speculator_changed=changed.append)
    drafter = types.SimpleNamespace(version=3)
    proposer.speculators = {"neural": drafter, "suffix": SuffixSpeculator(ngram_sizes=(2,))}
    proposer._versions = {}
    proposer._note_new_weights()
    proposer._note_new_weights()
    assert changed == []
    drafter.version = 4
    proposer._note_new_weights()
    proposer._note_new_weights()
    assert changed == ["neural"]

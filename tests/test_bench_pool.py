"""`atlas-rl bench-pool`: several runs of one bench command pooled as one, every (run,
step) a unit of the bootstrap, so that run-to-run noise widens the interval a 10% effect is
judged by; and the code revision every figure now carries, which pooling checks."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from atlas_rl.bench import domain_gap_summary, format_domain_gap, pool_results
from atlas_rl.machine import code_revision, machine_info

ROOT = Path(__file__).resolve().parent.parent
# a real domain-gap run (JavaScript then PHP, 16 steps, every method): AMD EPYC, float32
REAL_RUN = ROOT / "docs/bench/domain-gap-javascript-php-f32-amd-2026-12-05-c6ab9d4.json"


@pytest.fixture(scope="module")
def real_run() -> dict:
    return json.loads(REAL_RUN.read_text())


def _reseeded(run: dict, seed: int) -> dict:
    """The run as `atlas-rl bench --seed` would name another: its engines' seed too."""
    out = copy.deepcopy(run)
    out["config"]["seed"] = seed
    if isinstance(out["config"].get("engine"), dict):
        out["config"]["engine"]["seed"] = seed
    return out


def test_a_run_pooled_with_itself_keeps_its_figures(real_run):
    pooled = pool_results([real_run, _reseeded(real_run, 1)])
    for m, one in real_run["methods"].items():
        two = pooled["methods"][m]
        for regime, s in one["regimes"].items():
            if s.get("speedup") is not None:
                assert two["regimes"][regime]["speedup"] == pytest.approx(s["speedup"])
            assert two["regimes"][regime]["steps"] == 2 * s["steps"]  # every (run, step)
        assert two["summary"]["exact"] == one["summary"]["exact"]
        assert [r["speedup_estimate"] for r in two["steps"]] == pytest.approx(
            [r["speedup_estimate"] for r in one["steps"]])
        assert len(two["run_steps"]) == 2
    gap_one, gap_two = domain_gap_summary(real_run), pooled["domain_gap"]
    for a, b in zip(gap_one, gap_two):
        assert b["second_half"]["atlas"] == pytest.approx(a["second_half"]["atlas"])
        assert b["atlas_over_static_second_half"] == pytest.approx(
            a["atlas_over_static_second_half"])
        assert b["second_half_units"] == 2 * a["second_half_units"] == 8
        assert len(b["runs"]) == 2
    assert pooled["config"]["seed"] == [0, 1]
    assert pooled["methods"]["atlas"]["summary"]["gate_checks"] == \
        2 * real_run["methods"]["atlas"]["summary"]["gate_checks"]


def test_the_second_half_carries_an_interval_in_one_run(real_run):
    gap = domain_gap_summary(real_run)
    js = gap[0]
    lo, hi = js["atlas_over_static_second_half_ci"]
    assert lo <= js["atlas_over_static_second_half"] <= hi
    # the ratio of the pooled counts sits near the ratio of the per-step means
    half = js["second_half"]
    assert js["atlas_over_static_second_half"] == pytest.approx(
        half["atlas"] / half["atlas-static"], rel=0.05)
    assert "(run, step) units" in format_domain_gap(real_run)


def _run(tokens_per_step: dict[str, list[float]], seed: int) -> dict:
    """A domain-gap result of 2 domains x 4 steps whose tail records give each method the
    tokens per request-step asked for (100 request-steps a step; none takes 1 s a step,
    a method t tokens per request-step runs t x 100 tokens in 1 s, so its speedup is t)."""
    methods = {}
    for m, per_step in {"none": [1.0] * 8, **tokens_per_step}.items():
        rows = []
        for step, t in enumerate(per_step):
            tokens = round(100 * t)
            rec = {"step": step, "num_tokens": tokens, "num_accepted_tokens": tokens - 100,
                   "rollout_seconds": 1.0, "tokens_per_s": float(tokens),
                   "acceptance_length": t, "acceptance_rate": 0.5, "lookahead": 1.0,
                   "oracle_acceptance_length": 2.0, "engine_steps": 100}
            rows.append({"step": step, "domain": "javascript" if step < 4 else "code-php",
                         "epoch": step % 2, "acceptance_length": t, "speedup_estimate": t,
                         "speedup": t, "regimes": {"tail": rec}})
        methods[m] = {"summary": {"speedup": None, "gate_checks": 0},
                      "regimes": {}, "steps": rows, "exactness": {"exact": True},
                      "time": {}}
    return {"machine": {"cpu": "test CPU", "cores": 2, "dtype": "float32", "commit": "abc1234"},
            "config": {"workload": "domain-gap", "domains": ["javascript", "code-php"],
                       "phase_starts": [0, 4], "steps": 8, "seed": seed, "drift_step": None},
            "methods": methods, "total_seconds": 1.0}


def test_pooled_runs_weigh_each_unit_and_their_disagreement_widens_the_interval():
    static = [1.0] * 8
    oracle = [1.5] * 8
    high = _run({"atlas-static": static, "atlas": [1.2] * 8, "domain-oracle": oracle}, 0)
    low = _run({"atlas-static": static, "atlas": [1.0] * 8, "domain-oracle": oracle}, 1)
    same = _run({"atlas-static": static, "atlas": [1.1] * 8, "domain-oracle": oracle}, 2)
    apart = pool_results([high, low])
    agree = pool_results([same, _reseeded(same, 3)])
    for pooled in (apart, agree):
        js = pooled["domain_gap"][0]
        # (120 + 100) tokens over 200 request-steps against 1.0: 1.1x, 20% of the way to 1.5
        assert js["atlas_over_static_second_half"] == pytest.approx(1.1)
        assert js["gap_closed_second_half_pooled"] == pytest.approx(0.2)
        assert pooled["methods"]["atlas"]["regimes"]["tail"]["speedup"] == pytest.approx(1.1)
    a_lo, a_hi = apart["domain_gap"][0]["atlas_over_static_second_half_ci"]
    s_lo, s_hi = agree["domain_gap"][0]["atlas_over_static_second_half_ci"]
    assert a_lo < 1.1 < a_hi and a_hi - a_lo > 0.05  # the runs disagree: a wide interval
    assert s_hi - s_lo < 1e-9  # they agree: none
    lo, hi = apart["methods"]["atlas"]["regimes"]["tail"]["speedup_ci"]
    assert lo < 1.1 < hi
    assert [(r["name"], r["seed"], r["commit"]) for r in apart["pooled"]["runs"]] == \
        [("run 1", 0, "abc1234"), ("run 2", 1, "abc1234")]
    per_run = apart["domain_gap"][0]["runs"]
    assert [r["second_half"]["atlas"] for r in per_run] == pytest.approx([1.2, 1.0])


def test_runs_of_different_commands_machines_or_code_are_refused():
    base = _run({"atlas-static": [1.0] * 8, "atlas": [1.1] * 8}, 0)
    with pytest.raises(ValueError, match="two or more runs"):
        pool_results([base])
    other = _reseeded(base, 1)
    other["config"]["steps"] = 16
    with pytest.raises(ValueError, match="config 'steps' is 8 against 16"):
        pool_results([base, other], names=["a.json", "b.json"])
    other = _reseeded(base, 1)
    other["config"]["engine"] = {"seed": 1, "max_lookahead": 4}
    base_engine = copy.deepcopy(base)
    base_engine["config"]["engine"] = {"seed": 0, "max_lookahead": 8}
    with pytest.raises(ValueError, match="config 'engine'"):  # a setting, not the seed
        pool_results([base_engine, other])
    other["config"]["engine"]["max_lookahead"] = 8
    assert pool_results([base_engine, other])["config"]["seed"] == [0, 1]
    other = _reseeded(base, 1)
    other["machine"]["cpu"] = "another CPU"
    with pytest.raises(ValueError, match="different machines"):
        pool_results([base, other])
    other = _reseeded(base, 1)
    other["machine"]["commit"] = "def5678"
    with pytest.raises(ValueError, match="commit abc1234 against def5678"):
        pool_results([base, other])
    with pytest.raises(ValueError, match="b.json are the same run"):
        pool_results([base, copy.deepcopy(base)], names=["a.json", "b.json"])
    other = _reseeded(base, 1)
    del other["methods"]["atlas"]
    with pytest.raises(ValueError, match="different methods"):
        pool_results([base, other])


def test_the_cli_pools_runs_and_names_what_it_cannot_read(tmp_path, real_run):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(real_run))
    b.write_text(json.dumps(_reseeded(real_run, 1)))
    out = tmp_path / "pooled.json"
    cli = [sys.executable, "-m", "atlas_rl.cli", "bench-pool"]
    done = subprocess.run([*cli, str(a), str(b), "--out", str(out)], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pooled: 2 runs" in done.stdout and "(run, step) units" in done.stdout
    assert len(json.loads(out.read_text())["pooled"]["runs"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    done = subprocess.run([*cli, str(a), str(bad)], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 2 and "is not an `atlas-rl bench` results JSON" in done.stderr


def test_every_figure_names_the_code_that_ran_it():
    rev = code_revision()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    if head:  # a git checkout (CI's clone is one)
        assert rev["commit"].split("+")[0] == head
    assert machine_info("float32")["commit"] == rev["commit"]

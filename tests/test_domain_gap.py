"""`atlas-rl bench --workload domain-gap`: domains no bundled drafter saw, an equal share
of the steps each, prompts coming back in epochs, and the domain oracle (the static
drafter's architecture distilled on those domains only) beside atlas-static and atlas."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from atlas_rl.bench import (
    DOMAIN_GAP_DOMAINS,
    BenchConfig,
    _domain_pools,
    _step_prompts,
    domain_gap_summary,
    format_domain_gap,
    oracle_command,
    oracle_prompts,
)
from atlas_rl.config import AtlasConfig
from atlas_rl.workloads import domain_prompts


def test_domain_gap_gives_each_domain_a_share_and_brings_its_prompts_back():
    cfg = BenchConfig(workload="domain-gap", steps=16, prompts_per_step=4)
    assert cfg.domains == list(DOMAIN_GAP_DOMAINS) and cfg.phase_starts == [0, 8]
    assert cfg.epoch_steps == 4  # half a domain's steps: each prompt comes back once
    assert "domain-oracle" in cfg.methods and cfg.drift_step is None
    pools = _domain_pools(cfg)
    assert [d for d, _ in pools] == ["javascript", "code-php"]
    drawn = {}
    for s in range(16):
        domain, pool = pools[cfg.domain_phase(s)]
        drawn[s] = [repr(p.prompt) for p in _step_prompts(pool, cfg.prompt_slot(s), 4 + 2)]
        assert {p.domain for p in _step_prompts(pool, cfg.prompt_slot(s), 6)} == {domain}
    assert [cfg.epoch(s) for s in (0, 3, 4, 7, 8, 12)] == [0, 0, 1, 1, 0, 1]
    assert drawn[0] == drawn[4] and drawn[3] == drawn[7]  # an epoch later, the same prompts
    assert not set(drawn[0]) & set(drawn[1])  # within an epoch, new ones
    assert not set(drawn[0]) & set(drawn[8])  # the next domain's are its own
    # three domains, steps not a multiple: every step in a phase, the phases in order
    three = BenchConfig(workload="domain-gap", steps=10, domains=["javascript", "code-lua",
                                                                   "math"])
    assert three.phase_starts == [0, 3, 6] and three.epoch_steps == 1
    assert [three.domain_phase(s) for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def test_code_language_domains_ask_for_that_language():
    php = domain_prompts("code-php", 5, seed=1)
    assert all(p.domain == "code-php" and "Write a PHP function" in p.prompt[0]["content"]
               for p in php)
    lua = domain_prompts("code-lua", 2)
    assert "Write a Lua function" in lua[0].prompt[0]["content"]
    with pytest.raises(ValueError, match="code-<language>"):
        domain_prompts("klingon", 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"domains": ["javascript"]}, "for --workload domain-gap"),
    ({"workload": "domain-gap", "domains": ["code-php", "code-php"]}, "distinct"),
    ({"workload": "domain-gap", "domains": ["nope"]}, "unknown domain"),
    ({"workload": "domain-gap", "steps": 1}, "raise --steps"),
    ({"workload": "domain-gap", "oracle_prompts": 0}, "oracle_prompts must be >= 1"),
])
def test_domain_gap_config_errors_say_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_the_oracle_distils_on_its_domains_only_and_never_on_the_runs_prompts():
    cfg = BenchConfig(workload="domain-gap", steps=8, prompts_per_step=6, oracle_prompts=40)
    run = {d: {repr(p.prompt) for p in pool} for d, pool in _domain_pools(cfg)}
    prompts = oracle_prompts(cfg)
    assert list(prompts) == list(run)  # the run's domains, nothing else
    for d, ps in prompts.items():
        assert len(ps) == 40 and {p.domain for p in ps} == {d}
        keys = [repr(p.prompt) for p in ps]
        assert len(set(keys)) == 40 and not set(keys) & run[d]
    cmd = oracle_command(cfg, "/m", ["/t/javascript.jsonl"], 80, "/out", "float32")
    assert cmd[cmd.index("--num-prompts") + 1] == "80"
    assert cmd[cmd.index("--drafter") + 1] == "mlp"  # the default drafter's architecture
    assert cmd[cmd.index("--prompts") + 1] == "/t/javascript.jsonl"
    assert cmd[cmd.index("--loss") + 1] == AtlasConfig().drafter_loss  # atlas's own loss
    eagle = BenchConfig(workload="domain-gap", drafter="eagle3")
    cmd = oracle_command(eagle, "/m", [], 1, "/out", "float32")
    assert cmd[cmd.index("--drafter") + 1] == "eagle3" and "--time-budget" in cmd


def _results(tps: dict[str, list[float]], steps=4, starts=(0, 2), al=None):
    """Tokens per request-step per method and step; acceptance lengths `al` (default:
    the frozen drafter's highest, as it is where it drafts only where it is sure)."""
    al = al or {m: [x + (1.0 if m == "atlas-static" else 0.1) for x in v] for m, v in tps.items()}
    methods = {m: {"steps": [{"step": s, "acceptance_length": al[m][s],
                              "speedup_estimate": v[s]} for s in range(steps)]}
               for m, v in tps.items()}
    return {"config": {"workload": "domain-gap", "steps": steps, "phase_starts": list(starts),
                       "domains": ["javascript", "code-php"]}, "methods": methods}


def test_domain_gap_summary_places_atlas_between_the_frozen_drafter_and_the_oracle():
    """Judged in tokens per request-step, not in acceptance length: here the frozen
    drafter's acceptance length is the highest (it drafts only where it is sure), and
    the summary still places atlas by what the drafts bought over every request-step."""
    res = _results({"atlas-static": [1.2, 1.2, 1.5, 1.4], "atlas": [1.1, 1.4, 1.5, 1.6],
                    "domain-oracle": [1.6, 1.6, 1.9, 1.8]})
    js, php = domain_gap_summary(res)
    assert js["steps"] == [1, 2] and php["steps"] == [3, 4]
    assert js["measure"] == "tokens_per_request_step"
    assert js["per_step"]["atlas"]["acceptance_length"] == pytest.approx([1.2, 1.5])
    assert js["per_step"]["atlas"]["tokens_per_request_step"] == [1.1, 1.4]
    assert js["atlas_over_static_last"] == pytest.approx(1.4 / 1.2)
    assert js["gap_closed_last"] == pytest.approx((1.4 - 1.2) / (1.6 - 1.2))
    assert js["atlas_over_static_worst"] == pytest.approx(1.1 / 1.2)
    assert php["gap_closed_last"] == pytest.approx(0.5)
    # the second half: the mean of the domain's later steps (here its last one)
    half = dict(js["second_half"])
    assert half.pop("steps") == [2, 2]
    assert half == pytest.approx({"atlas-static": 1.2, "atlas": 1.4, "domain-oracle": 1.6})
    assert js["gap_closed_second_half"] == pytest.approx(0.5)
    # an oracle no better than the frozen drafter leaves the share undefined
    flat = _results({"atlas-static": [1.2] * 4, "atlas": [1.3] * 4, "domain-oracle": [1.21] * 4})
    assert domain_gap_summary(flat)[0]["gap_closed_last"] is None
    assert domain_gap_summary(flat)[0]["gap_closed_second_half"] is None
    text = format_domain_gap(res)
    assert "javascript (steps 1-2)" in text and "50% of the way to the domain oracle" in text
    assert "second half (steps 2-2) atlas-static 1.20, atlas 1.40, domain-oracle 1.60" in text
    assert domain_gap_summary({"config": {"workload": "drift"}, "methods": {}}) is None


def test_domain_gap_runs_end_to_end_with_its_oracle(tiny_model_path, tmp_path):
    """Two steps through the CLI on a tiny model: the oracle is distilled on the two
    domains' prompts (in a child process, into the cache), its engine runs as a method,
    and the results carry the per-domain summary."""
    from conftest import DIST_ENV

    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="ERROR",
               ATLAS_RL_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "atlas_rl.cli", "bench", "--model", tiny_model_path, "--quick",
         "--workload", "domain-gap", "--methods", "none,atlas-static", "--max-tokens", "8",
         "--oracle-prompts", "3", "--large-batch-steps", "", "--out", str(out),
         "--no-progress"],
        check=False, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    oracle = results["config"]["domain_oracle"]
    assert oracle["domains"] == {"javascript": 3, "code-php": 3} and oracle["training_rows"] > 0
    assert oracle["dir"].startswith(str(tmp_path / "cache"))
    assert list(results["methods"]) == ["none", "atlas-static", "domain-oracle"]
    assert results["methods"]["domain-oracle"]["exactness"]["exact"]
    gap = results["domain_gap"]
    assert [g["domain"] for g in gap] == ["javascript", "code-php"]
    assert all(len(g["per_step"]["domain-oracle"]["acceptance_length"]) == 1 for g in gap)
    assert "The domain gap" in proc.stdout and "code-php (steps 2-2)" in proc.stdout


def test_the_gates_error_rate_pools_every_checked_decision():
    from atlas_rl.bench import gate_check_summary

    records = {"tail": [{"drafter_gate_right": 1.0}, {"drafter_gate_right": 0.0}, {}],
               "tail_rl": [{"drafter_gate_right": 1.0}, {"drafter_gate_right": 1.0}],
               "large_batch": []}
    assert gate_check_summary(records) == {"gate_checks": 4, "gate_error_rate": 0.25}
    assert gate_check_summary({"tail": [{}]}) == {"gate_checks": 0, "gate_error_rate": None}
    res = _results({"atlas-static": [1.2] * 4, "atlas": [1.3] * 4})
    res["methods"]["atlas"]["summary"] = {"gate_checks": 4, "gate_error_rate": 0.25}
    assert "4 decisions checked on the next batch's rollouts, 25% wrong" in \
        format_domain_gap(res)

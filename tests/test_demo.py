"""`atlas-rl demo`: each GRPO run (with and without speculation) in a process of its own, so
that neither inherits the other's process state (run one after the other in one process,
the first run's training steps were slower: atlas_rl/demo.py's docstring)."""

from __future__ import annotations

import os

import pytest

from atlas_rl import demo


def _fail(message: str) -> None:
    raise ValueError(message)


def test_a_fresh_process_returns_its_result_and_raises_its_error():
    pid = demo.in_fresh_process(os.getpid)
    assert isinstance(pid, int) and pid != os.getpid()
    assert demo.in_fresh_process(os.getpid) != pid  # a new process for every call
    with pytest.raises(ValueError, match="in the child"):
        demo.in_fresh_process(_fail, "in the child")


def test_the_demo_runs_each_method_through_a_fresh_process(monkeypatch, tmp_path, capsys):
    calls = []

    def record(fn, method, *args):
        calls.append((fn, method))
        row = {demo.ROLLOUT_SECONDS: 1.0 if method == "none" else 0.8, "step_time": 2.0,
               demo.ACCEPTANCE_LENGTH: 1.5 if method == "atlas" else 1.0, "reward": 0.1,
               demo.TRL_LOGP_GAP: 5e-5}
        return [dict(row) for _ in range(2)], "float32"

    monkeypatch.setattr(demo, "in_fresh_process", record)
    monkeypatch.setattr("atlas_rl.models.resolve_model", lambda name: name)
    assert demo.run_demo(steps=2, out_dir=str(tmp_path)) == 0
    assert calls == [(demo._grpo_run, "atlas"), (demo._grpo_run, "none")]
    out = capsys.readouterr().out
    assert "rollouts alone: 1.25x" in out and "each in a process of its own" in out

"""The examples run (tiny model: mechanics; speed and acceptance need the real one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_ppo_loop_runs_two_iterations_and_trains(tiny_model_path, subprocess_env):
    env = subprocess_env(VLLM_CPU_KVCACHE_SPACE=1, VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "ppo_loop.py"), "--model",
                           tiny_model_path, "--iterations", "2", "--max-tokens", "12",
                           "--lr", "1e-4"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("iteration ") for line in lines) == 2
    summary = json.loads(lines[-1])
    assert summary["policy_delta"] > 0 and summary["value_head_delta"] > 0
    assert summary["engine"]["num_tokens"] > 0 and summary["engine"]["acceptance_length"] >= 1.0

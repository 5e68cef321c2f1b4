"""scripts/gpu_check.sh --cpu-smoke: the GPU check's every stage at toy sizes on the CPU
(Triton interpreted), so that the one command the GPU machine runs keeps working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_smoke_writes_its_report(tmp_path, subprocess_env):
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke",
                           "--out", str(tmp_path)], cwd=REPO, check=False,
                          capture_output=True, text=True,
                          env=subprocess_env(PYTHON=sys.executable), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["errors"] == {} and report["cpu_smoke"]
    stages = report["stages"]
    assert set(stages) >= {"env", "verify", "drafter", "step", "project"}
    rows = stages["verify"]["rows"]
    assert rows and all(r["identical"] for r in rows)  # Triton (interpreted) = reference
    drafter = stages["drafter"]["models"]["tiny"]
    assert drafter["rows"] and drafter["training"]["weights_moved"]
    steps = stages["step"]["models"]["tiny"]["rows"]
    assert {(r["batch"], r["tokens"]) for r in steps if "best_ms" in r} == \
        {(b, n) for b in (1, 2) for n in (1, 2, 3)}
    table = stages["project"]["tables"]["tiny"]
    assert [r["batch"] for r in table] == [1, 2]
    assert all(v > 0 for r in table for k, v in r.items() if k.endswith(")") or "target" in k)
    md = (tmp_path / "gpu-check.md").read_text()
    for section in ("### Verification", "### Drafter", "### Policy step cost",
                    "### Projected rollout speedup", "a projection"):
        assert section in md, section

"""`make test`'s runner (tests/run_per_module.py): a failing test fails the run, and what
it said is repeated at the end of the output, where a CI log that keeps only its head and
tail still shows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "run_per_module.py"


def _run(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "-q", "-ra", "-p", "no:cacheprovider",
                           *map(str, paths)], capture_output=True, text=True, timeout=300, check=False)


def test_a_failing_test_fails_the_run_and_its_assertion_ends_the_log(tmp_path):
    passing = tmp_path / "test_passes.py"
    passing.write_text("def test_ok():\n    assert 1 + 1 == 2\n")
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_wrong():\n    seen = {'learning_now': 1}\n"
                       "    assert seen['learning_now'] == 0, seen\n")
    done = _run(passing, failing, passing)
    assert done.returncode == 1, done.stdout[-2000:]
    tail = done.stdout[done.stdout.index("FAILED module"):]
    assert f"FAILED module: {failing} (pytest exit 1)" in tail
    assert "AssertionError: {'learning_now': 1}" in tail  # the message, after the summary
    assert "test_fails.py::test_wrong" in tail
    assert str(passing) not in tail  # only the failing module's lines

    ok = _run(passing)
    assert ok.returncode == 0 and "FAILED" not in ok.stdout, ok.stdout[-2000:]

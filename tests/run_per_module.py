"""`make test`: the suite, one pytest process per test module.

A process per module is how the suite keeps its memory bounded wherever its modules sit:
whatever a module's engines leave behind in the allocator (glibc keeps freed heap in
pieces it cannot hand back; vLLM keeps process-wide state) goes with its process, so the
suite's peak is the largest module's (`tests/conftest.py` prints each process's peak;
this prints the largest and where). Arguments go to every pytest run; paths among them
(``make test PYTEST_ARGS=tests/test_x.py``) replace the module list.

Exit status: 0 when every module passed (a module whose tests were all deselected
counts as passed); pytest's own status otherwise (the first failing module's), and 5
when no module collected a test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

PEAK = re.compile(r"atlas-rl: peak RSS of this pytest process: ([0-9.]+) GiB")
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")
# what a failing module's output says of its failures, repeated at the end of the run: a
# CI log keeps its head and tail, and the middle, where a module failed, may be cut
FAILURE_LINE = re.compile(r"^(E   |FAILED |ERROR |tests/\S+\.py:\d+: )")
FAILURE_LINES = 60


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    paths = [a for a in argv if not a.startswith("-") and (os.path.exists(a) or "::" in a)]
    options = [a for a in argv if a not in paths]
    modules = paths or sorted(str(p.relative_to(here.parent)) for p in here.glob("test_*.py"))
    totals: dict[str, int] = {}
    peaks: list[tuple[float, str]] = []
    failed: list[tuple[str, int]] = []
    failures: dict[str, list[str]] = {}
    seconds: list[tuple[float, str]] = []
    start = time.perf_counter()
    for i, module in enumerate(modules, 1):
        print(f"\n=== [{i}/{len(modules)}] {module}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *options, module],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=here.parent)
        out = []
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            out.append(line)
        rc = proc.wait()
        text = "".join(out[-40:])
        peak = PEAK.search(text)
        if peak:
            peaks.append((float(peak.group(1)), module))
        summary = next((line for line in reversed(out) if COUNTS.search(line)), "")
        for n, kind in COUNTS.findall(summary):
            totals[kind] = totals.get(kind, 0) + int(n)
        seconds.append((time.perf_counter() - t0, module))
        print(f"=== {module}: exit {rc} in {seconds[-1][0]:.0f} s", flush=True)
        if rc != 0:
            failed.append((module, rc))
            failures[module] = [line.rstrip() for line in out if FAILURE_LINE.match(line)]
    minutes = (time.perf_counter() - start) / 60
    counts = ", ".join(f"{n} {kind}" for kind, n in totals.items())
    print(f"\n=== {len(modules)} modules, one pytest process each: {counts or 'no tests'} "
          f"in {minutes:.1f} min", flush=True)
    slowest = sorted(seconds, reverse=True)[:8]
    print("=== slowest modules: " + ", ".join(f"{Path(m).stem} {s / 60:.1f} min"
                                             for s, m in slowest), flush=True)
    if peaks:
        peak, where = max(peaks)
        print(f"atlas-rl: the suite's peak RSS: {peak:.2f} GiB ({where})")
    for module, rc in failed:
        if rc != 5:
            print(f"FAILED module: {module} (pytest exit {rc})")
            lines = failures.get(module, [])
            for line in lines[:FAILURE_LINES]:
                print(f"    {line}")
            if len(lines) > FAILURE_LINES:
                print(f"    ... {len(lines) - FAILURE_LINES} more lines: see the module's "
                      "output above")
    real = [(m, rc) for m, rc in failed if rc != 5]  # 5: this module collected nothing
    if real:                                           # (all deselected by -k or -m)
        return real[0][1]
    return 5 if len(failed) == len(modules) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

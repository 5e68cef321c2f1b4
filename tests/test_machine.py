"""The host allocator setting (`atlas_rl.machine`): what it promises is that a freed block
over glibc's mmap threshold is reused without page faults where an engine generates (all
the time in a process that only generates and the processes it starts; while generating
in one that also trains), that a weight sync's blocks are not kept, and that an allocator
the user chose is left alone. Each check
runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from atlas_rl import machine
from atlas_rl.bench import rotation

pytestmark = pytest.mark.skipif(machine._glibc() is None, reason="needs glibc")

# A 64 MiB block (over glibc's largest mmap threshold, 32 MiB), written, freed, three
# times; the page faults of the last two rounds. Then the same in a child process.
PROBE = r"""
import json, os, resource, subprocess, sys
from atlas_rl import machine
state = (machine.reuse_freed_memory() if sys.argv[1] in ("reuse", "one-off")
         else machine.allocator())
def faults():
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    n, counts = 64 << 20, []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(ctypes.c_void_p(p))
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[1:])
if sys.argv[1] == "while-generating":
    state = machine.reuse_while_generating()
    before = faults()
    with machine.generating():
        with machine.generating():  # re-entrant
            inner = faults()
        inside = faults()
    print(json.dumps({"before": before, "inside": inside + inner, "after": faults(),
                      "state": state}))
    raise SystemExit
if sys.argv[1] == "one-off":
    with machine.one_off_allocations():
        inside = faults()
    print(json.dumps({"inside": inside, "after": faults(), "state": state}))
    raise SystemExit
if sys.argv[1] == "child":
    print(json.dumps({"faults": faults(), "state": state}))
else:
    child = subprocess.run([sys.executable, "-c", sys.argv[2], "child"], capture_output=True,
                           text=True, check=True)
    print(json.dumps({"faults": faults(), "state": state,
                      "child": json.loads(child.stdout.strip().splitlines()[-1])}))
"""
PAGES = (64 << 20) // 4096  # faults of one round when the block is mapped afresh


def _probe(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k != machine.SYSTEM_ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, PROBE], capture_output=True,
                         text=True, check=True, env={**environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults_here_and_in_child_processes():
    system = _probe("system")
    assert system["state"] == "system"
    # the system default maps the block afresh each round: a fault per page
    assert system["faults"] >= PAGES and system["child"]["faults"] >= PAGES
    kept = _probe("reuse")
    assert kept["state"] == machine.REUSED
    assert kept["faults"] < PAGES // 20
    # vLLM's engine core and workers are child processes: they inherit the setting
    assert kept["child"]["state"] == machine.REUSED
    assert kept["child"]["faults"] < PAGES // 20


def test_a_process_that_also_trains_reuses_freed_blocks_while_generating_only():
    got = _probe("while-generating")
    assert got["state"] == machine.WHILE_GENERATING
    assert got["before"] >= PAGES  # a trainer's step: large blocks mapped, as glibc does
    assert got["inside"] < PAGES // 10  # the engine steps: kept and reused
    assert got["after"] >= PAGES  # handed back when the generate call ends


def test_a_stretch_of_one_off_allocations_maps_its_blocks_and_reuse_resumes_after():
    # a weight sync's blocks are allocated once: kept, they only added to the peak
    got = _probe("one-off")
    assert got["state"] == machine.REUSED
    assert got["inside"] >= PAGES  # mapped afresh each round, as the system does
    assert got["after"] < PAGES  # kept again (the first round faults the trimmed pages)


@pytest.mark.parametrize("env, named", [
    ({machine.SYSTEM_ALLOCATOR_ENV: "1"}, machine.SYSTEM_ALLOCATOR_ENV),
    ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "GLIBC_TUNABLES"),
])
def test_an_allocator_the_user_chose_is_left_as_it_is(env, named):
    got = _probe("reuse", **env)
    assert got["state"].startswith("user's: ") and named in got["state"]
    assert got["faults"] >= PAGES  # nothing changed: still mapped afresh


def test_the_config_switch_is_documented_and_on_by_default():
    from atlas_rl.config import AtlasConfig

    assert AtlasConfig().cpu_reuse_freed_memory is True
    assert AtlasConfig.from_dict({"cpu_reuse_freed_memory": False}).cpu_reuse_freed_memory is False


def test_the_large_batches_rotate_by_their_own_count():
    methods = ["none", "atlas-static", "atlas"]
    # the default large-batch steps (every other step) with two methods: the step's
    # rotation would put the same method first every time; their own count alternates
    firsts = [rotation(["none", "atlas"], nth)[0] for nth in range(4)]
    assert firsts == ["none", "atlas", "none", "atlas"]
    assert [rotation(["none", "atlas"], step)[0] for step in (1, 3, 5, 7)] == ["atlas"] * 4
    for nth in range(3):
        assert sorted(rotation(methods, nth)) == sorted(methods)
    assert {rotation(methods, nth)[0] for nth in range(3)} == set(methods)


def test_the_sampler_profile_shows_fewer_page_faults_with_freed_blocks_kept():
    # scripts/profile_sampler.py, the figure BENCHMARKS.md quotes, at a vocabulary whose
    # [64, vocabulary] float32 tensors (33.5 MB) are over glibc's largest mmap threshold
    pytest.importorskip("vllm")
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_sampler.py"
    out = subprocess.run([sys.executable, str(script), "--vocab", "131072", "--requests", "64",
                          "--repeats", "2"], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:6] for line in out.stdout.splitlines()
            if line.startswith("| ") and "ms" in line}
    assert set(rows) == {"system", machine.REUSED}, out.stdout
    faults = {k: [float(v[1].replace(",", "")), float(v[3].replace(",", ""))]
              for k, v in rows.items()}
    # a step with one drafted request: its verification's copies page-faulted afresh
    assert faults[machine.REUSED][1] < faults["system"][1] / 4, out.stdout

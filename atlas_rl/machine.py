"""The machine a figure ran on. Every figure atlas-rl reports names its CPU (and whether
the CPU has bf16 units: with them bfloat16 runs natively, without them it is emulated and
float32 is faster), its GPU if any, the versions and the engine's dtype."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from pathlib import Path


@functools.cache  # read once: the drafter asks again after every weight sync
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 units: bf16 matmuls run natively, not emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine_info(dtype: str) -> dict:
    """The machine a figure ran on: CPU (and whether it has bf16 units), cores, GPU,
    versions (atlas-rl's own and its commit: `code_revision`), the engine's dtype and the
    host allocator's setting (`allocator`). Every figure atlas-rl reports carries it."""
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:  # the GPU check's machine has torch and Triton, no vLLM
        vllm_version = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_bf16_units": cpu_has_native_bf16(), "cores": os.cpu_count(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm_version, "dtype": dtype, "allocator": allocator(),
            **code_revision()}


@functools.cache
def code_revision() -> dict:
    """atlas-rl's version and, where it runs from a git checkout, the commit
    (``<sha>+dirty`` where tracked files differ from it; None elsewhere, e.g. a wheel):
    what `atlas-rl bench-pool` checks before it pools runs."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        atlas_version = version("atlas-rl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        atlas_version = None
    root = Path(__file__).resolve().parent.parent
    commit = None
    if (root / ".git").exists():
        try:
            def git(*args: str) -> str:
                return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                      text=True, timeout=10, check=True).stdout.strip()
            commit = git("rev-parse", "--short=7", "HEAD")
            if git("status", "--porcelain", "--untracked-files=no"):
                commit += "+dirty"
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"atlas_rl": atlas_version, "commit": commit}


# --- the host allocator -----------------------------------------------------------------
#
# glibc's malloc serves every block over its mmap threshold (at most 32 MiB) from a fresh
# mapping and unmaps it on free, so a tensor of that size costs a page fault per 4 KiB
# every time it is allocated. vLLM's CPU sampler allocates several [requests, vocabulary]
# float32 tensors per engine step: at 64 sequences and a 262,144-token vocabulary (67 MB
# each) that was ~1M page faults per 32-step batch, and sampling took ~3x its time
# (scripts/profile_sampler.py). Kept in the heap instead, freed blocks are reused as they
# are: M_MMAP_MAX 0 sends every block to the heap, a trim threshold of 2 GiB keeps its
# freed top. Two scopes:
# - a process that only generates (the engine core of a multiprocess engine, `atlas-rl
#   serve`): all the time (`reuse_freed_memory`, inherited through the environment); a
#   weight sync, whose blocks are allocated once, runs as the system's malloc would
#   (`one_off_allocations`);
# - a process that also trains (an in-process engine beside a trainer): while generating
#   only (`reuse_while_generating`, `generating`); outside it blocks of 32 MiB and more
#   are mapped (glibc's own largest threshold) and the kept pages handed back, so that a
#   training step's peak is the system's (kept all the time, a TRL GRPO step of Gemma 3
#   270M peaked 0.6 GB higher).

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_SYSTEM_MMAP_MAX = 65536  # glibc's default
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest (dynamic) threshold on 64-bit
_KEEP_TOP = (1 << 31) - 1  # mallopt takes an int
_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_KEEP_TOP)}
REUSED = "glibc, freed blocks reused"
WHILE_GENERATING = "glibc, freed blocks reused while generating"
#: set (to 1) to keep the system's allocator as it is: what cpu_reuse_freed_memory=False does
SYSTEM_ALLOCATOR_ENV = "ATLAS_RL_SYSTEM_ALLOCATOR"
_allocator: dict = {"depth": 0}


@functools.cache  # every generate call asks
def _glibc():
    import ctypes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _allocator_chosen_by_user() -> str | None:
    """The setting of the host allocator the user made, if any: atlas-rl leaves it."""
    if os.environ.get(SYSTEM_ALLOCATOR_ENV, "") not in ("", "0"):
        return f"{SYSTEM_ALLOCATOR_ENV}={os.environ[SYSTEM_ALLOCATOR_ENV]}"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    for var in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if var in os.environ and os.environ[var] != _MALLOC_ENV.get(var):
            return f"{var}={os.environ[var]}"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _not_applicable() -> tuple[str | None, object]:
    """(why atlas-rl leaves the allocator alone, or None; glibc)."""
    user = _allocator_chosen_by_user()
    if user:
        return f"user's: {user}", None
    libc = _glibc()
    return (None, libc) if libc is not None else ("system (not glibc)", None)


def _keep(libc) -> bool:
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP) == 1


def _map_large(libc) -> None:
    """glibc's steady state after large frees: blocks of 32 MiB and more mapped, the
    heap's top trimmed past twice that; what was kept handed back."""
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_MAX, _SYSTEM_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)


def reuse_freed_memory() -> str:
    """Have glibc's malloc keep freed blocks for reuse in this process, all the time, and
    in the processes it starts from here on (vLLM's engine core and workers inherit the
    environment): for a process that only generates (see the comment above).
    Idempotent; returns `allocator()`. Leaves an allocator the user chose (LD_PRELOAD,
    MALLOC_* variables, GLIBC_TUNABLES, ``ATLAS_RL_SYSTEM_ALLOCATOR=1``) and non-glibc
    hosts as they are."""
    if _allocator.get("state") == REUSED:
        return REUSED
    why, libc = _not_applicable()
    if why:
        _allocator["state"] = why
    elif _keep(libc):
        os.environ.update(_MALLOC_ENV)
        _allocator["state"] = REUSED
    else:
        _allocator["state"] = "glibc (mallopt refused)"
    return _allocator["state"]


@contextlib.contextmanager
def engine_processes_reuse_freed_memory():
    """The processes started within (a multiprocess vLLM engine's core) keep freed blocks
    for reuse all the time; this one is left as it is."""
    why, _ = _not_applicable()
    saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
    if why is None:
        os.environ.update(_MALLOC_ENV)
    try:
        yield
    finally:
        if why is None and _allocator.get("state") != REUSED:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def reuse_while_generating() -> str:
    """Keep freed blocks for reuse in this process while it generates (`generating`),
    and map large ones outside it: for a process that also trains (see the comment
    above). Idempotent; returns `allocator()`; leaves what `reuse_freed_memory` leaves."""
    if allocator() in (REUSED, WHILE_GENERATING):  # REUSED: inherited or set here
        return allocator()
    why, libc = _not_applicable()
    if why:
        _allocator["state"] = why
    else:
        _map_large(libc)
        _allocator["state"] = WHILE_GENERATING
    return _allocator["state"]


@contextlib.contextmanager
def generating():
    """The engine steps of a generate call: freed blocks kept for reuse where
    `reuse_while_generating` ran, handed back at the end. Re-entrant."""
    libc = _glibc() if _allocator.get("state") == WHILE_GENERATING else None
    if libc is None:
        yield
        return
    if _allocator["depth"] == 0:
        _keep(libc)
    _allocator["depth"] += 1
    try:
        yield
    finally:
        _allocator["depth"] -= 1
        if _allocator["depth"] == 0:
            _map_large(libc)


def allocator() -> str:
    """What the host allocator does in this process: "glibc, freed blocks reused" (all
    the time: `reuse_freed_memory` ran, or the process started with its variables),
    "... while generating" (`reuse_while_generating`), the user's choice, or the system
    default."""
    if "state" in _allocator:
        return _allocator["state"]
    if all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items()):
        return REUSED  # inherited: glibc read them at start
    user = _allocator_chosen_by_user()
    return f"user's: {user}" if user else "system"


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the OS (glibc keeps some otherwise, all
    the more after `reuse_freed_memory`): between phases that peak differently, e.g. an
    engine shut down or a policy update's logits."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def one_off_allocations():
    """A stretch whose large blocks are allocated once (a weight sync: vLLM's reload
    materialises a layer at a time, the embedding ~1 GB at a 262k vocabulary) in a
    process that keeps freed blocks all the time: mapped and unmapped as the system's
    malloc does (kept, they only added to the peak: 8.2 against 7.8 GB for a benchmark of
    Gemma 3 270M), and the kept pages handed back after."""
    libc = _glibc() if allocator() == REUSED else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, _SYSTEM_MMAP_MAX)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.malloc_trim(0)

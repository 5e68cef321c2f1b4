"""The machine a figure ran on. Every figure atlas-rl reports names its CPU (and whether
the CPU has bf16 units: with them bfloat16 runs natively, without them it is emulated and
float32 is faster), its GPU if any, the versions and the engine's dtype."""

from __future__ import annotations

import functools
import os
import platform


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
    versions, the engine's dtype and the host allocator's setting (`allocator`). Every figure atlas-rl reports carries it."""
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
            "vllm": vllm_version, "dtype": dtype, "allocator": allocator()}


# --- the host allocator -----------------------------------------------------------------
#
# glibc's malloc serves every block over its mmap threshold (at most 32 MiB) from a fresh
# mapping and unmaps it on free, so a tensor of that size costs a page fault per 4 KiB
# every time it is allocated. vLLM's CPU sampler allocates several [requests, vocabulary]
# float32 tensors per engine step: at 64 sequences and a 262,144-token vocabulary (67 MB
# each) that was ~1M page faults per 32-step batch, and sampling took ~3x its time
# (scripts/profile_sampler.py). Kept in the heap instead, freed blocks are reused as they
# are. M_MMAP_MAX 0 sends every block to the heap; a trim threshold of 2 GiB keeps its
# freed top (`release_freed_memory` still hands it back on request).

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_TOP = (1 << 31) - 1  # mallopt takes an int
_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_KEEP_TOP)}
_allocator: dict = {}
#: set (to 1) to keep the system's allocator as it is: what cpu_reuse_freed_memory=False does
SYSTEM_ALLOCATOR_ENV = "ATLAS_RL_SYSTEM_ALLOCATOR"


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


def reuse_freed_memory() -> str:
    """Have glibc's malloc keep freed blocks for reuse, in this process and in the
    processes it starts from here on (vLLM's engine core and workers inherit the
    environment): see the comment above. Idempotent; returns what the host allocator
    does, as `allocator()` reports it. Leaves an allocator the user chose (LD_PRELOAD,
    MALLOC_* variables, GLIBC_TUNABLES, ``ATLAS_RL_SYSTEM_ALLOCATOR=1``) and non-glibc
    hosts as they are."""
    if "state" in _allocator:
        return _allocator["state"]
    user = _allocator_chosen_by_user()
    libc = None if user else _glibc()
    if user:
        state = f"user's: {user}"
    elif libc is None:
        state = "system (not glibc)"
    elif libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP) == 1:
        os.environ.update(_MALLOC_ENV)
        state = "glibc, freed blocks reused"
    else:
        state = "glibc (mallopt refused)"
    _allocator["state"] = state
    return state


def allocator() -> str:
    """What the host allocator does in this process: "glibc, freed blocks reused" once
    `reuse_freed_memory` ran (or the process started with its variables), the user's
    choice, or the system default."""
    if "state" in _allocator:
        return _allocator["state"]
    if all(os.environ.get(k) == v for k, v in _MALLOC_ENV.items()):
        return "glibc, freed blocks reused"  # inherited: glibc read them at start
    user = _allocator_chosen_by_user()
    return f"user's: {user}" if user else "system"


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the OS (glibc keeps them otherwise, all
    the more after `reuse_freed_memory`): between phases that peak differently, e.g. an
    engine shut down or a policy update's logits."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

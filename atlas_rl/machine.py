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
    versions, and the engine's dtype. Every figure atlas-rl reports carries it."""
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
            "vllm": vllm_version, "dtype": dtype}

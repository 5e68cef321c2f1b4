"""Host-to-device copies of the small per-step arrays of verification and drafting (draft
counts, token ids, flags) that do not wait for the GPU.

A copy from pageable host memory waits for the work already queued on the stream; a
non-blocking copy from pinned memory does not. Measured on an H100 (docs/gpu.md), one
verification call of 1 x 1 to 64 x 8 drafts: pinning per call (``pin_memory()``) 155-370
us a call; a ring of reused pinned buffers guarded by CUDA events 185-410 us, slower (the
event record and synchronize cost more than the small pinned allocation). So: pin per
call."""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """``values`` (a host list or tensor) on ``device``; on CUDA through pinned memory and
    a non-blocking copy, so the host does not wait for the GPU."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_STAGED: dict = {}  # (device, dtype, values) -> the tensor on that device


def staged_on(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` on ``device``, kept per pattern: per-step arrays that recur (draft counts
    of a batch at the step's lookahead, sampling flags) go over once, not at every step.
    The tensor is shared: callers read it, never write it."""
    key = (str(device), dtype, values)
    t = _STAGED.get(key)
    if t is None:
        if len(_STAGED) >= 4096:
            _STAGED.clear()
        t = _STAGED[key] = to_device(list(values), dtype, device)
    return t
